"""The engine's settings (`QCConfig`, the library's side of the CLI's options and the
service's settings) and how `auto` resolves on the machine at hand: the device, the JPEG
decoder and the runtime."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from pipelines.engine import openvino_runtime
from pipelines.engine.decode import DecodeLimits
from pipelines.engine.decode_device import decodes_on
from pipelines.engine.openvino_runtime import Precision
from pipelines.engine.qc_result import Policy

log = logging.getLogger(__name__)


Runtime = Literal["auto", "torch", "openvino"]
JpegDecoder = Literal["auto", "pil", "torchvision"]


@dataclass
class QCConfig:
    device: str = "auto"  # auto: cuda when present, else cpu
    # "openvino": every model through OpenVINO (CPU only): the weights folder's exported files
    # (`cervixqc export`) where present, the others converted in a child process at the first
    # load and cached (`openvino_cache`). "auto": the same on CPU when the folder carries an
    # export (the bundled one does), else torch; torch on CUDA. Measured reasons in
    # pipelines/engine/openvino_runtime.py: with the bundled weights on the 2-core CPU, the
    # classifier left on torch cost 1.5 s per 300 photos of the engine's 6-8 s, so auto
    # converts it (about 10 s at the first start, then read from the cache) rather than mixing.
    runtime: Runtime = "auto"
    # OpenVINO's inference precision; auto: its own choice (bf16 where the CPU runs it natively)
    precision: Precision = "auto"
    policy: Policy | None = None  # None: `best_policy` (the cards' validation choice)
    crop_margin: float = 0.05
    decode_threads: int = 2
    limits: DecodeLimits = DecodeLimits()
    # Images per detector forward; None: 64 on CUDA, 4 on CPU. Measured on the 2-core CPU,
    # whole engine on the 24 bench photos, A/B in one process (README, measured figures):
    # bundled mobilenet_v3 RetinaNet at 320: batch 4 1.6x faster than batch 1, batch 8
    # 1.6-1.9x; untrained resnet50 RetinaNet at 512: batch 4 1.0x, batch 8 0.87x, batch 16
    # 0.76x (`cervixqc bench-detector`), its large activations being memory-bound. 4 is the
    # CPU default that helps the small detector and costs the large one nothing.
    detector_batch: int | None = None
    # NHWC weights: cuDNN and oneDNN prefer that layout for convolutions. On this 2-core CPU the
    # resnet50 RetinaNet alone at 512 ran 1.45-2.3x faster (a busy machine), the whole engine on
    # 8 clinic photos only 1.03-1.10x (quiet); outputs are equal (tests/test_qc_layout.py).
    # On CUDA it applies to the stage-2 models only (the detector's reason: QCPipeline.__init__).
    channels_last: bool = True
    # bf16 autocast: None means on for CUDA only (on the 2-core CPU it measured 0.84-1.9x,
    # too unsteady to be a default there), and there for the stage-2 models only: the detector
    # ran 2x slower under it on an H200. True puts the detector under it too.
    bf16: bool | None = None
    # "torchvision": JPEGs decode with torchvision.io.decode_jpeg on `device` (nvJPEG on CUDA),
    # batched, per-image fallback to PIL (pipelines/engine/decode_device.py). "pil": DCT-scaled PIL
    # decode in the thread pool, the better choice on CPU. "auto": torchvision on CUDA where it
    # decodes a test JPEG (`resolve_decoder`), pil elsewhere. Measured on an H200 (2026-12-04,
    # `bash tests/benchmarks/gpu_check.sh` with BENCH_DECODERS=torchvision,pil BENCH_THREADS="2 16",
    # 1,024 clinic photos of 1-12 MP, one run): the engine at 119.7 / 139.4 images/s (decode
    # ahead off / on) with nvJPEG, 69.8 / 92.5 with PIL in 2 decode threads, 114.3 / 116.4 with
    # PIL in 16: nvJPEG's decode stage took 1.7-2.0 s, PIL's 8.4 (2 threads) and 2.4 (16). More
    # decode threads did not help nvJPEG (134.7 / 130.3), so `decode_threads` stays 2.
    jpeg_decoder: JpegDecoder = "auto"
    # Decode batch n+1 while batch n is on the models (`run_stream`). None: on for CUDA (the
    # host decodes while the device computes), off on CPU, where decoding and the models
    # share the same cores: on the 2-core CPU, 300 real photos, `cervixqc bench` in one run:
    # two runs each: torch 1.04x and 1.05x with it, OpenVINO 0.95x and 1.04x: noise-level,
    # and it raises peak RSS by up to 65 MB.
    decode_ahead: bool | None = None
    # Quality findings (with a findings card), the duplicate keys (hashes, embedding). False:
    # labels only, the engine as it was before them (`python -m tests.benchmarks.findings_cost`
    # times both side by side).
    findings: bool = True
    # Where models the weights folder does not carry exported are kept once converted (None:
    # `openvino_runtime.cache_root()`, ~/.cache/cervixqc/openvino).
    openvino_cache: Path | None = None
    # glibc malloc arenas for the whole process, set when the engine starts (None: leave
    # malloc alone). 1: the engine's peak RSS 87 MB lower, no slower (pipelines/engine/memory.py).
    malloc_arenas: int | None = 1
    # Every cervix crop's result carries the classifier's kind, flagged or not (otherwise: only
    # a flagged one's). For evaluation, which relabels one run's scores under other policies or
    # thresholds (`eval-pipeline`, `calibrate-stage2`): a crop that only the new thresholds flag
    # had no kind and counted as a wrong one (kind accuracy 1.0 -> 0.5 on an audit's example
    # where no kind was wrong). A served result never sets it: its kind is that of its label.
    kind_of_every_crop: bool = False

    def __post_init__(self) -> None:
        """The library's settings checked as the CLI checks its options: `runtime="tensorrt"` ran
        as auto, `jpeg_decoder="nvjpeg"` as torchvision, `detector_batch=-1` failed at the first
        batch and `precision="fp16"` in OpenVINO's words (an audit)."""
        for name, kind in (("runtime", Runtime), ("precision", Precision), ("jpeg_decoder", JpegDecoder)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"QCConfig.{name}: {getattr(self, name)!r} is not one of {', '.join(get_args(kind))}")
        if self.policy is not None and self.policy not in get_args(Policy):
            raise ValueError(f"QCConfig.policy: {self.policy!r} is not one of {', '.join(get_args(Policy))}")
        for name in ("detector_batch", "decode_threads", "malloc_arenas"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"QCConfig.{name}: {value!r} is not a whole number of at least 1")
        if not 0 <= self.crop_margin < 1:
            raise ValueError(f"QCConfig.crop_margin: {self.crop_margin!r} is not a share in [0, 1)")


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")  # what a device setting may say


