"""A byte limit on the whole request body, enforced while it streams in, and a limit on how
long the body may stop arriving.

Starlette puts no limit on a body and spools multipart files to disk, so a client could fill
the disk before any handler runs. This ASGI middleware refuses a declared Content-Length
over the limit at once, and stops a chunked or lying body at the first byte past it. A body
that stops arriving for `idle_s` (as nginx's client_body_timeout: between two reads, so a
slow link is never cut while it sends) ends in BodyStalled: a client that stalled mid-upload
held its spooled part of the temporary folder for ever, unanswered (an audit).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.root_path import route_path


def _over(limit: int) -> str:
    """The limit in bytes and in MiB or KiB: the upload page showed "over 67108864 bytes" (an audit)."""
    human = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit / 2**10:g} KiB"
    return f"request body over {limit} bytes ({human})"


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
    pass


# The routes that take photos; every other body (a job's JSON, a review decision, a sign-in
# form) is small. FastAPI reads and parses a route's body before its dependencies run, the key
# check among them: with the photos' limit on every route, one 60 MB JSON body sent without a
# key took 1.6 GB of the service's memory and held the event loop 2 s before its 401 (an audit).
UPLOAD_ROUTES = frozenset({"/v1/qc", "/ui/upload"})
SMALL_BODY_BYTES = 64 * 1024


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, on_too_large: Callable[[], None] = lambda: None,
                 idle_s: float | None = None, on_stalled: Callable[[], None] = lambda: None,
                 small_bytes: int = SMALL_BODY_BYTES) -> None:
        """`max_bytes` for the photo uploads (UPLOAD_ROUTES), `small_bytes` (at most that) for
        every other route. `on_too_large`, `on_stalled`: called for each request refused for its
        size, or whose body stopped arriving for `idle_s` (metrics counters)."""
        self.app, self.max_bytes, self.on_too_large = app, max_bytes, on_too_large
        self.small_bytes = min(small_bytes, max_bytes)
        self.idle_s, self.on_stalled = idle_s, on_stalled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes if route_path(scope) in UPLOAD_ROUTES else self.small_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if declared.isdigit():
                self.on_too_large()
            await self._refuse(send, _over(limit) if declared.isdigit()
                               else "invalid Content-Length", 413 if declared.isdigit() else 400)
            return
        seen = 0
        started = body_done = False

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if self.idle_s is None or body_done:  # after the body: waiting for a hang-up, for as long as it takes
                message = await receive()
            else:
                try:  # a timeout scope, not wait_for: no task made for each chunk of every upload
                    async with asyncio.timeout(self.idle_s):
                        message = await receive()
                except TimeoutError:
                    self.on_stalled()
                    raise BodyStalled(f"the upload stopped arriving for {self.idle_s:g} s "
                                      "(CERVIXQC_UPLOAD_IDLE_TIMEOUT_S)") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:  # counted here: the app's handler for it answers, not this middleware
                    self.on_too_large()
                    raise BodyTooLarge(_over(limit))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:
            if not started:
                await self._refuse(send, str(e), 413)
        except BodyStalled as e:
            if not started:
                await self._refuse(send, str(e), 408)

    async def _refuse(self, send: Send, message: str, status: int) -> None:
        code = {413: "payload_too_large", 408: "upload_timeout"}.get(status, "bad_request")
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
