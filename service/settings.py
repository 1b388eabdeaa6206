"""Service settings, from the environment (prefix CERVIXQC_), validated at start-up.

Lists (API keys, data roots) are comma-separated, not JSON, because that is what people
type into a compose file. The service refuses to start without an API key unless auth is
switched off explicitly: a screening site must not end up with an open endpoint by omission.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipelines.engine.config import DEVICE_NAME, JpegDecoder, Runtime
from pipelines.engine.openvino_runtime import Precision
from pipelines.engine.qc_result import Policy, check_findings
from service.root_path import ROOT_PATH

PLACEHOLDER_KEYS = {"changeme", "change-me", "secret", "password", "apikey", "api-key", "test", "xxx"}
MIN_KEY_LENGTH = 16


def _split(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


log = logging.getLogger(__name__)


# CERVIXQC_ variables that are not the service's settings: the engine's conversion cache and its
# child, the tests' and the image check's, docker-compose.yml's mounts and published port
OTHER_VARIABLES = frozenset({"CERVIXQC_CACHE", "CERVIXQC_CONVERSION_PARENT", "CERVIXQC_TEST_DEVICE",
                             "CERVIXQC_CHROMIUM", "CERVIXQC_FIREFOX", "CERVIXQC_SCREENSHOTS", "CERVIXQC_IMAGE",
                             "CERVIXQC_IMAGE_CPU", "CERVIXQC_DATA", "CERVIXQC_QUARANTINE", "CERVIXQC_RESULTS",
                             "CERVIXQC_PUBLISH"})


# What this process has warned of: `cervixqc serve` reads the settings to check them before
# uvicorn starts, and the app reads them again, so each warning was printed twice (an audit).
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


# Settings renamed since a release a site may upgrade from: the old name, its successor and
# what changed. Warned of as a misspelling, the old name left the reader to guess the new one (an
# audit); it is still not read, since its meaning changed.
RENAMED = {"CERVIXQC_UPLOAD_TIMEOUT_S": ("CERVIXQC_UPLOAD_IDLE_TIMEOUT_S", "2026-12-03: the longest pause in an "
                                         "upload's arrival, no longer a deadline on the whole body")}


def unknown_variables(fields: Iterable[str]) -> list[str]:
    """CERVIXQC_ variables that name no setting: a misspelt one (CERVIXQC_POLICI=both) was
    ignored without a word, and the service ran on the default."""
    known = {f"CERVIXQC_{f.upper()}" for f in fields} | OTHER_VARIABLES
    return sorted(k for k in os.environ if k.startswith("CERVIXQC_") and k not in known)


def _keys(listed: list[str], file: Path | None, name: str) -> list[str]:
    """Keys given in the variable plus those of its file (one per line; '#' comments), each
    long enough and not a placeholder."""
    keys = list(listed)
    origin = {k: name.removesuffix("_FILE") for k in keys}  # a short key in the file blamed the variable (an audit)
    if file is not None:
        if not file.is_file():
            raise ValueError(f"{name} {file} does not exist")
        if file.stat().st_mode & 0o077:  # anyone who reads it holds the service's keys
            _warn_once(f"readable {file.resolve()}", "%s is readable by other users: restrict it to the service's "
                       "user", name)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:  # was a bare codec message naming no setting
            why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or type(e).__name__
            raise ValueError(f"{name} {file}: cannot read it ({why})") from None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.strip().startswith("#"):
                keys.append(line.strip())
                origin.setdefault(line.strip(), f"{name} {file} (line {number})")
    for key in keys:
        if key.lower() in PLACEHOLDER_KEYS or len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"{origin[key]}: keys must be at least {MIN_KEY_LENGTH} characters and "
                             "not a placeholder "
                             "(generate one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CERVIXQC_", extra="ignore",
                                      allow_inf_nan=False)  # "inf" seconds overflowed SQLite and the session clock

    # models
    weights_dir: Path = Path("weights")
    device: str = "auto"  # auto: cuda when present, else cpu
    # unset: the policy recorded on the stage-2 cards (chosen on validation; QCPipeline)
    policy: Policy | None = None
    # auto: torchvision on CUDA (JPEGs decode on the device with nvJPEG, PIL fallback per
    # image; 1.5-1.7x the engine's rate with PIL on an H200, QCConfig), pil elsewhere
    jpeg_decoder: JpegDecoder = "auto"
    # auto: on CPU, OpenVINO when the weights folder carries an export (`cervixqc export`),
    # converting at load the models it lacks; torch otherwise and on CUDA. openvino, torch
    runtime: Runtime = "auto"
    precision: Precision = "auto"  # OpenVINO's: auto (bf16 where the CPU has it), f32, bf16

    # auth
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None  # one key per line; '#' comments
    auth_disabled: bool = False
    # keys that read /metrics and nothing else: a central Prometheus need not hold a key that
    # submits jobs and downloads results naming patients' files
    metrics_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    metrics_keys_file: Path | None = None

    # logs: one format for ours and uvicorn's, with a timestamp; debug adds the engine's
    # tracebacks (whose messages may name uploaded files: for a short diagnosis only)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # browser pages (/ui): a signed-in session lasts this long; its signing secret is made once
    # and kept in this file (default: state_dir/session-secret), so sessions survive restarts
    session_max_age_s: float = Field(8 * 3600, gt=0, le=30 * 86400)
    session_secret_file: Path | None = None

    # files the jobs may read, and where the service writes
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    state_dir: Path = Path(".cache/service")  # jobs.sqlite and per-job results
    quarantine_root: Path | None = None  # default: state_dir/quarantine
    # quality findings whose flagged files a job also copies to <quarantine>/<finding>/ (e.g.
    # "blur,glare"); the label and its folder are unchanged by them. Empty: none.
    quarantine_findings: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # a finished job's duplicate search reads the closest photos again to find cropped and
    # turned copies (about 0.4x the engine's time); False: re-encoded and resized only
    duplicate_pixel_check: bool = True
    # how long a call waits for another writer's lock on jobs.sqlite; past it a request gets
    # 503 with Retry-After and the job runner backs off and tries again
    store_busy_timeout_s: float = Field(30.0, gt=0, le=3600)

    # batching and load
    max_batch_size: int = Field(16, ge=1, le=512)
    # How long a batch waits for more images after its first. 16 clients that each wait for
    # their answer all send again at once, and their uploads take longer than 10 ms to arrive
    # and parse: at 10 ms the batch split and the service ran at 0.71-0.75x the offline engine
    # with the bundled (narrow-detector) weights, at 30 ms at 0.93-0.96x (32 clients: 0.82-0.91x
    # and 0.93-0.98x; `python -m tests.benchmarks.service_load --weights weights --n 128`).
    # On a slower host without bf16 (2026-12-02, engine ~20 images/s) 30 ms split them again:
    # 16 clients 0.65-0.71x in three runs, 32 clients 0.73-0.84x in four; at 80 ms 0.84 and 0.92x, 0.80
    # and 1.00x (runs alternated). A lone upload waits up to 80 ms more for company, against
    # the 0.5-1 s an engine batch takes there.
    max_wait_ms: float = Field(80.0, ge=0, le=10_000)
    max_queue: int = Field(256, ge=1)  # images waiting for the engine; past it: 503
    # their bytes too: 256 images of up to 64 MB each held 16 GB in RAM; at least one request's
    max_queue_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(60.0, gt=0, le=3600)  # from the body's arrival to the answer
    # the longest pause in a body's arrival (service/limits.py): a client that stalled mid-upload
    # held its spooled part of the temporary folder for ever, and the timeout above never started
    upload_idle_timeout_s: float = Field(60.0, gt=0, le=3600)
    # from a request's first byte to the end of its headers (service/connections.py, `cervixqc serve`
    # only): connections sending half a header held open files until the service answered nothing
    header_timeout_s: float = Field(20.0, gt=0, le=3600)
    job_batch_size: int = Field(8, ge=1, le=512)
    # jobs queued or running at once; past it POST /v1/jobs and a retry answer 429 `too_many_jobs`
    max_active_jobs: int = Field(1000, ge=1)

    # input limits
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # whole request body
    max_files_per_request: int = Field(32, ge=1)
    max_pixels: int = Field(100_000_000, ge=1)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # the path a reverse proxy serves the service under, stripped by the proxy (service/root_path.py)
    root_path: str = ""

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not ROOT_PATH.fullmatch(v):
            raise ValueError(f"{v!r} is not a path prefix: '/' then letters, digits, '.', '_', '~' or '-' "
                             "per segment (e.g. /cervixqc), or empty")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if DEVICE_NAME.fullmatch(value):  # the name only: whether CUDA is there is serve's preflight
            return value
        raise ValueError(f"{value!r} is not a device: auto, cpu, cuda or cuda:N")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_keys", "metrics_keys", "data_roots", "quarantine_findings", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        unknown = unknown_variables(type(self).model_fields)
        for name in [n for n in unknown if n in RENAMED]:
            unknown.remove(name)
            _warn_once(f"renamed {name}", "%s: renamed %s since %s; ignored, set the new one", name, *RENAMED[name])
        if unknown:
            _warn_once(f"unknown {unknown}", "%s: no such setting, ignored (misspelt? the settings are in the README, "
                       "\"HTTP service\")", ", ".join(unknown))
        keys = _keys(self.api_keys, self.api_keys_file, "CERVIXQC_API_KEYS_FILE")
        if not keys and not self.auth_disabled:
            raise ValueError("no API key: set CERVIXQC_API_KEYS or CERVIXQC_API_KEYS_FILE "
                             "(or CERVIXQC_AUTH_DISABLED=true on a trusted network)")
        self.api_keys = keys
        self.metrics_keys = _keys(self.metrics_keys, self.metrics_keys_file, "CERVIXQC_METRICS_KEYS_FILE")
        self.data_roots = [p.resolve() for p in self.data_roots]
        try:
            check_findings(self.quarantine_findings)
        except ValueError as e:
            raise ValueError(f"CERVIXQC_QUARANTINE_FINDINGS: {e}") from None
        if self.max_queue_bytes < self.max_upload_bytes:  # a request of the largest size could never queue
            raise ValueError(f"CERVIXQC_MAX_QUEUE_BYTES ({self.max_queue_bytes}) must be at least "
                             f"CERVIXQC_MAX_UPLOAD_BYTES ({self.max_upload_bytes})")
        if self.session_secret_file is None:
            self.session_secret_file = self.state_dir / "session-secret"
        if self.quarantine_root is None:
            self.quarantine_root = self.state_dir / "quarantine"
        for name, folder in (("CERVIXQC_STATE_DIR", self.state_dir), ("CERVIXQC_QUARANTINE_ROOT", self.quarantine_root)):
            here = folder.resolve()
            for root in self.data_roots:
                if here == root or root in here.parents or here in root.parents:
                    # a job over the root read the service's own copies back as photos: a rerun
                    # counted each flagged photo twice, its copies nested deeper each time (an audit)
                    raise ValueError(f"{name} {folder} and the data root {root} lie one inside the other: a job "
                                     "would read the service's own files as photos; keep them apart")
        return self

    @property
    def thumbs_dir(self) -> Path:
        """The review pages' pictures, a folder per job (`service/ui/images.py`; a deleted job's goes)."""
        return self.state_dir / "thumbs"

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def findings_card_missing(settings: Settings) -> str | None:
    """Why CERVIXQC_QUARANTINE_FINDINGS cannot work, or None: without a findings card in the
    weights folder no photo is flagged by a finding, so the service started and no job ever
    filled a finding's folder, unsaid; `clean --quarantine-findings` refuses the same (an audit)."""
    if settings.quarantine_findings and not (settings.weights_dir / "findings.json").is_file():
        return (f"CERVIXQC_QUARANTINE_FINDINGS: {settings.weights_dir} has no findings.json, so no photo would be "
                "flagged by a finding (cervixqc calibrate-findings makes one)")
    return None
