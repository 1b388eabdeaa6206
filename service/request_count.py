"""Every request counted and timed for /metrics, and an exception no handler answered made the
one logged 500, as plain ASGI middleware.

It was `@app.middleware("http")`. Starlette's BaseHTTPMiddleware ends a streamed body it wraps
with a normal close when the stream fails, and raises only after that: a results download
broken off by its job's delete reached the client as a shorter file that looked whole (200, a
clean chunked end, curl exit 0, 1,000 of 1,500 lines: an audit). Here a failure after the
headers goes on to uvicorn, which drops the connection, so the client sees an incomplete
transfer (service/errors.py, StreamBrokenOff).
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import KNOWN_METHODS, internal_error, route_label
from service.metrics import Metrics


class RequestCount:
    def __init__(self, app: ASGIApp, routes: FastAPI, metrics: Metrics) -> None:
        """`routes`: the FastAPI app whose routes name a request in /metrics (`route_label`)."""
        self.app, self.routes, self.metrics = app, routes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t, status, started = time.perf_counter(), 500, False

        async def counted(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception as e:  # noqa: BLE001 - answered here, so it is counted and logged once
            if started:  # past the headers: only a dropped connection tells the client
                raise
            # else Starlette logged the traceback, re-raised it and uvicorn logged it again, with
            # the file paths exception messages carry, and the 500 reached no counter
            response = internal_error(Request(scope), e)
            await response(scope, receive, send)
            status = response.status_code
        finally:
            request = Request(scope)
            route = route_label(self.routes, request)
            # the method as a label only when it is one of HTTP's: uvicorn takes any token, and
            # each new word was a new series, kept for good (no key is needed to send one)
            method = request.method if request.method in KNOWN_METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t)
