"""A small app with the service's RequestCount around a streamed body that fails after its first
chunk and a route that raises: what tests/test_request_count.py serves with uvicorn."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from prometheus_client import generate_latest

from service.errors import guarded_stream
from service.metrics import Metrics
from service.request_count import RequestCount


def create_app() -> FastAPI:
    app, metrics = FastAPI(), Metrics()

    @app.get("/ok")
    def ok() -> dict:
        return {"ok": True}

    @app.get("/broken")
    def broken() -> StreamingResponse:
        def lines():
            yield "a row of results\n" * 1000
            raise OSError("the job's rows went away")  # as a job deleted while its results stream

        return StreamingResponse(guarded_stream(lines(), "a test stream"), media_type="text/plain")

    @app.get("/fails")
    def fails() -> None:
        raise RuntimeError("a fault of ours")

    @app.get("/metrics")
    def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type="text/plain")

    app.add_middleware(RequestCount, routes=app, metrics=metrics)
    return app
