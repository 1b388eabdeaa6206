"""The FastAPI service (not built yet: see the open issues)."""
