"""nn.Modules and their builders only: no files, no HTTP, no CLI (see DESIGN.md)."""