def resolve_device(device: str) -> str:
    """`auto` -> cuda when present, else cpu. A misspelt device (`gpu`) or cuda on a machine
    without one is a ValueError saying so: they surfaced as torch errors blamed on the weights."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not DEVICE_NAME.fullmatch(device):
        raise ValueError(f"device {device!r} is not a device: auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device on this machine (auto uses the CPU then)")
    return device


def resolve_decoder(decoder: JpegDecoder, device: torch.device,
                    device_decodes: Callable[[torch.device], bool] = decodes_on) -> Literal["pil", "torchvision"]:
    """`auto` -> nvJPEG on CUDA (1.5-1.7x the engine's rate with PIL there: `QCConfig.jpeg_decoder`)
    where it decodes a test JPEG there, PIL's DCT-scaled decode elsewhere. A decoder asked for by
    name is kept (the device path falls back to PIL per photo)."""
    if decoder != "auto":
        return decoder
    if device.type != "cuda":
        return "pil"
    if device_decodes(device):
        return "torchvision"
    log.warning("torchvision could not decode a test JPEG on %s (no nvJPEG in this build?): JPEGs decode with "
                "PIL on the host", device)
    return "pil"


def resolve_runtime(runtime: Runtime, device: torch.device, weights: Path) -> Literal["torch", "openvino"]:
    if runtime == "torch":
        return "torch"
    if runtime == "openvino":
        if device.type != "cpu":
            raise ValueError(f"the openvino runtime runs on the CPU, not {device}; use --device cpu or --runtime torch")
        if not openvino_runtime.available():
            raise ValueError("the openvino runtime needs the openvino package (pip install openvino)")
        return "openvino"
    usable = device.type == "cpu" and openvino_runtime.available() and openvino_runtime.exported_names(weights)
    return "openvino" if usable else "torch"
