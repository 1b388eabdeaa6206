"""POST /v1/qc: one or many images in, one result per file out, in order.

A file that cannot be read gets its own `unreadable` result with the reason, and the rest
of the request is labelled as usual (200). Only when no file at all could be read is the
answer an error (422 `unreadable`, with the per-file results), so a client that sends one
bad image gets a 4xx, as it would from any image API.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from pipelines.engine.qc_result import Label
from service.auth import ApiKey
from service.batcher import QueueFull
from service.errors import ApiError
from service.schemas import ErrorResponse, QCResponse, UploadResult
from service.state import State

router = APIRouter(prefix="/v1", tags=["qc"], dependencies=[ApiKey])

_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}}}}}
_ERRORS: dict[int | str, dict] = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 503, 504)}
# a request valid by schema can still carry no readable image: the schema cannot say "a
# decodable image of at least 16x16 px", so the answer is documented here and in the summary
_ERRORS[422] = {"model": ErrorResponse, "description": "no file could be read as an image (not an image, truncated, "
                                                       "or smaller than 16x16 px); `results` gives each file's reason"}


@router.post("/qc", response_model=QCResponse, openapi_extra=_UPLOAD_BODY, responses=_ERRORS,
             summary="Label uploaded images: regular, non_regular (green/iodine), no_cervix, unreadable")
async def qc_upload(request: Request, state: State) -> QCResponse:
    s, metrics = state.settings, state.metrics
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send images as multipart/form-data, field 'files'")
    form = await request.form(max_files=s.max_files_per_request, max_fields=s.max_files_per_request)
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ApiError(400, "no_files", "no file in the request (multipart field 'files')")
        # refused before the files are read into memory: the form keeps them spooled on disk, and
        # an overloaded service should not also hold every refused request's images in RAM
        full = state.batcher.room_for(len(files), sum(f.size or 0 for f in files))
        if full:
            raise _overloaded(state, full)
        items = [(await f.read(), f.filename or f"file{i}") for i, f in enumerate(files)]
    finally:
        await form.close()
    try:
        futures = state.batcher.submit(items)  # checked again: other requests queued while these were read
    except QueueFull as e:
        raise _overloaded(state, e.reason) from None
    try:
        results = await asyncio.wait_for(asyncio.gather(*futures), s.request_timeout_s)
    except TimeoutError:
        for f in futures:
            f.cancel()
        metrics.rejected.labels("timeout").inc()
        raise ApiError(504, "timeout", f"not answered within {s.request_timeout_s:g} s") from None
    for r in results:
        metrics.images.labels(r.label.value, "upload").inc()
    out = [UploadResult.of(r) for r in results]
    if all(r.label == Label.UNREADABLE for r in results):
        reasons = "; ".join(f"{r.filename}: {r.error}" for r in out)
        raise ApiError(422, "unreadable", f"no file could be read as an image ({reasons})",
                       results=[r.model_dump(mode="json") for r in out])
    return QCResponse(results=out)


def _overloaded(state, reason: str = "overload") -> ApiError:
    state.metrics.rejected.labels(reason).inc()  # "overload": images; "queue_bytes": their bytes
    return ApiError(503, "overloaded", "the queue is full; retry later",
                    {"Retry-After": str(state.batcher.retry_after_s())})
