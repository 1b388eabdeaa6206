"""Review of a job: the grid, one image with keys and a box to drag, its picture, decisions
and undo, and the exports. Items are named by row id; a client never names a file.

The routes are plain `def` (FastAPI's thread pool): they read the job store and decode
pictures, and in an `async def` an 81 MP photo's thumbnail held every other request for 4 s."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from pipelines.data.opened import NotAllowed
from pipelines.data.schema import on_disk
from pipelines.engine.qc_result import QCResult
from service.errors import ApiError, guarded_stream
from service.jobs.folders import remove_job_folders
from service.jobs.reviews import CLASSES, JobGone, Stale, class_of, final_of
from service.jobs.store import Job, JobDeleted
from service.paths import inside, within
from service.routes.jobs import job_not_found, job_or_404
from service.state import ServiceState, State
from service.ui.deps import UiPost, UiSession, page
from service.ui.export import apply_to_quarantine, coco_of, manifest_lines
from service.ui.images import UNWRITABLE, NotShown, cached
from service.ui.review_view import GridQuery, Thresholds, build_grid, neighbours, source_of

router = APIRouter(prefix="/ui/jobs/{job_id}", include_in_schema=False)
# one Apply at a time: quarantines are the process's alone (one service per state folder)
_APPLYING = threading.Lock()


def _number(text: str | None) -> float | None:
    """A filter box left empty arrives as '' (a plain GET form sends every field)."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ApiError(422, "invalid_request", f"not a number: {text!r}") from None


def _grid_query(label: str | None = None, kind: str | None = None, source: str | None = None,
                score_min: str | None = None, score_max: str | None = None,
                reviewed: Literal["", "yes", "no"] | None = None,
                page_no: int = Query(1, alias="page", ge=1),
                after: int | None = Query(None, ge=1, le=2**63 - 1)) -> GridQuery:
    """The grid's filter from the query string: the review page's form, carried on to the image
    page so that previous/next walk the same filtered order."""
    return GridQuery(label or None, kind or None, source or None, _number(score_min), _number(score_max),
                     {"yes": True, "no": False}.get(reviewed or ""), page_no, after)


GridFilter = Annotated[GridQuery, Depends(_grid_query)]


# a row id as SQLite stores it: 2**63 and up raised OverflowError in the store, a 500
ItemId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


def result_token(record: QCResult) -> str:
    """What an item's page showed of the job's result, which its decisions must still be over.
    The review's version (`seen`) counts decisions only, and a retry reads a photo that could
    not be read again and rewrites its result under the same item: a page loaded before (no
    photo shown, "unreadable") confirmed "unreadable" over the new green result, 200, and Apply
    copied the photo as unreadable (an audit)."""
    text = f"{record.label.value}|{record.kind}|{record.cervix_box}|{record.error}"
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _result_unchanged(record: QCResult, shown: str | None) -> None:
    if shown is not None and shown != result_token(record):
        raise ApiError(409, "changed_since_loaded", "the job read this photo again after this page was loaded (a "
                                                     "retry), and its result changed: reload the page to see it")


def _item(state: ServiceState, job: Job, item: int) -> QCResult:
    record = state.store.item(job.id, item)
    if record is None:
        raise ApiError(404, "item_not_found", f"job {job.id} has no item {item}")
    return record


@router.get("/review")
def review_page(request: Request, job_id: str, session: UiSession, state: State, q: GridFilter):
    job = job_or_404(state, job_id)
    t = Thresholds.of(state.qc, job.policy)
    grid = build_grid(state.views.get(job_id, t), state.reviews.reviewed(job_id), t, q)
    filters = urlencode([(k, v) for k, v in request.query_params.multi_items() if k not in ("page", "after", "applied")])
    # only the counts apply-review's redirect writes: any other text in a link would have shown
    # on our page as the service's own message ("Applied: call this number ...")
    applied = re.fullmatch(r"(\d{1,12})-(\d{1,12})-(\d{1,12})(?:-(\d{1,12})-(\d{1,12}))?(?:-(\d{1,12}))?",
                           request.query_params.get("applied", ""))
    return page(request, "review.html", session, job=job, grid=grid, q=q, t=t, query=filters,
                applied=applied.groups() if applied else None)


@router.get("/scores.json")
def scores(job_id: str, session: UiSession, state: State) -> Response:
    """The what-if histogram's data: both stage-2 scores of every cropped item, the thresholds
    and the policy, so the page recounts labels exactly as the engine would decide them."""
    t = Thresholds.of(state.qc, job_or_404(state, job_id).policy)
    return Response(state.views.get(job_id, t).what_if_json, media_type="application/json")


