"""The `cervixqc` subcommands, one module per area; registered in pipelines/cli.py."""
