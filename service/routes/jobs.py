"""Batch-cleaning jobs over server-side folders or manifests under CERVIXQC_DATA_ROOTS.

The routes are plain `def`: they read manifests and the job store, and FastAPI runs them in
its thread pool, so a store locked by another writer holds one thread, not the event loop
(an `async def` route waiting on the lock froze every request, health checks included)."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from pipelines.clean.inputs import holds_files, list_inputs
from pipelines.clean.notes import run_notes
from pipelines.clean.quarantine import check_quarantine_names
from pipelines.engine.qc_result import QCResult, spreadsheet_row
from service.auth import UNAUTHORIZED, ApiKey
from service.errors import ApiError, guarded_stream
from service.jobs.folders import remove_job_folders
from service.jobs.runner import NOT_RESUMED
from service.jobs.store import ActiveTwin, Job, QuarantineInUse, TooManyJobs
from service.media_type import JSON, media_type
from service.paths import confine, relative_name
from service.schemas import ErrorResponse, JobCreate, JobList, JobStatus
from service.state import ServiceState, State

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[ApiKey], responses=UNAUTHORIZED)


def _errors(*codes: int) -> dict[int | str, dict]:
    """Each route's own refusals, plus 503 (the job store busy past its timeout: any route).
    One shared list documented 400, 403 and 409 where a route never raised them and left out
    the 503, and the 408/413 of a job's body (an audit)."""
    return {code: {"model": ErrorResponse} for code in (*codes, 503)}


CSV_FIELDS = QCResult.csv_fields()
JOBS_LISTED_MOST = 1000  # the most jobs one listing gives (the API's and the jobs page's `limit`)
log = logging.getLogger(__name__)


def _too_many_jobs(e: TooManyJobs) -> ApiError:
    return ApiError(429, "too_many_jobs", f"{e.args[0]} jobs are queued or running, this service's limit "
                                          "(CERVIXQC_MAX_ACTIVE_JOBS): wait for some to end, or cancel some")


def status_of(state: ServiceState, job: Job) -> JobStatus:
    counts = state.store.counts(job.id)
    processed = sum(counts.values())
    rate = eta = None
    if job.status == "running" and job.resumed_at:
        elapsed = time.time() - job.resumed_at
        now_done = processed - job.done_before_resume
        rate = now_done / elapsed if elapsed > 0 and now_done > 0 else None
        if rate and job.total is not None:
            eta = (job.total - processed) / rate
    elif job.status == "done" and job.started and job.finished and job.finished > job.started:
        rate = (processed - job.done_before_resume) / (job.finished - (job.resumed_at or job.started))
        eta = 0.0
    progress = processed / job.total if job.total else (1.0 if job.total == 0 else None)
    retryable = (job.status in ("failed", "cancelled") or (
        job.status == "done" and counts.get("unreadable", 0) > 0 and state.store.has_read_again(job.id))) and (
        state.runner.begun_by_others(job) is None)
    return JobStatus(id=job.id, status=job.status, source=job.source, quarantine=job.quarantine, policy=job.policy,
                     total=job.total, processed=processed, counts=counts, progress=progress, rate_per_s=rate,
                     eta_s=eta, created=job.created, started=job.started, finished=job.finished, error=job.error,
                     results_url=f"/v1/jobs/{job.id}/results", retryable=retryable,
                     waiting=state.runner.waiting(job.id), notes=run_notes(counts),
                     step=state.runner.step(job.id) if job.status == "running" else None,
                     labelled_by=json.loads(job.models) if job.models else None)


def job_not_found(job_id: str) -> ApiError:
    shown = job_id if len(job_id) <= 80 else job_id[:80] + "..."  # a 100,000-character id came back whole
    return ApiError(404, "job_not_found", f"no job {shown!r}")


def job_or_404(state: ServiceState, job_id: str) -> Job:
    job = state.store.get(job_id)
    if job is None:
        raise job_not_found(job_id)
    return job