@router.get("/items/{item}")
def item_page(request: Request, job_id: str, item: ItemId, session: UiSession, state: State, q: GridFilter):
    job = job_or_404(state, job_id)
    record = _item(state, job, item)
    # the version before what it versions: a change between the reads makes the page's next
    # decision a 409, never one taken over a change the page does not show
    seen = state.reviews.version(job_id, item)
    live = state.reviews.reviewed(job_id)
    t = Thresholds.of(state.qc, job.policy)
    prev, nxt = neighbours(state.views.get(job_id, t), live, t, q, item)
    cls, box = final_of(record, live.get(item))
    return page(request, "item.html", session, job=job, item=item, r=record, review=live.get(item),
                model_cls=class_of(record.label.value, record.kind), final_cls=cls, final_box=box,
                history=state.reviews.history(job_id, item), seen=seen, shown=result_token(record), prev=prev,
                next=nxt, query=request.url.query, t=t, source=source_of(record.path))


@router.get("/items/{item}/{size}.jpg")
def item_image(job_id: str, item: ItemId, size: Literal["thumb", "full"], session: UiSession,
               state: State) -> Response:
    job = job_or_404(state, job_id)
    original = on_disk(job.root(), _item(state, job, item).path)
    # the runner's own rule (a manifest may name absolute paths), checked again at every request:
    # the file may have become a link out of the roots since the job read it
    if not inside(original, state.settings.data_roots):
        raise ApiError(403, "path_forbidden", "this item's file is outside the allowed data roots")
    try:  # and on the file opened, which a link swapped since the check above may have put outside
        picture = cached(state.settings.thumbs_dir, job_id, item, size, original, state.qc.cfg.limits,
                         within(state.settings.data_roots))
    except NotAllowed:
        raise ApiError(403, "path_forbidden", "this item's file is outside the allowed data roots") from None
    except NotShown as e:
        raise ApiError(404, "no_picture", str(e)) from None
    except FileNotFoundError:  # its folder removed by a delete while it was drawn
        job_or_404(state, job_id)
        raise
    if state.store.get(job_id) is None:  # deleted while it was drawn: the folder it wrote goes too
        remove_job_folders(job_id, None, state.settings.thumbs_dir)
        raise job_not_found(job_id)
    if not isinstance(picture, bytes):  # else the cache could not take it (a full or read-only state folder)
        # read whole here (a thumbnail or a 1600 px JPEG): streamed, a delete of the job between
        # the headers and the file's open cut the body short, with a traceback (an audit)
        try:
            picture = picture.read_bytes()
        except FileNotFoundError:  # removed by the job's delete meanwhile
            job_or_404(state, job_id)
            raise
    return Response(picture, media_type="image/jpeg")  # no-store, as every page (service/ui/headers.py)


class DecisionIn(BaseModel):
    label: Literal[CLASSES] | None = None  # type: ignore[valid-type]
    box: list[float] | None = Field(None, min_length=4, max_length=4)
    seen: int | None = None  # the item's review version the page showed (ReviewStore.version)
    shown: str | None = None  # the job's result the page showed (result_token)


class UndoIn(BaseModel):
    seen: int | None = None
    shown: str | None = None


def _stale(e: Stale) -> ApiError:
    if e.who is None:  # a version no page was given: "another reviewer changed it" was untrue
        return ApiError(409, "changed_since_loaded", "this page does not show the photo's current review: reload it")
    return ApiError(409, "changed_since_loaded", f"{e.who} changed this photo's review after this page was "
                                                 "loaded: reload it to see the change")


