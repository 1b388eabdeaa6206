"""Liveness, readiness (models loaded, job runner alive, job store writable, engine answering)
and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import UNAUTHORIZED, MetricsKey
from service.engine_health import WARM_UP
from service.errors import error_response

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


# HEAD too: uptime monitors that send it got 405. A route of its own per method: one route for
# both gave the two operations one operationId (OpenAPI wants them unique; generated clients
# collide), named after HEAD even for GET (an audit)
_READY = "Models loaded, workers running, job store writable, engine answering (no auth)"


@router.get("/healthz", operation_id="healthz", summary="The process is up (no auth)")
@router.head("/healthz", operation_id="healthz_head", summary="The process is up (no auth)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", operation_id="readyz", summary=_READY, responses={503: {"description": "not ready"}})
@router.head("/readyz", operation_id="readyz_head", summary=_READY, responses={503: {"description": "not ready"}})
async def readyz(request: Request):
    state = getattr(request.app.state, "service", None)
    # uvicorn listens only once the lifespan has loaded the models: no state is a stop under way
    # (it said "models loading", which no request could see: an audit)
    if state is None:
        return error_response(503, "not_ready", "the service is stopping", {"Retry-After": "5"})
    if not state.runner.alive():
        return error_response(503, "not_ready", "the job runner stopped", {"Retry-After": "5"})
    try:  # in a thread: a hung mount must not hold the event loop; 2 s inside the healthcheck's 4
        await asyncio.wait_for(asyncio.to_thread(state.store.probe, 2.0), 3.0)
    except (sqlite3.Error, OSError, TimeoutError) as e:
        reason = ("no answer in 3 s" if isinstance(e, TimeoutError)
                  else e.strerror if isinstance(e, OSError) and e.strerror else str(e))
        return _unready(request, "store_unavailable", f"the job store cannot take a write ({reason})", "5")
    failing = state.health.failing()
    if failing:
        # tried again in the background (at most one probe at a time, every 10 s): an unready
        # service gets no traffic, so no upload would show that the engine answers again
        asyncio.get_running_loop().run_in_executor(None, state.health.probe, lambda: _probe(state))
        return _unready(request, "engine_failing", failing, "10")
    if getattr(request.app.state, "unready", None) is not None:
        log.warning("ready again (was %s)", request.app.state.unready)
        request.app.state.unready = None
    return {"status": "ready"}


def _unready(request: Request, code: str, message: str, retry_after: str) -> Response:
    """The 503, logged when readiness changes (Docker's healthcheck shows only "HTTP Error
    503"; the reason is in the service's log now, once per change, not every 30 s)."""
    if getattr(request.app.state, "unready", None) != code:
        log.warning("not ready: %s (%s)", code, message)
        request.app.state.unready = code
    return error_response(503, code, message, {"Retry-After": retry_after})


def _probe(state) -> None:
    with state.batcher.gate.interactive():
        state.qc.run([WARM_UP])


@router.get("/metrics", summary="Prometheus metrics (an API key or a scrape-only key, CERVIXQC_METRICS_KEYS)",
            dependencies=[MetricsKey], responses=UNAUTHORIZED, response_class=Response)
def metrics(request: Request) -> Response:
    # Plain `def`, in the thread pool: a scrape reads the job store and the folders' free space
    # (statvfs), and on a hung network share that held the event loop, every upload and health
    # check with it. (A comment: a docstring here was the route's description in /docs.)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
