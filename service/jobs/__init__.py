"""Batch-cleaning jobs: a SQLite store (jobs and items) and a runner thread."""