def json_body(request: Request) -> None:
    """A job is asked for in JSON: a form body was a 422 about "a valid dictionary", where an
    upload of the wrong type gets 415 saying what to send (an audit)."""
    if media_type(request) != JSON:
        raise ApiError(415, "unsupported_media_type", 'send the job as JSON (Content-Type: application/json), '
                                                      'such as {"source": "folder/under/a/data/root"}')


@router.post("", status_code=202, response_model=JobStatus,
             responses=_errors(400, 403, 404, 408, 409, 413, 415, 422, 429),
             summary="Start a cleaning job", dependencies=[Depends(json_body)])
def create_job(body: JobCreate, state: State) -> JobStatus:
    s = state.settings
    source = confine(body.source, s.data_roots)
    if not (source.is_dir() or source.suffix.lower() in (".csv", ".parquet")):
        raise ApiError(400, "invalid_source", "source must be a folder or a manifest (.csv or .parquet)")
    if source.is_file():  # a manifest's problems now, with its rows, not as a failed job later
        try:
            rows = list_inputs(source)
        except (ValueError, OSError) as e:
            raise ApiError(400, "invalid_manifest", str(e)) from e
        if not rows:
            raise ApiError(400, "empty_source", f"{body.source} lists no files to clean (a header without rows)")
    elif not holds_files(source):  # an unmounted share's empty folder ended `done`, 0 files (an audit)
        raise ApiError(400, "empty_source", f"{body.source} holds no files to clean (an unmounted share? an empty "
                                            "folder? only tables and notes, which a folder's listing skips: give "
                                            "a manifest itself as the source)")
    quarantine = str(relative_name(body.quarantine)) if body.quarantine is not None else None
    if quarantine is not None and source.is_file():
        try:
            check_quarantine_names(rows)
        except ValueError as e:
            raise ApiError(400, "invalid_manifest", str(e)) from None
    # refused now, not when the job runs; 422: a policy the schema lists that these weights cannot run
    if body.policy is not None:
        try:
            state.qc.check_policy(body.policy)
        except ValueError as e:
            raise ApiError(422, "policy_unavailable", f"{e}; this server runs {', '.join(state.qc.policies)}") from e
    try:
        job = state.store.create(str(source), quarantine, body.policy or state.qc.policy, s.state_dir / "jobs",
                                 once=True, max_active=s.max_active_jobs)
    except ActiveTwin as e:
        raise ApiError(409, "job_exists", f"job {e.args[0]} is already cleaning this source with the same quarantine "
                                          "and policy: follow it, or cancel it to start again",
                       job_id=e.args[0]) from None
    except QuarantineInUse as e:
        raise ApiError(409, "quarantine_in_use", f"quarantine {quarantine!r} overlaps {e.args[0]!r}, which holds "
                                                 "another source's copies; choose another name") from None
    except TooManyJobs as e:
        raise _too_many_jobs(e) from None
    state.runner.wake()
    return status_of(state, job)


@router.get("", response_model=JobList, responses=_errors(422), summary="Recent jobs, newest first")
def list_jobs(state: State, limit: int = Query(100, ge=1, le=JOBS_LISTED_MOST)) -> JobList:
    return JobList(jobs=[status_of(state, j) for j in state.store.list(limit)])


@router.get("/{job_id}", response_model=JobStatus, responses=_errors(404),
            summary="Status, counts, progress, rate, ETA")
def get_job(job_id: str, state: State) -> JobStatus:
    return status_of(state, job_or_404(state, job_id))


# A custom method, not DELETE: a cancelled job and its partial results stay readable, and
# DELETE promises the resource is gone (schemathesis's use-after-free check holds us to it),
# which the removal below does.
@router.post("/{job_id}/cancel", response_model=JobStatus, responses=_errors(404, 409),
             summary="Cancel a queued or running job")
