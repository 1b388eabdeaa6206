"""A byte limit on the whole request body, enforced while it streams in.

Starlette puts no limit on a body and spools multipart files to disk, so a client could fill
the disk before any handler runs. This ASGI middleware refuses a declared Content-Length
over the limit at once, and stops a chunked or lying body at the first byte past it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, on_too_large: Callable[[], None] = lambda: None) -> None:
        """`on_too_large`: called for each request refused for its size (a metrics counter)."""
        self.app, self.max_bytes, self.on_too_large = app, max_bytes, on_too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send, f"request body over {self.max_bytes} bytes" if declared.isdigit()
                               else "invalid Content-Length", 413 if declared.isdigit() else 400)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"request body over {self.max_bytes} bytes")
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

    async def _refuse(self, send: Send, message: str, status: int) -> None:
        code = "payload_too_large" if status == 413 else "bad_request"
        if status == 413:
            self.on_too_large()
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
