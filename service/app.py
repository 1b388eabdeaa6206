"""The app factory. `create_app(settings)` builds a service; the lifespan loads the QC engine
once, warms it, and starts the micro-batcher and the job runner; nothing happens at import.

Run: `uvicorn --factory service.app:create_app` (settings from CERVIXQC_* variables), or
`cervixqc serve` / `make serve`. One process per machine: the models are loaded once and
every request shares them through the batcher.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware

from pipelines.engine.config import QCConfig
from pipelines.engine.decode import DecodeLimits
from pipelines.engine.qc import QCPipeline
from service import state_lock
from service.access_log import drop_query_strings
from service.batcher import MicroBatcher
from service.connections import quiet_accept_errors
from service.engine_health import WARM_UP, EngineHealth
from service.errors import ApiError, install_error_handlers, validation_message
from service.gate import EngineGate
from service.jobs.folders import sweep_deleted, sweep_killed_writes
from service.jobs.reviews import ReviewStore
from service.jobs.runner import JobRunner
from service.jobs.store import JobStore
from service.limits import BodyLimitMiddleware
from service.log_config import ensure_handler
from service.metrics import Metrics
from service.request_count import RequestCount
from service.root_path import RootPath, route_path
from service.routes import docs, health, jobs, models, qc
from service.settings import Settings, findings_card_missing
from service.state import ServiceState
from service.ui import auth_pages, pages, review_pages
from service.ui.deps import HERE as UI_DIR
from service.ui.deps import SignInNeeded, browser_form, current_session, page, wants_page
from service.ui.headers import PageHeaders
from service.ui.job_views import JobViews
from service.ui.session import RevokedSessions, Session, SessionSigner, load_secret

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("cervixqc")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def _build_state(settings: Settings, metrics: Metrics) -> ServiceState:
    if problem := findings_card_missing(settings):  # `cervixqc serve` says it before uvicorn starts
        raise RuntimeError(problem)
    limits = DecodeLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    engine = QCPipeline(settings.weights_dir, QCConfig(device=settings.resolved_device, policy=settings.policy,
                                                       limits=limits, jpeg_decoder=settings.jpeg_decoder,
                                                       runtime=settings.runtime, precision=settings.precision))
    engine.run([WARM_UP])  # warm-up: first-call allocations, lazy inits
    health = EngineHealth(metrics.engine_errors)
    # the gate asks the batcher how many uploads wait; called only once both exist
    gate = EngineGate(lambda: batcher.pending)
    batcher = MicroBatcher(lambda data, names: engine.run(data, names), gate, metrics, settings.max_batch_size,
                           settings.max_wait_ms, settings.max_queue, settings.max_queue_bytes, health)
    store = JobStore(settings.state_dir / "jobs.sqlite", settings.store_busy_timeout_s)
    sweep_deleted(store, settings.thumbs_dir)
    sweep_killed_writes({"state": settings.state_dir,
                         "quarantine": settings.quarantine_root})  # type: ignore[dict-item]
    metrics.count_jobs(store.count_by_status)
    runner = JobRunner(store, lambda paths, names, policy: engine.run(paths, names, policy=policy),  # type: ignore[arg-type]
                       gate, metrics, settings.data_roots, settings.quarantine_root, settings.job_batch_size,  # type: ignore[arg-type]
                       settings.quarantine_findings, settings.duplicate_pixel_check, limits,
                       engine.decision, health)
    metrics.describe_build(_version(), engine.decision, engine.runtimes, str(engine.device))
    metrics.watch_disks({"state": settings.state_dir, "results": settings.state_dir / "jobs",
                         "quarantine": settings.quarantine_root})  # type: ignore[dict-item]
    return ServiceState(settings, metrics, engine, batcher, store, runner, ReviewStore(store.path), JobViews(store),
                        health)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    ensure_handler(settings.log_level)
    drop_query_strings()  # uvicorn has configured its loggers by the time it calls this factory
    quiet_accept_errors()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        lock = state_lock.hold(settings.state_dir)  # before any job can be taken up
        try:
            state = await asyncio.to_thread(_build_state, settings, metrics)
        except BaseException:
            lock.close()
            raise
        # the models' and libraries' objects live as long as the process: out of the collector's
        # sight, a full collection no longer walks them (it paused requests for ~250 ms, seen in
        # `python -m tests.benchmarks.review_grid`)
        gc.collect()
        gc.freeze()
        await state.batcher.start()
        state.runner.start()
        app.state.service = state
        # the models by sha256: after a swapped head, the log says which one this start loaded
        log.info("ready in %.1f s on %s (policy %s; %s; JPEG decoder %s; models %s)", time.perf_counter() - t0,
                 state.qc.device, state.qc.policy, ", ".join(f"{k}: {v}" for k, v in state.qc.runtimes.items()),
                 state.qc.jpeg_decoder,
                 ", ".join(f"{k} {v[:12]}" for k, v in state.qc.decision["models"].items()))
        try:
            yield
        finally:
            app.state.service = None
            state.runner.stop()
            await state.batcher.stop()
            state.qc.close()
            state.store.close()
            lock.close()

    # the API's documentation is keyed like the API: service/routes/docs.py
    app = FastAPI(title="cervixqc", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Quality control for uterine cervix images: cervix detection, then green-filter / "
                              "Lugol's-iodine screening. Not a medical device.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    install_error_handlers(app)
    app.state.session_signer = SessionSigner(load_secret(settings.session_secret_file),  # type: ignore[arg-type]
                                             settings.session_max_age_s,
                                             RevokedSessions(settings.state_dir / "sessions.sqlite"))

    @app.exception_handler(SignInNeeded)
    async def _sign_in(_: Request, e: SignInNeeded) -> RedirectResponse:
        return RedirectResponse(f"/ui/login?next={e.next_url}", status_code=303)

    def _signed_in(request: Request) -> Session | None:
        """The page's session for its menu: an error page hid the menu and Sign out from a
        signed-in reviewer (an audit)."""
        try:
            return current_session(request)
        except (SignInNeeded, ApiError):
            return None

    def as_page(kind: type[Exception], status_and_message) -> None:
        """A browser opening a page gets the message as a page with a way back: a deleted job's
        review page showed the raw JSON error, and so did a mistyped item number or page and
        an unknown /ui/ address (audits). Scripts keep the JSON."""
        as_json = app.exception_handlers[kind]

        async def handler(request: Request, e: Exception) -> Response:
            shown = status_and_message(e)
            if (shown is not None and (wants_page(request) or browser_form(request))
                    and route_path(request.scope).startswith("/ui/")):
                return page(request, "error.html", _signed_in(request), status_code=shown[0], status=shown[0],
                            message=shown[1])
            return await as_json(request, e)

        app.add_exception_handler(kind, handler)

    as_page(ApiError, lambda e: (e.status, e.message))
    as_page(RequestValidationError, lambda e: (422, validation_message(e)))
    # a 405 keeps its JSON answer, whose Allow header names the methods there are
    as_page(StarletteHTTPException, lambda e: (e.status_code, str(e.detail)) if e.status_code != 405 else None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes,
                       on_too_large=metrics.rejected.labels("body_too_large").inc,
                       idle_s=settings.upload_idle_timeout_s, on_stalled=metrics.rejected.labels("upload_timeout").inc)
    app.add_middleware(PageHeaders)  # the pages' security and cache headers
    # JSON, CSV and NDJSON of 1 KB and more go gzipped to clients that ask: a 10^5-item job's
    # what-if scores are 6 MB as JSON. Never HTML, whose pages put the CSRF token next to text a
    # link can choose (BREACH), nor pictures (already compressed; Starlette skips those itself).
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=5,
                       exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES, "text/html"))
    app.add_middleware(RootPath, root_path=settings.root_path)  # the middlewares added after it see the prefix set

    app.add_middleware(RequestCount, routes=app, metrics=metrics)  # outermost: every answer counted

    for router in (health.router, models.router, qc.router, jobs.router, docs.router, auth_pages.router,
                   pages.router, review_pages.router):
        app.include_router(router)
    generate_openapi = app.openapi  # FastAPI's, cached on the app after its first call

    def openapi() -> dict:  # a request over either limit gets 413 (routes/qc.py)
        return qc.document_upload_limit(generate_openapi(), min(settings.max_files_per_request, settings.max_queue))

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS), name="docs-assets")
    # the pages' CSS and JS, from the package (no CDN: screening sites are often offline)
    app.mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static")
    return app
