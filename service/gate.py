"""One engine, two users: interactive upload batches and background cleaning jobs.

The models run one batch at a time (on 2 CPU cores or one GPU, two batches at once only
fight). Uploads have priority: a job waits before each of its (small) batches while any
upload is queued or running, so a technician waits at most one job batch, however large
the job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class EngineGate:
    def __init__(self, interactive_pending: Callable[[], int] = lambda: 0) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting = 0
        self._pending = interactive_pending

    @contextmanager
    def interactive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._busy)
            self._waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def background(self, poll_s: float = 0.05) -> Iterator[None]:
        """Waits while the engine is busy or uploads are waiting. The pending count lives in
        the event loop's queue, which cannot notify this condition, hence the short poll."""
        with self._cond:
            while self._busy or self._waiting or self._pending():
                self._cond.wait(poll_s)
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()
