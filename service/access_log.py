"""Uvicorn's access log without query strings.

The review pages filter by a job's first folder (`?source=`), and clinics name folders after
patients: `GET /ui/jobs/…/review?source=Doe%2C+Jane+1984` went into every access log line,
against the rule that logs carry no file names. The path stays (ids only: items and
thumbnails are addressed by row id, never by a client's path); the query goes.
"""

from __future__ import annotations

import logging


class DropQueryString(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client_addr, method, full_path, http_version, status_code)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?…", *args[3:])
        return True


def drop_query_strings(logger: logging.Logger | None = None) -> None:
    """Once per logger, however many apps a process makes."""
    logger = logger or logging.getLogger("uvicorn.access")
    if not any(isinstance(f, DropQueryString) for f in logger.filters):
        logger.addFilter(DropQueryString())
