"""Liveness, readiness (models loaded, batcher and job runner alive) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import UNAUTHORIZED, ApiKey
from service.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up (no auth)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Models loaded and workers running (no auth)",
            responses={503: {"description": "not ready"}})
async def readyz(request: Request):
    state = getattr(request.app.state, "service", None)
    if state is None or not state.runner.alive():
        return error_response(503, "not_ready", "models loading or job runner stopped", {"Retry-After": "5"})
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", dependencies=[ApiKey], responses=UNAUTHORIZED,
            response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
