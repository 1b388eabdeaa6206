"""POST /v1/qc: one or many images in, one result per file out, in order.

A file that cannot be read gets its own `unreadable` result with the reason, and the rest
of the request is labelled as usual (200). Only when no file at all could be read is the
answer an error (422 `unreadable`, with the per-file results), so a client that sends one
bad image gets a 4xx, as it would from any image API.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from email.message import Message

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message as AsgiMessage
from starlette.types import Receive

from pipelines.engine.qc_result import Label
from service.auth import ApiKey
from service.batcher import QueueFull
from service.errors import ApiError
from service.media_type import MULTIPART, media_type
from service.schemas import ErrorResponse, QCResponse, UploadResult
from service.state import State

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["qc"], dependencies=[ApiKey])

_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}}}}}
_ERRORS: dict[int | str, dict] = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 503, 504)}
# a request valid by schema can still carry no readable image: the schema cannot say "a
# decodable image of at least 16x16 px", so the answer is documented here and in the summary
_ERRORS[422] = {"model": ErrorResponse, "description": "no file could be read as an image (not an image, truncated, "
                                                       "or smaller than 16x16 px); `results` gives each file's reason"}


def document_upload_limit(doc: dict, max_files: int) -> dict:
    """`doc` (the app's OpenAPI document) with the most files a request may carry as the upload's
    `maxItems`. The limit is a setting, read at start, so the route's static schema cannot hold
    it; without it a request of 21 files was valid by the schema and refused with 413 at a limit
    of 20 (schemathesis's check that schema-valid requests are accepted found it). Idempotent."""
    body = doc["paths"]["/v1/qc"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    body["properties"]["files"]["maxItems"] = max_files
    return doc


@router.post("/qc", response_model=QCResponse, openapi_extra=_UPLOAD_BODY, responses=_ERRORS,
             summary="Label uploaded images: regular, non_regular (green/iodine), no_cervix, unreadable")
async def qc_upload(request: Request, state: State) -> QCResponse:
    s, metrics = state.settings, state.metrics
    if media_type(request) != MULTIPART:
        raise ApiError(415, "unsupported_media_type", "send images as multipart/form-data, field 'files'")
    end = ClosingDelimiter(request.headers["content-type"], request.receive)
    try:
        form = await Request(request.scope, end.receive).form(max_files=s.max_files_per_request,
                                                              max_fields=s.max_files_per_request)
    except ClientDisconnect:
        raise _client_gone(state) from None
    except HTTPException as e:  # Starlette's 400 for a form it would not read
        raise _form_refused(e, s.max_files_per_request) from None
    except OSError as e:  # a file over 1 MB is spooled to the temporary folder, which may be full
        raise _no_room(state, e) from None
    reservation = None
    try:
        if not end.seen:
            raise ApiError(400, "invalid_multipart", "the upload ended before the multipart body's closing boundary "
                                                     "(--BOUNDARY--): it was cut short, and nothing was labelled; "
                                                     "send it again")
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ApiError(400, "no_files", "no file in the request (multipart field 'files')")
        if len(files) > state.batcher.max_queue:  # never fits: 503 and Retry-After sent clients round for ever
            raise ApiError(413, "too_many_files", f"{len(files)} images in one request; this service queues at "
                                                  f"most {state.batcher.max_queue} (CERVIXQC_MAX_QUEUE): send fewer")
        # room taken before the files are read into memory: the form keeps them spooled on disk,
        # and an overloaded service should not also hold every refused request's images in RAM
        try:
            reservation = state.batcher.reserve(len(files), sum(f.size or 0 for f in files))
        except QueueFull as e:
            raise _overloaded(state, e.reason) from None
        items = [(await f.read(), f.filename or f"file{i}") for i, f in enumerate(files)]
        futures = state.batcher.submit(items, reservation)
    except BaseException:
        if reservation is not None:
            reservation.cancel()
        raise
    finally:
        await form.close()
    answered = asyncio.gather(*futures)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((answered, gone), timeout=s.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not answered.done():  # timed out, or the client hung up: its images leave the queue now
        answered.cancel()
        # read once cancelled: gather stores its children's CancelledError as an exception, and
        # asyncio logged each hang-up as a 3-line "exception was never retrieved" ERROR
        answered.add_done_callback(lambda f: f.cancelled() or f.exception())
        if gone.done() and not gone.cancelled():
            raise _client_gone(state)
        metrics.rejected.labels("timeout").inc()
        raise ApiError(504, "timeout", f"not answered within {s.request_timeout_s:g} s")
    results = answered.result()
    for r in results:
        metrics.images.labels(r.label.value, "upload").inc()
    out = [UploadResult.of(r) for r in results]
    if all(r.label == Label.UNREADABLE for r in results):
        reasons = "; ".join(f"{r.filename}: {r.error}" for r in out)
        raise ApiError(422, "unreadable", f"no file could be read as an image ({reasons})",
                       results=[r.model_dump(mode="json") for r in out])
    return QCResponse(results=out)


class ClosingDelimiter:
    """Watches a multipart body go by for its close delimiter (`--BOUNDARY--`). The parser
    beneath Starlette ends without a word when the body stops early: two files sent without
    the closing line got 200 with one result, and one file cut short got "no file in the
    request" (an audit). A body that never shows the delimiter was cut short (RFC 2046 puts
    only an epilogue after it). Without a boundary in the header there is nothing to watch,
    and Starlette's parser refuses the form itself."""

    def __init__(self, content_type: str, receive: Receive) -> None:
        header = Message()
        header["content-type"] = content_type
        boundary = header.get_param("boundary")
        self.delimiter = b"--" + str(boundary).encode("latin-1", "replace") + b"--" if boundary else b""
        self.seen = not self.delimiter
        self._tail = b""
        self._receive = receive

    async def receive(self) -> AsgiMessage:
        message = await self._receive()
        if message["type"] == "http.request" and not self.seen:
            window = self._tail + message.get("body", b"")
            self.seen = self.delimiter in window
            self._tail = window[-(len(self.delimiter) - 1):]  # a delimiter split across two chunks
        return message


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up. The body is read by now, so the next ASGI message is
    the disconnect: clients that gave up and retried had every abandoned copy run, and under a
    burst 16 of 64 got answers while the engine ran 240 images."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client_gone(state) -> ApiError:
    """Counted apart, not logged as the service's error: a clinic's flaky network hung up
    mid-upload, and each one was an ERROR line and a 500 in the metrics."""
    state.metrics.rejected.labels("client_closed").inc()
    return ApiError(499, "client_closed", "the client closed the connection before the answer")


def _overloaded(state, reason: str = "overload") -> ApiError:
    state.metrics.rejected.labels(reason).inc()  # "overload": images; "queue_bytes": their bytes
    return ApiError(503, "overloaded", "the queue is full; retry later",
                    {"Retry-After": str(state.batcher.retry_after_s())})


def _no_room(state, e: OSError) -> ApiError:
    """The upload could not be spooled: a bare 500 "internal error" for every photo over 1 MB
    while the temporary folder (TMPDIR; in a container, the host's disk) was full (an audit)."""
    state.metrics.rejected.labels("no_space").inc()
    folder = tempfile.gettempdir()
    log.warning("upload refused: the temporary folder %s cannot take it (%s)", folder, e.strerror or type(e).__name__)
    return ApiError(503, "no_space", f"the service's temporary folder cannot hold this upload ({e.strerror or e}); "
                                     "retry later", {"Retry-After": "30"})


def _form_refused(e: HTTPException, max_files: int) -> ApiError:
    """Starlette says "Invalid multipart data." for every error of the parser beneath it, so a
    photo named with more than 4 KB (a header line of python-multipart's part) was refused
    without a reason; the parser's own goes with it. Too many files names the setting."""
    if str(e.detail).startswith("Too many files"):
        return ApiError(413, "too_many_files", f"more than {max_files} files in one request "
                                               "(CERVIXQC_MAX_FILES_PER_REQUEST): send fewer")
    if str(e.detail).startswith("Too many fields"):  # the form's other fields, held to the same number
        return ApiError(400, "invalid_multipart", f"more than {max_files} form fields; send the photos as 'files' "
                                                  "and nothing else")
    parser = e.__context__.__cause__ if e.__context__ is not None else None
    reason = str(parser or e.detail)
    if "header size" in reason:
        reason += " (a part's header line over 4 KB: a file name that long?)"
    return ApiError(400, "invalid_multipart", f"the multipart body could not be read: {reason}")
