"""Upload and jobs pages: thin views over the JSON API's own handlers, so a card on the page
and a result from /v1/qc can never disagree."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from service.errors import ApiError, validation_message
from service.routes.jobs import (JOBS_LISTED_MOST, cancel_job, create_job, delete_job, job_or_404, retry_job,
                                 status_of)
from service.routes.qc import qc_upload
from service.schemas import JobCreate, JobStatus, QCResponse
from service.state import ServiceState, State
from service.ui.deps import UiPost, UiSession, page
from service.ui.session import Session
from service.ui.review_view import Thresholds

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/ui/upload", status_code=303)


@router.get("/upload")
async def upload_page(request: Request, session: UiSession, state: State):
    """The page sends each photo in its own request, at most `parallel` of them at once: it sent
    a whole drop at once, and photos past the engine's queue (CERVIXQC_MAX_QUEUE) came back 503,
    "not checked", where its hint promised "up to 32 at a time" (an audit)."""
    settings = state.settings
    return page(request, "upload.html", session, thresholds=asdict(Thresholds.of(state.qc, state.qc.policy)),
                parallel=min(settings.max_files_per_request, settings.max_queue))


@router.post("/upload", response_model=QCResponse)
async def upload(request: Request, session: UiPost, state: State) -> QCResponse:
    """The same handler as POST /v1/qc. Nothing is kept: the page shows the browser's own copy
    of each photo, so an upload leaves no image on the server."""
    return await qc_upload(request, state)


JOBS_SHOWN = 50


def _jobs_page(request: Request, session: Session, state: ServiceState, error: str | None = None, source: str = "",
               quarantine: str = "", limit: int = JOBS_SHOWN):
    """The form as it was sent, its error marked on the field it is about: the quarantine
    came back empty after a refusal, and a Start after fixing the source ran the job with
    no quarantine, its flagged photos copied nowhere (an audit). The newest `limit` jobs, and
    a link to older ones: the 51st job, and its review decisions, were reached by typing its
    address alone (an audit)."""
    about_quarantine = error is not None and error.startswith("quarantine")  # relative_name's, quarantine_in_use
    jobs = state.store.list(limit + 1)
    more = min(JOBS_LISTED_MOST, 4 * limit) if len(jobs) > limit and limit < JOBS_LISTED_MOST else None
    return page(request, "jobs.html", session, jobs=[status_of(state, j) for j in jobs[:limit]], more=more,
                error=error, roots=[str(r) for r in state.settings.data_roots], source=source,
                quarantine=quarantine,
                invalid=None if error is None else "quarantine" if about_quarantine else "source")


@router.get("/jobs")
def jobs_page(request: Request, session: UiSession, state: State,
              limit: int = Query(JOBS_SHOWN, ge=1, le=JOBS_LISTED_MOST)):
    return _jobs_page(request, session, state, limit=limit)


@router.post("/jobs")
def start_job(request: Request, session: UiPost, state: State, source: str = Form(""),
              quarantine: str = Form("")):
    """The API's own checks (data roots, '..', links out): a refusal comes back to the form."""
    try:
        create_job(JobCreate(source=source, quarantine=quarantine or None), state)
    except ApiError as e:
        return _jobs_page(request, session, state, e.message, source, quarantine)
    except ValidationError as e:  # pydantic: an empty source; its last line was a link to pydantic's docs
        return _jobs_page(request, session, state, validation_message(e), source, quarantine)
    except ValueError as e:
        return _jobs_page(request, session, state, str(e).splitlines()[0], source, quarantine)
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/jobs/{job_id}/status.json", response_model=JobStatus)
def job_status(job_id: str, session: UiSession, state: State) -> JobStatus:
    return status_of(state, job_or_404(state, job_id))


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str, session: UiPost, state: State):
    return _then_back_to_jobs(cancel_job, job_id, state)


@router.post("/jobs/{job_id}/retry")
def retry(job_id: str, session: UiPost, state: State):
    return _then_back_to_jobs(retry_job, job_id, state)


@router.post("/jobs/{job_id}/delete")
def delete(job_id: str, session: UiPost, state: State):
    return _then_back_to_jobs(delete_job, job_id, state)


def _then_back_to_jobs(action, job_id: str, state: ServiceState) -> RedirectResponse:
    """The API's action, then the list. A 409 (cancel a job already finished, retry one
    already queued again: a second click, another tab) has nothing left to do, and so has a
    404 (the job deleted from another tab: a Cancel there answered the raw JSON error)."""
    try:
        action(job_id, state)
    except ApiError as e:
        if e.status not in (404, 409):
            raise
    return RedirectResponse("/ui/jobs", status_code=303)
