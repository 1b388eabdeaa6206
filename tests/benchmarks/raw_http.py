"""A lean HTTP/1.1 upload client for the load benchmark: each request built (by httpx) before
the clock starts, one keep-alive connection per client, each response read by its length.

Why not httpx's own client for the timed part: the clients run on the two cores the service
runs on, and httpx took 2.2 to 4.5 ms of CPU a request (its request building, pool and parser)
against 0.16 to 0.19 ms for this, measured side by side against one service on 2026-12-03
(`client_cpu_ms` in the benchmark's output). Remote clients take none of the service's cores:
the lighter the generator, the nearer the figure is to a site's. `--client httpx` keeps the
other for comparison."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx


def upload_requests(url: str, key: str, images: list[tuple[str, bytes]], path: str = "/v1/qc") -> list[bytes]:
    """One single-file multipart upload per image, as bytes on the wire (httpx encodes the form)."""
    host = urlsplit(url).netloc
    out = []
    for name, data in images:
        req = httpx.Request("POST", url + path, files={"files": (name, data, "image/jpeg")})
        body = req.read()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
                f"Content-Type: {req.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n")
        out.append(head.encode() + body)
    return out


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        return cls(*await asyncio.open_connection(parts.hostname, parts.port))

    async def send(self, request: bytes) -> int:
        """The response's status; its body is read and dropped."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 "):  # the last response's body not all read, or not HTTP
            raise RuntimeError(f"not a status line: {lines[0][:80]!r}")
        fields = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        if b"content-length" not in fields:
            raise RuntimeError(f"response without a Content-Length: {lines[0]!r}")
        await self.reader.readexactly(int(fields[b"content-length"]))
        return int(lines[0].split(b" ", 2)[1])

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
