"""Request and response bodies of the HTTP API (the result record of DESIGN.md, with
`filename` in place of `path` for uploads)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from pipelines.engine.qc import Policy
from pipelines.engine.qc_result import Label, QCResult


class UploadResult(BaseModel):
    filename: str
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    label: Label
    kind: str | None = None
    cervix_box: list[float] | None = None
    cervix_score: float | None = None
    presence_score: float | None = None
    deep_sad_score: float | None = None
    resnest_prob: float | None = None
    error: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, r: QCResult) -> UploadResult:
        data = r.model_dump()
        data["filename"] = data.pop("path")
        return cls(**data)


class QCResponse(BaseModel):
    results: list[UploadResult]


class JobCreate(BaseModel):
    source: str = Field(description="Folder (recursive) or manifest CSV/Parquet, absolute or relative to a data root")
    quarantine: str | None = Field(None, description="Folder name under the server's quarantine root for copies "
                                                     "of flagged files (non_regular, no_cervix, unreadable)")
    policy: Policy | None = Field(None, description="Decision policy; default: the server's")


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    source: str
    quarantine: str | None
    policy: str
    total: int | None
    processed: int
    counts: dict[str, int]
    progress: float | None
    rate_per_s: float | None
    eta_s: float | None
    created: float
    started: float | None
    finished: float | None
    error: str | None
    results_url: str


class JobList(BaseModel):
    jobs: list[JobStatus]


class ModelInfo(BaseModel):
    name: str
    architecture: str
    version: str
    sha256: str
    thresholds: dict[str, float]
    input_size: list[int]
    classes: list[str]
    metrics: dict


class ModelsResponse(BaseModel):
    policy: str
    device: str
    runtimes: dict[str, str]  # model -> "torch" or "openvino <precision> (exported | converted at load)"
    models: list[ModelInfo]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