def cancel_job(job_id: str, state: State) -> JobStatus:
    job = job_or_404(state, job_id)
    if not state.store.cancel(job_id):  # read again: a job that ended since the read above said "already running"
        raise ApiError(409, "job_finished", f"job {job_id} is already {state.store.status(job_id) or job.status}")
    return status_of(state, job_or_404(state, job_id))


@router.delete("/{job_id}", status_code=204, responses=_errors(404, 409),
               summary="Delete a finished job: its rows, results folder, thumbnails and review decisions")
def delete_job(job_id: str, state: State) -> Response:
    """What a site keeps for a job it is done with: nothing but the job's source and quarantine
    name (a quarantine folder keeps one source's copies, and the copies themselves stay: they
    are the site's). A queued or running job is refused (409): cancel it first."""
    job = job_or_404(state, job_id)
    if state.runner.holds(job_id):  # cancelled, but its last batch or exports still being written
        raise ApiError(409, "job_active", f"job {job_id} is {job.status} and still being written: try again shortly")
    if not state.store.delete(job_id):
        raise ApiError(409, "job_active", f"job {job_id} is {job.status}: cancel it first")
    remove_job_folders(job_id, Path(job.out_dir), state.settings.thumbs_dir)
    log.info("job %s deleted", job_id)
    return Response(status_code=204)


@router.post("/{job_id}/retry", status_code=202, response_model=JobStatus, responses=_errors(404, 409, 429),
             summary="Queue a failed or cancelled job again, or a done one with files the OS could not read")
def retry_job(job_id: str, state: State) -> JobStatus:
    """A job that failed (its source gone for a while, a store error it could not outwait)
    or was cancelled keeps its stored rows; queued again it reads only the files it lacks and
    those the OS could not read (`cannot read file`: a share briefly away). A done job with
    such rows can be retried for them alone."""
    job = job_or_404(state, job_id)
    if (begun_by := state.runner.begun_by_others(job)) is not None:
        raise ApiError(409, "job_not_retryable", f"job {job_id} was begun by {begun_by}: {NOT_RESUMED}")
    try:
        requeued = state.store.requeue(job_id, max_active=state.settings.max_active_jobs)
    except TooManyJobs as e:
        raise _too_many_jobs(e) from None
    except ActiveTwin as e:
        raise ApiError(409, "job_exists", f"job {e.args[0]} is cleaning this source with the same quarantine and "
                                          "policy now: follow it, or cancel it and retry this one",
                       job_id=e.args[0]) from None
    if not requeued:
        raise ApiError(409, "job_not_retryable", f"job {job_id} is {job.status}: only failed or cancelled jobs are "
                                                 "retried, and done ones with files the OS could not read")
    state.runner.wake()
    return status_of(state, job_or_404(state, job_id))


def _csv_lines(records: Iterator[QCResult]) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")  # as results.csv on disk: one checksum for one table
    writer.writeheader()
    for i, r in enumerate(records, 1):
        writer.writerow(spreadsheet_row(r.csv_row()))
        if i % 500 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _jsonl_lines(records: Iterator[QCResult]) -> Iterator[str]:
    for r in records:
        yield r.model_dump_json(exclude={"timings_ms"}) + "\n"


@router.get("/{job_id}/results",
            responses={**_errors(404, 422), 200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}},
            response_class=StreamingResponse, summary="Results so far, streamed, in path order")
def job_results(job_id: str, state: State,
                format: Literal["csv", "jsonl"] = Query("csv")) -> StreamingResponse:  # noqa: A002
    job = job_or_404(state, job_id)
    records = state.store.records(job_id)
    headers = {"X-Job-Status": job.status}
    if format == "csv":
        headers["Content-Disposition"] = f'attachment; filename="{job_id}.csv"'
        return StreamingResponse(guarded_stream(_csv_lines(records), "a job's results"), media_type="text/csv",
                                 headers=headers)
    return StreamingResponse(guarded_stream(_jsonl_lines(records), "a job's results"),
                             media_type="application/x-ndjson", headers=headers)
