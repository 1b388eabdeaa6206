"""Data, training, evaluation and the QC engine; imports models, never service."""
