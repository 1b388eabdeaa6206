"""One log format for the service's lines and uvicorn's, with a timestamp, at CERVIXQC_LOG_LEVEL.

Uvicorn's default config printed its own lines as `INFO:     ...` beside ours, none with a
time; and under `uvicorn --factory service.app:create_app` (no `cervixqc serve`) nothing
configured ours at all, so `ready in`, the jobs' lines and the schema upgrades were not
printed. `cervixqc serve` hands uvicorn `uvicorn_config`; `create_app` calls `ensure_handler`
for the other launches. The access log keeps its query-string filter (service/access_log.py).
"""

from __future__ import annotations

import logging
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def uvicorn_config(level: str) -> dict[str, Any]:
    """For `uvicorn.run(log_config=...)`: every logger through one stderr handler on the root."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True, "level": level.upper()}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def ensure_handler(level: str) -> None:
    """The root logger gets a handler in FORMAT where it has none (a bare `uvicorn --factory`
    launch), and the level either way; uvicorn's own handlers, where they still carry its
    default formatters, take FORMAT too (a `--log-config` of the site's own is left alone)."""
    # uvicorn's default and access formatters derive from it
    from uvicorn.logging import ColourizedFormatter

    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler.formatter, ColourizedFormatter):
                handler.setFormatter(logging.Formatter(FORMAT))
