"""Whether the engine still answers: a run of failed engine calls makes the service unready.

A persistent engine fault (a CUDA error that poisons the context, a weights file gone bad
on a failing disk) answered 500 to every upload and failed every job while /readyz and the
container's healthcheck said healthy, and no metric counted it. Now every failed engine
call is counted (`cervixqc_engine_errors_total{origin}`), and after `FAILING_AFTER` failures
in a row, with no success between them, /readyz answers 503 `engine_failing`. A single
request's own bad photo fails one call; the next good one resets the run. An unready
service gets no traffic behind a load balancer, so /readyz then tries the engine itself on
the warm-up photo (`probe`, at most every `PROBE_EVERY_S`): the service comes back
by itself once the engine answers again. That grey photo goes through decoding, the
detector and stage 0, not stage 2 (nothing is found on it): a fault in stage 2 alone passes
the probe, and readiness then turns back and forth while `cervixqc_engine_errors_total`
keeps counting; alert on that rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

FAILING_AFTER = 3
WARM_UP = np.full((480, 640, 3), 128, np.uint8)  # the photo of the start-up warm-up and of the probe
PROBE_EVERY_S = 10.0


class EngineHealth:
    def __init__(self, errors_counter) -> None:  # a prometheus Counter labelled by origin
        self._errors = errors_counter
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._last_error = ""
        self._last_probe = 0.0
        self._probing = False

    def succeeded(self) -> None:
        with self._lock:
            self._in_a_row = 0

    def failed(self, origin: str, error: BaseException) -> None:
        """`origin`: upload, job or probe. The error's kind only is kept: messages may name files."""
        self._errors.labels(origin).inc()
        with self._lock:
            self._in_a_row += 1
            self._last_error = type(error).__name__

    def failing(self) -> str | None:
        """Why the engine is taken as failing, or None."""
        with self._lock:
            if self._in_a_row < FAILING_AFTER:
                return None
            return f"the last {self._in_a_row} engine calls failed ({self._last_error})"

    def probe(self, run_engine: Callable[[], object]) -> None:
        """Run `run_engine` (the warm-up photo through the engine, under the gate) when the
        engine is failing, no probe is running and none ran in the last PROBE_EVERY_S: a
        readiness poll every second must not keep the engine busy, nor pile up threads on
        a hung one. Called in a worker thread; its outcome counts like any engine call."""
        with self._lock:
            now = time.monotonic()
            if self._probing or now - self._last_probe < PROBE_EVERY_S:
                return
            self._probing, self._last_probe = True, now
        try:
            run_engine()
        except Exception as e:  # noqa: BLE001 - the engine's fault is what the probe measures
            self.failed("probe", e)
        else:
            self.succeeded()
        finally:
            with self._lock:
                self._probing = False
