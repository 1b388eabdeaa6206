"""What `cervixqc serve` does about connections that never finish their request headers.

Uvicorn times a connection out only between requests (`timeout_keep_alive`), never while its
headers arrive, and the service's own limits (service/limits.py) start with the body. So a
client that opened connections and sent half a header held them for ever. Measured (an audit,
2026-12-05): 306 such connections against a service whose open-file limit was 256 (Docker's
soft default is 1,024) left it answering nothing, not even /healthz, for as long as they stayed
open, while asyncio's accept loop logged "socket.accept() out of system resource" about 5,800
times a second (169 MB of log in a minute: a full disk within a day).

Three parts, each covering what the others cannot:
- `header_deadline_protocol`: uvicorn's own h11 protocol with a deadline on each request's
  headers, as nginx's `client_header_timeout`: 408 with the service's JSON error body where
  some of a request had arrived, a plain close where nothing had;
- `raise_open_files_limit`: the soft open-file limit raised to the hard one, so a burst of
  connections runs out of time before it runs out of descriptors;
- `AcceptErrorFilter`: the accept loop's error at most once per `every_s`, with the count it
  stood for, should the descriptors run out anyway.
"""

from __future__ import annotations

import json
import logging
import resource
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol whose requests must finish their headers within `timeout_s` of their
    first byte (of the connection, for the first request). A request in progress is never cut
    (its body has UPLOAD_IDLE_TIMEOUT_S), nor an idle keep-alive connection (uvicorn's own
    keep-alive timeout closes those)."""
    body = json.dumps({"error": {"code": "header_timeout", "message": (
        f"the request's headers did not arrive within {timeout_s:g} s (CERVIXQC_HEADER_TIMEOUT_S)")}}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n" % len(body)) + body

    class HeaderDeadlineH11(H11Protocol):
        _deadline: object = None
        _bytes_waiting = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                if self._deadline is None:  # the next request's first byte on a kept-alive connection
                    self._arm()
                self._bytes_waiting = True  # after arming, which clears it
            super().data_received(data)
            if not self._between_requests():  # its headers are in: the request is the app's now
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._bytes_waiting = False
            self._deadline = self.loop.call_later(timeout_s, self._late, self.cycle)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()  # type: ignore[attr-defined]
                self._deadline = None

        def _late(self, cycle_when_armed) -> None:
            self._deadline = None
            if self.cycle is not cycle_when_armed or not self._between_requests() or self.transport.is_closing():
                return
            log.debug("closed a connection whose request headers took over %g s", timeout_s)
            if self._bytes_waiting:
                self.transport.write(answer)
            self.transport.close()

    return HeaderDeadlineH11


def raise_open_files_limit() -> None:
    """The soft open-file limit raised to the hard one, where the hard one allows more. Servers
    such as nginx (`worker_rlimit_nofile`) do the same."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. a kernel cap (nr_open) under an unlimited hard limit
            pass


class AcceptErrorFilter(logging.Filter):
    """For the `asyncio` logger. CPython's accept loop (3.11 and 3.12) logs its failure once
    per pending connection of the listen backlog (uvicorn's: 2,048) on every try while the
    descriptors are out; one line per `every_s` says as much, with how many it stood for."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s, self._last, self._held = every_s, float("-inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.MESSAGE):  # its next line names the socket
            return True
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._held += 1
            return False
        held, self._last, self._held = self._held, now, 0
        record.msg = (f"{self.MESSAGE}: the open files are used up (connections held open? CERVIXQC_HEADER_TIMEOUT_S); "
                      f"{held} such lines held back before this one, the next {self.every_s:g} s's held back too")
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def quiet_accept_errors(every_s: float = 10.0) -> None:
    """Installs one AcceptErrorFilter on the `asyncio` logger (again: no second one)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptErrorFilter) for f in logger.filters):
        logger.addFilter(AcceptErrorFilter(every_s))
