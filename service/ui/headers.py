"""Security and cache headers for the pages (`/ui`): they show patient photos and hold buttons
that change labels and quarantines.

- Content-Security-Policy: scripts from the service only (the pages' one inline `<script>` each
  is JSON data, which a CSP does not run), no framing (a page of another port or subdomain of
  the hospital's host could frame the review page and steer clicks on Apply), forms posting
  back to the service only. The API docs pages (Swagger UI and ReDoc run inline scripts and
  workers) get every header but the CSP.
- Cache-Control: no-store on everything but the static assets: photos, exports and pages
  stayed in a shared clinic computer's browser cache after sign-out.

A pure ASGI middleware rather than FastAPI's `@app.middleware("http")`: it touches only the
response's first message, and the API's routes pay nothing but a prefix check.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.root_path import route_path

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
COMMON = ((b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
          (b"referrer-policy", b"same-origin"))
NO_CSP = ("/ui/docs", "/ui/redoc")


class PageHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""  # under a prefix too
        if not path.startswith("/ui"):
            await self.app(scope, receive, send)
            return
        extra = list(COMMON)
        if path not in NO_CSP:
            extra.append((b"content-security-policy", CSP.encode()))
        no_store = not path.startswith("/ui/static/")
        if no_store:
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # a route's own Cache-Control (the photos' "private, max-age") gives way to no-store
                headers = [(k, v) for k, v in message.get("headers", [])
                           if not (no_store and k.lower() == b"cache-control")]
                names = {k.lower() for k, _ in headers}
                message["headers"] = headers + [h for h in extra if h[0] not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)
