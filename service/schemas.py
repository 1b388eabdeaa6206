"""Request and response bodies of the HTTP API (the design brief's result record, with
`filename` in place of `path` for uploads)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.engine.qc_result import Finding, Label, Policy, QCResult


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
    colour_score: float | None = Field(None, description="P(non-regular) from the crop's colour, where the weights "
                                                         "carry that model (the two_of_three policy's third vote)")
    findings: dict[str, Finding] = Field(default_factory=dict, description=(
        "Quality findings (blur, dark, overexposed, glare): score, threshold, flagged; empty without a findings card"))
    phash: str | None = Field(None, description="64-bit perceptual hash of the whole photo (16 hex digits)")
    crop_hash: str | None = Field(None, description="The same hash of the cervix crop")
    error: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, r: QCResult) -> UploadResult:
        data = r.model_dump()
        data["filename"] = data.pop("path")
        return cls(**data)


class QCResponse(BaseModel):
    results: list[UploadResult]


# The path rules of service/paths.py as patterns, so /docs states what the route refuses with
# 400 `invalid_path` (clients are generated from it): no control characters, no '..' segment;
# a quarantine name is also relative and has no backslash. Documented only: service/paths.py
# enforces the rules, with messages that say which one a path broke.
NO_DOTDOT = r"(?!(?:.*[/\\])?\.\.(?:[/\\]|$))"
SOURCE_PATTERN = rf"^{NO_DOTDOT}[^\x00-\x1f\x7f]+$"
QUARANTINE_PATTERN = rf"^(?!/){NO_DOTDOT}[^\x00-\x1f\x7f\\]+$"


class JobCreate(BaseModel):
    # a misspelt field ("quarantin") queued a job without a quarantine, unsaid (an audit)
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, json_schema_extra={"pattern": SOURCE_PATTERN},
                        description="Folder (recursive) or manifest CSV/Parquet, absolute or relative to a data root; "
                                    "no '..' segment, no control characters")
    quarantine: str | None = Field(None, json_schema_extra={"pattern": QUARANTINE_PATTERN},
                                   description="Folder name under the server's quarantine root for copies of flagged "
                                               "files (non_regular, no_cervix, unreadable): relative, no '..' segment, "
                                               "no backslash or control characters")
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
    results_url: str  # from the API's base, as every route a client calls (without CERVIXQC_ROOT_PATH)
    # `POST .../retry` would take it: failed or cancelled, or done with files the OS could not read
    retryable: bool = False
    # why an active job does not move: the job store cannot be written (full, read-only, locked);
    # it goes on by itself once it can
    waiting: str | None = None
    # what a running job does once every photo has its row (its duplicate search and results
    # files: seconds to minutes at scale, at progress 1.0); null otherwise
    step: str | None = None
    # what a user should look at before trusting the labels (`pipelines.clean.notes.run_notes`: a
    # share of no_cervix that a screening collection rarely holds, or of unreadable files)
    notes: list[str] = []
    # the models (sha256) and thresholds the job's rows were labelled by, once it has begun: a
    # job's results named neither, where clean's summary.json does (an audit); null before
    labelled_by: dict | None = None


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
    # what decodes JPEGs: "pil" or "torchvision" (nvJPEG on CUDA), the `jpeg_decoder` setting resolved
    jpeg_decoder: str
    models: list[ModelInfo]
    # the quality findings' thresholds (weights/findings.json); empty when the folder has none
    findings_thresholds: dict[str, float] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
