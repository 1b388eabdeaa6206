"""Every error leaves the service as JSON `{"error": {"code", "message"}}` with a 4xx status
(5xx only for overload, timeouts and our own faults), whatever raised it: FastAPI's
validation, Starlette's HTTP errors, multipart parsing, or our own `ApiError`."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from service.limits import BodyStalled, BodyTooLarge
from service.root_path import route_path

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "upload_timeout", 409: "conflict",
               413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests",
               503: "unavailable", 504: "timeout"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **extra: object) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: object) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _documented(app: FastAPI, path: str) -> Iterator[tuple[str, dict]]:
    """The OpenAPI document's path templates that `path` fills, with their operations."""
    for template, operations in app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
            yield template, operations


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at `path`, asked of the routes themselves (Starlette's
    public `matches`). Starlette's 405 names only the methods of the first route matching the
    path, so `/v1/jobs` (POST and GET in two routes) answered `Allow: POST`; read from the
    OpenAPI document instead (the version before), the pages and /docs, which it leaves out,
    answered an empty Allow (an audit)."""
    methods = set()
    for method in KNOWN_METHODS:
        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
        if any(route.matches(scope)[0] == Match.FULL for route in app.routes):
            methods.add(method)
    return sorted(methods)


def route_label(app: FastAPI, request: Request) -> str:
    """The route a request is counted under in /metrics: the one that answered it, or for one
    refused before routing (a body over the limit by its Content-Length: `BodyLimitMiddleware`)
    the documented route it was sent to; their 413s were all counted under "unmatched". A file
    of a mounted folder (the pages' scripts, the offline docs' assets) under the mount's path and
    `{path}`: the router records no route for a mount, only its app (`endpoint`), and a page's
    scripts and styles were all counted "unmatched" beside the unknown paths (an audit)."""
    route = getattr(request.scope.get("route"), "path", None)
    endpoint = request.scope.get("endpoint")
    if route is None and endpoint is not None:
        route = next((f"{r.path}/{{path}}" for r in app.routes if isinstance(r, Mount) and r.app is endpoint), None)
    if route is None:
        method = request.method.lower()
        route = next((t for t, operations in _documented(app, route_path(request.scope)) if method in operations), None)
    return route or "unmatched"


def validation_message(e: RequestValidationError | ValidationError) -> str:
    """Each problem as `where: what`. A body that is not JSON is said so, with pydantic's reason:
    its character offset stood where a field goes ("body.17: JSON decode error", an audit)."""
    problems = []
    for err in e.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            problems.append(f"the body is not valid JSON ({reason} at character {loc[-1]})" if reason and len(loc) > 1
                            else "the body is not valid JSON")
        else:
            problems.append(f"{'.'.join(loc)}: {err.get('msg')}")
    return "; ".join(problems) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers, **e.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", validation_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI reads a JSON body itself and turns whatever stopped it into a 400 "error
        # parsing the body": a JSON job request over the limit, or stalled, got that, while the
        # metrics counted a 413 or 408, and a body not in UTF-8 was not called that (an audit)
        if isinstance(e.__cause__, BodyTooLarge):
            return await _too_large(request, e.__cause__)
        if isinstance(e.__cause__, BodyStalled):
            return await _stalled(request, e.__cause__)
        if e.status_code == 400 and isinstance(e.__cause__, UnicodeDecodeError):
            return error_response(400, "bad_request", "the body is not UTF-8 text: send the job as JSON in UTF-8")
        headers = dict(e.headers or {})
        if e.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, route_path(request.scope)))
        return error_response(e.status_code, _HTTP_CODES.get(e.status_code, "error"), str(e.detail), headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, e: BodyTooLarge) -> JSONResponse:
        return error_response(413, "payload_too_large", str(e), {"Connection": "close"})

    @app.exception_handler(BodyStalled)
    async def _stalled(_: Request, e: BodyStalled) -> JSONResponse:
        return error_response(408, "upload_timeout", str(e), {"Connection": "close"})

    @app.exception_handler(sqlite3.OperationalError)
    async def _store_busy(_: Request, e: sqlite3.OperationalError) -> JSONResponse:
        """The job store locked past its busy timeout by another writer (a long duplicate
        write, a backup tool), or failing: nothing was changed, and the client may retry."""
        log.warning("job store unavailable (%s)", e)
        return error_response(503, "store_unavailable", f"the job store is busy or failing ({e}); retry shortly",
                              {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return internal_error(request, e)


class StreamBrokenOff(Exception):
    """A streamed body that failed after its 200 was sent: the connection is dropped (the
    client sees an incomplete transfer, not a shorter file that looks whole)."""


def guarded_stream(lines: Iterator[str], what: str) -> Iterator[str]:
    """`lines` with a failure logged once, by its kind (an OSError's message names the file),
    and re-raised as StreamBrokenOff without it: uvicorn printed the original with its
    traceback, patient file names and all."""
    try:
        yield from lines
    except Exception as e:  # noqa: BLE001 - any failure past the headers
        log.error("%s broke off (%s)", what, type(e).__name__)
        log.debug("%s broke off", what, exc_info=e)
        raise StreamBrokenOff(what) from None


def internal_error(request: Request, e: Exception) -> JSONResponse:
    """The 500 for an exception no handler knew, logged once by its kind and route: exception
    messages carry file paths (an OSError, a link loop), so the traceback goes to DEBUG only."""
    route = getattr(request.scope.get("route"), "path", "an unmatched path")
    log.error("unexpected error (%s) on %s", type(e).__name__, route)
    log.debug("unexpected error", exc_info=e)
    return error_response(500, "internal_error", "internal error; the service is still running")
