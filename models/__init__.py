"""nn.Modules and their builders only: no files, no HTTP, no CLI (the design brief's rule:
imports point service -> pipelines -> models)."""