@router.post("/items/{item}/decision")
def decide(job_id: str, item: ItemId, body: DecisionIn, session: UiPost,
           state: State) -> JSONResponse:
    """A label (keys 1-5, or confirm) or a corrected box; old -> new stored with who and when."""
    job = job_or_404(state, job_id)
    record = _item(state, job, item)
    if (body.label is None) == (body.box is None):
        raise ApiError(400, "invalid_decision", "send either a label or a box")
    _result_unchanged(record, body.shown)
    w, h = record.width or 0, record.height or 0  # none: the job has no picture of it
    if body.label is not None and body.label != "unreadable" and not (w and h):
        # taken and exported as if seen: a regular row without a sha256 or a size, which `validate`
        # passed and the box export left out uncounted (an audit)
        raise ApiError(409, "not_read", "this photo was not read (unreadable): there is no picture of it to "
                                        "label; retry the job once the file can be read")
    if body.label is not None:
        field, new, model = "label", body.label, class_of(record.label.value, record.kind)
    else:
        # checked as stored, to 0.1 px: a box of 0.03 px passed, was stored as [100, 100, 100,
        # 100] and went into the COCO export with area 0 (an audit)
        x1, y1, x2, y2 = new_box = [round(v, 1) for v in body.box]  # type: ignore[union-attr]
        if not (w and h):  # "0 <= x1 < x2 <= 0" said nothing of why
            raise ApiError(400, "invalid_box", "this photo was not read (unreadable): it has no size to draw a box in")
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise ApiError(400, "invalid_box", f"a box must satisfy 0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h}, "
                                               "to 0.1 px")
        if final_of(record, state.reviews.reviewed(job_id, item).get(item))[0] == "no_cervix":
            # stored, said "Saved", then dropped by every export, which exported the photo as one
            # without a cervix (an audit)
            raise ApiError(409, "label_first", "this photo is labelled no_cervix: label it regular, green or iodine "
                                               "first, then draw its box")
        field, new, model = "box", new_box, record.cervix_box
    try:
        d = state.reviews.decide(job_id, item, record.path, session.who, field, model, new, body.seen)
    except JobGone:  # deleted since it was read above
        raise job_not_found(job_id) from None
    except Stale as e:
        raise _stale(e) from None
    return JSONResponse({"decision": d.__dict__})


@router.post("/items/{item}/undo")
def undo(job_id: str, item: ItemId, session: UiPost, state: State, body: UndoIn | None = None) -> JSONResponse:
    job = job_or_404(state, job_id)
    _result_unchanged(_item(state, job, item), body.shown if body else None)
    try:
        d = state.reviews.undo(job_id, item, session.who, body.seen if body else None)
    except Stale as e:
        raise _stale(e) from None
    if d is None:
        raise ApiError(409, "nothing_to_undo", "this item has no decision to undo")
    return JSONResponse({"undone": d.__dict__})


@router.get("/export.csv")
def export_manifest(job_id: str, session: UiSession, state: State) -> StreamingResponse:
    job_or_404(state, job_id)
    lines = manifest_lines(state.store.item_records(job_id), state.reviews.reviewed(job_id))
    return StreamingResponse(guarded_stream(lines, "a review's manifest export"), media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="{job_id}-reviewed.csv"'})


@router.get("/export.coco.json")
def export_coco(job_id: str, session: UiSession, state: State) -> JSONResponse:
    job_or_404(state, job_id)
    try:
        ds = coco_of(state.store.item_records(job_id), state.reviews.reviewed(job_id))
    except JobDeleted:  # deleted while its items were read: a 500, as Apply's (an audit)
        raise job_not_found(job_id) from None
    return JSONResponse(json.loads(ds.model_dump_json()),
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-boxes.coco.json"'})


@router.post("/apply")
def apply(job_id: str, session: UiPost, state: State):
    """Copies only: the originals are read, never moved or changed."""
    job = job_or_404(state, job_id)
    if job.status not in ("done", "cancelled", "failed"):
        raise ApiError(409, "job_running", "wait for the job to finish before applying review")
    qdir = state.settings.quarantine_root / (job.quarantine or f"job-{job.id}")  # type: ignore[operator]
    try:
        with _APPLYING:  # two reviewers pressing Apply at once: one removed a copy the other had just removed (500)
            done = apply_to_quarantine(job.root(), qdir, state.store.item_records(job_id),
                                       state.reviews.reviewed(job_id, undone_too=True), state.settings.data_roots,
                                       every_item=not job.quarantine)
    except JobDeleted:  # deleted while Apply read its items: a 500 "unexpected error" (an audit)
        raise job_not_found(job_id) from None
    except OSError as e:  # a full or read-only quarantine was a bare 500
        if e.errno not in UNWRITABLE:
            raise
        raise ApiError(507, "quarantine_unwritable",
                       f"Apply stopped: the quarantine cannot be written ({e.strerror}); "
                       "what it moved or copied so far stays: Apply again once it can") from None
    # to the result, not the top of 48 cards: its status line was below them, unseen and unread
    counts = f"{done.added}-{done.removed}-{done.missing}-{done.outside}-{done.changed}-{done.others}"
    return RedirectResponse(f"/ui/jobs/{job_id}/review?applied={counts}#exports",
                            status_code=303)
