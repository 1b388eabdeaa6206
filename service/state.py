"""What the lifespan builds once and the routes share, reached through a dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from pipelines.engine.qc import QCPipeline
from service.batcher import MicroBatcher
from service.engine_health import EngineHealth
from service.errors import ApiError
from service.jobs.reviews import ReviewStore
from service.jobs.runner import JobRunner
from service.jobs.store import JobStore
from service.metrics import Metrics
from service.settings import Settings
from service.ui.job_views import JobViews


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    qc: QCPipeline
    batcher: MicroBatcher
    store: JobStore
    runner: JobRunner
    reviews: ReviewStore  # reviewers' decisions, in the job store's database
    views: JobViews  # the review pages' jobs in the grid's order
    health: EngineHealth  # whether the engine still answers (/readyz)


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "starting", "models are still loading", {"Retry-After": "5"})
    return state


State = Annotated[ServiceState, Depends(get_state)]
