"""The service under a path prefix, behind a reverse proxy that strips it (nginx
`location /cervixqc/ { proxy_pass http://127.0.0.1:8000/; }`).

`CERVIXQC_ROOT_PATH` is set as uvicorn's `--root-path` sets it (scope `root_path`, prefixed
`path`), for however the app is started: `cervixqc serve`, a bare uvicorn, the container; a
server's own `--root-path` wins. Routing, the pages' security headers and the 405's `Allow`
read the path without it (`route_path`); the pages build their links on it (`base` in the
templates, `data-base` for the scripts). Redirects are written as the routes know them (`/ui/jobs`)
and prefixed here, on their way out, the way nginx's `proxy_redirect` would: one place rather
than a prefix at each of a dozen redirects, where the one forgotten sends a reviewer out of
the proxy's location (measured behind nginx: the sign-in form posted to /ui/login, 403)."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# what a prefix may hold: it goes into links, a cookie's path and the Location header unescaped
ROOT_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)*")


def route_path(scope: Scope) -> str:
    """The path the routes match: without the prefix (as Starlette's router strips it; its
    own function is private)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


class RootPath:
    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app, self.root = app, root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if self.root and not scope.get("root_path"):
            # in place: the request-metrics middleware outside this one reads the route the router
            # records in the scope (on a copy, every request was counted "unmatched")
            raw = scope.get("raw_path")
            scope.update(root_path=self.root, path=self.root + scope["path"],
                         raw_path=None if raw is None else self.root.encode() + raw)
        root = scope.get("root_path", "").encode()
        if not root:
            await self.app(scope, receive, send)
            return

        async def prefixed(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [(k, root + v if k == b"location" and v[:1] == b"/" and v[:2] != b"//" else v)
                                      for k, v in message.get("headers", [])]
            await send(message)

        await self.app(scope, receive, prefixed)
