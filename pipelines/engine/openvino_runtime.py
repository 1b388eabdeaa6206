"""The exported-model path for CPUs: OpenVINO IR files with cards, and the compiled models the
engine calls in place of torch's.

Why OpenVINO and not ONNX Runtime: measured on the 2-core AMD EPYC (Zen 4) machine with the
bundled detector's convolutions (`models.exportable`), batches of 4 at 256x320, median of 5
alternating rounds in one process: torch 25 ms per image, ONNX Runtime 1.32 18.1 ms, OpenVINO
2026.4 at f32 22.8 ms, OpenVINO at its default precision 9.7 ms. ONNX Runtime and OpenVINO are
even at f32; only OpenVINO runs bf16 natively where the CPU has it (AVX512-BF16 here, AMX on
recent Xeons), which halves the detector's time again, and it converts straight from the
torch module (no onnx/onnxscript dependencies). bf16 rounds activations, so labels can move
near a threshold: `precision` picks f32 where that matters, and `cervixqc bench` counts the
images whose label differs from torch's.

Files: `<name>.openvino.xml/.bin` beside `<name>.json`, and a card `<name>.openvino.json` with
the source card's sha256 (an export of other weights is refused, as a presence head of
another detector is), both files' sha256 (checked at load), versions, and the parity measured
at export (max abs difference to torch at f32 on seeded inputs).

A model the weights folder does not carry exported (the bundled classifier: its IR would
break the weights budget) is converted by `converted`: in a child process, cached by the
source's sha256. Converting in the engine's own process left ~200 MB of tracing state behind
for good (RSS 1136 MB after converting the bundled classifier, 922 before; `malloc_trim`
gave back 47), which was most of the way from the engine's peak to its 1.2 GB target.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from models.exportable import CLASSIFIER_OUTPUTS, DETECTOR_OUTPUTS, exportable
from models.io import ModelCard, WeightsIntegrityError, opened_path, sha256_file

log = logging.getLogger(__name__)
Precision = Literal["auto", "f32", "bf16"]
EXPORTABLE = ("detector", "deep_sad", "classifier")


class ExportCard(BaseModel):
    name: str
    format: str = "openvino-ir"
    source_card: str
    source_sha256: str
    xml: str
    bin: str
    xml_sha256: str
    bin_sha256: str
    input_shape: list[int]  # -1: any size
    outputs: list[str]
    weights_compression: str  # "float16": weights stored as fp16, computed at the runtime precision
    quantization: str = ""  # "": a float model; else how it was quantized (pipelines/engine/quantize.py)
    parity: dict[str, float] = Field(default_factory=dict)  # output -> max |openvino f32 - torch|
    parity_inputs: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    command: str = ""


def card_path(weights: Path, name: str) -> Path:
    return weights / f"{name}.openvino.json"


def _input_shape(name: str, card: ModelCard) -> list[int]:
    if name == "detector":
        return [-1, 3, -1, -1]  # the transform pads each batch to a multiple of 32 of its own size
    size = int(card.input_size[0])
    return [-1, 3, size, size]


def _example(name: str, card: ModelCard, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "detector":
        side = int(card.config["max_size"])
        return torch.rand(2, 3, side - side % 32, side, generator=g)  # landscape, as most photos
    size = int(card.input_size[0])
    return torch.rand(4, 3, size, size, generator=g)


def output_names(name: str, n: int) -> list[str]:
    if name == "detector":
        return [*DETECTOR_OUTPUTS, *(f"fpn{i}" for i in range(n - 2))]
    return ["distance"] if name == "deep_sad" else list(CLASSIFIER_OUTPUTS)


def convert(name: str, model: nn.Module, card: ModelCard):
    """The torch model's exporter view as an in-memory OpenVINO model (a few seconds)."""
    import openvino as ov

    view = exportable(model.float()).eval()
    with torch.no_grad():
        return ov.convert_model(view, example_input=_example(name, card),
                                input=[ov.PartialShape(_input_shape(name, card))])


class Compiled:
    """A compiled OpenVINO model as a callable on torch tensors (one request at a time: the
    engine calls it from one thread, and the lock keeps a second caller correct)."""

    def __init__(self, ov_model, precision: Precision = "auto", threads: int | None = None) -> None:
        import openvino as ov

        # CPU_RUNTIME_CACHE_CAPACITY 0: no cache of per-input-shape executors (the detector sees
        # a new padded shape with most chunks); 15 MB less peak RSS, no slower in two runs each
        # on 300 real-mix photos (6.26-6.27 s vs 6.45-6.65 s).
        config: dict = {"PERFORMANCE_HINT": "LATENCY", "CPU_RUNTIME_CACHE_CAPACITY": 0}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = ov.Core().compile_model(ov_model, "CPU", config)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        data = np.ascontiguousarray(x.detach().float().cpu().numpy())
        with self._lock:
            out = self._request.infer({0: data})
            return [torch.from_numpy(out[k]) for k in self.compiled.outputs]  # infer returns fresh copies


def export(name: str, model: nn.Module, card: ModelCard, out_dir: Path, source_card: Path,
           compress_to_fp16: bool = True, command: str = "",
           quantize: Callable[[object], object] | None = None, quantization: str = "") -> ExportCard:
    """Write `<name>.openvino.xml/.bin` and its card into `out_dir`, with the parity to torch
    measured at f32 on seeded inputs other than the ones traced. `quantize` turns the
    converted model into a quantized one (`pipelines.engine.quantize`), which `quantization`
    describes on the card."""
    import openvino as ov

    ov_model = convert(name, model, card)
    if quantize is not None:
        ov_model = quantize(ov_model)
    # written and checked in a work folder beside, then renamed into place with the card last:
    # written in place, a Ctrl-C, kill or full disk during the save or the parity check left
    # the old card over new files, and every start refused the folder until it was exported again
    _sweep_stale_work(out_dir, ".exporting-*")  # a killed export's (its `finally` never ran)
    work = Path(tempfile.mkdtemp(prefix=".exporting-", dir=out_dir))
    try:
        xml = work / f"{name}.openvino.xml"
        ov.save_model(ov_model, xml, compress_to_fp16=compress_to_fp16)
        binf = xml.with_suffix(".bin")
        check = _example(name, card, seed=1)
        with torch.no_grad():
            want = exportable(model.float()).eval()(check)
        got = Compiled(ov.Core().read_model(xml), precision="f32")(check)
        names = output_names(name, len(want))
        parity = {n: float((g - w.float()).abs().max()) for n, g, w in zip(names, got, want)}
        export_card = ExportCard(
            name=name, source_card=source_card.name, source_sha256=card.sha256, xml=xml.name, bin=binf.name,
            xml_sha256=sha256_file(xml), bin_sha256=sha256_file(binf), input_shape=_input_shape(name, card),
            outputs=names, weights_compression="float16" if compress_to_fp16 else "float32", quantization=quantization,
            parity=parity,
            parity_inputs=f"uniform noise {list(check.shape)}, seed 1; OpenVINO at f32",
            versions={"openvino": ov.__version__, "torch": torch.__version__}, command=command)
        card_path(work, name).write_text(export_card.model_dump_json(indent=2) + "\n")
        # the old card goes first: stopped between the renames, the old card stood over a new
        # .bin and every start refused the folder (an audit); without a card the files are
        # not an export, and the engine converts the model itself
        card_path(out_dir, name).unlink(missing_ok=True)
        for done in (binf, xml, card_path(work, name)):
            os.replace(done, out_dir / done.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return export_card


def read_card(weights: Path, name: str) -> ExportCard | None:
    """The export's card, None without one. A card cut short or not readable is a
    WeightsIntegrityError naming it (it was a bare pydantic error naming no file, and a
    damaged cached conversion was never converted again, failing every start)."""
    path = card_path(weights, name)
    if not path.is_file():
        return None
    try:
        return ExportCard.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise WeightsIntegrityError(f"{path}: not a readable export card ({reason}); run `cervixqc export` "
                                    "again, or delete the .openvino.* files to convert at start") from None


def verified_export(weights: Path, name: str, source: ModelCard) -> ExportCard | None:
    """The export's card, None without one; refused when it was exported from other weights
    or its files do not match its card (also the service's check before the models load)."""
    path = card_path(weights, name)
    card = read_card(weights, name)
    if card is None:
        return None
    # the files are the ones OpenVINO reads: its .xml's own .bin beside it, in this folder. A
    # card naming another .bin (or a path out) had one file hashed and another loaded (an audit)
    if (card.name, card.xml, card.bin) != (name, f"{name}.openvino.xml", f"{name}.openvino.bin"):
        raise WeightsIntegrityError(f"{path} names {card.xml} and {card.bin} for {card.name!r}, not "
                                    f"{name}.openvino.xml and .bin beside it; run `cervixqc export --weights "
                                    f"{weights}` again")
    if card.source_sha256 != source.sha256:
        raise WeightsIntegrityError(
            f"{path} was exported from other weights ({card.source_sha256[:12]}..., {source.name} is "
            f"{source.sha256[:12]}...); run `cervixqc export --weights {weights}` again")
    for file, want in ((card.xml, card.xml_sha256), (card.bin, card.bin_sha256)):
        if not (weights / file).is_file():  # read "sha256 missing does not match" (an audit)
            problem = "is missing"
        elif (actual := sha256_file(weights / file)) != want:
            problem = f"has sha256 {actual[:16]}, not its card's {want[:16]}... (damaged, or replaced)"
        else:
            continue
        raise WeightsIntegrityError(f"{weights / file} {problem}; refusing to load: run `cervixqc export --weights "
                                    f"{weights}` again, or delete the {name}.openvino.* files to convert at start")
    return card


def load_exported(weights: Path, name: str, source: ModelCard):
    """The exported OpenVINO model for `name` from `weights`, or None when there is none
    (`verified_export`'s checks first)."""
    card = verified_export(weights, name, source)
    return read_exported(weights, card) if card is not None else None


def read_exported(weights: Path, card: ExportCard):
    """The model of an export card `verified_export` returned, read into memory, not mapped: a
    mapped .bin stays resident (97 MB for the classifier's float32 weights) after compiling has
    copied them at the runtime's precision. Read through the files' open descriptors and
    hashed there again: files renamed over them after `verified_export`'s check were read
    unchecked (0.04 s more at start for the classifier's 51 MB conversion, measured)."""
    import openvino as ov

    with open(weights / card.xml, "rb") as xml, open(weights / card.bin, "rb") as binf:
        paths = opened_path(xml, weights / card.xml), opened_path(binf, weights / card.bin)
        for path, file, want in zip(paths, (card.xml, card.bin), (card.xml_sha256, card.bin_sha256)):
            if sha256_file(path) != want:
                raise WeightsIntegrityError(f"{weights / file} was replaced since it was checked; refusing to load "
                                            "it: start again")
        return ov.Core().read_model(*paths, config={"ENABLE_MMAP": False})


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def exported_names(weights: Path) -> list[str]:
    return [n for n in EXPORTABLE if card_path(weights, n).is_file()]



def cache_root() -> Path:
    """Where conversions are kept: $CERVIXQC_CACHE, else $XDG_CACHE_HOME or ~/.cache, under
    cervixqc/openvino."""
    base = os.environ.get("CERVIXQC_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cervixqc" / "openvino"


def _convert_in_child(weights: Path, jobs: list[tuple[str, Path, str]]) -> None:
    args = [a for job in jobs for a in map(str, job)]
    proc = subprocess.run([sys.executable, "-m", "pipelines.engine.openvino_runtime", str(weights), *args],
                          capture_output=True, text=True,  # this process's threads (`--threads`), not every core
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
                               PARENT_PID: str(os.getpid())})
    if proc.returncode != 0:  # the weights, as torch's path names them (a card the builder cannot take)
        names = ", ".join(str(weights / (name + ".json")) for name, *_ in jobs)
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), f"exit {proc.returncode}")
        raise WeightsIntegrityError(f"{names}: cannot convert to OpenVINO ({last.strip()[:300]}); "
                                    "`--runtime torch` runs them without a conversion")


PARENT_PID = "CERVIXQC_CONVERSION_PARENT"  # the child's parent, for `die_with_parent`


def die_with_parent(parent: int) -> None:
    """SIGKILL for this process when its parent dies (Linux's PR_SET_PDEATHSIG), or exit now if
    it died before the call. A service killed at start (SIGKILL, an OOM kill, a container
    stopped) left its conversion child running, a minute of both cores beside the next start's
    own conversion. Fires when the thread that started the child ends: `_convert_in_child`'s
    caller waits for the child, so only the parent's death can end it first. Elsewhere
    (no prctl) nothing changes."""
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _sweep_stale_work(root: Path, pattern: str = ".converting-*", older_than_s: float = 3600.0) -> None:
    """Work folders of a conversion (or an export, `.exporting-*` in a weights folder) whose
    process was killed (SIGKILL; the `finally` never ran): each stayed for good, 49 MB in the
    audit that found them. A live conversion takes a minute at most, so an hour-old one is
    nobody's."""
    cutoff = time.time() - older_than_s
    for work in root.glob(pattern):
        try:
            if work.is_dir() and work.stat().st_mtime < cutoff:
                shutil.rmtree(work, ignore_errors=True)
        except OSError:
            pass


STALE_CONVERSION_S = 30 * 86400


def _sweep_old_conversions(root: Path, in_use: Collection[Path], older_than_s: float = STALE_CONVERSION_S) -> int:
    """Conversions no start has used for `older_than_s` (each start touches the ones it loads):
    those of weights, OpenVINO versions or precisions since replaced, 50-100 MB each, kept for
    good before. A month, so that a second service on other weights sharing the cache keeps
    its own unless it went that long without a start (it would then convert again, ~10 s)."""
    cutoff, gone = time.time() - older_than_s, 0
    keep = {p.resolve() for p in in_use}
    for folder in root.glob("*-openvino*"):
        try:
            if folder.is_dir() and folder.resolve() not in keep and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                gone += 1
        except OSError:
            pass
    return gone


def converted(weights: Path, sources: dict[str, ModelCard], cache: Path | None = None,
              precision: Precision = "auto") -> dict[str, tuple[object, str]]:
    """The OpenVINO model of each of `weights`' models named in `sources`, and where it came
    from. Kept under `cache` (default `cache_root()`) in a folder named by the source's sha256,
    the OpenVINO version and the weights' dtype (`conversion_weights`: `precision` decides it
    too) and checked like any export at load; a damaged copy is converted
    again, an unwritable cache costs the conversion at every start. The missing ones are
    converted together in one child process (see the module's docstring for why a child): its
    start (importing torch, torchvision, timm and OpenVINO) is most of a conversion's time:
    the bundled weights without their exports, empty cache, 2 cores, four alternating pairs
    (2026-12-01): engine start 35.5-39.3 s with a child per model, 23.1-26.4 s with one.
    Conversions no start has used for a month are swept (`_sweep_old_conversions`)."""
    root = cache or cache_root()
    _sweep_stale_work(root)
    found: dict[str, tuple[object, str]] = {}
    missing: dict[str, tuple[Path | None, Path]] = {}  # name -> (cache folder or None, work folder)
    dtypes = {name: conversion_weights(source, precision) for name, source in sources.items()}
    try:
        for name, source in sources.items():
            folder = _conversion_folder(root, name, source, dtypes[name])
            if card_path(folder, name).is_file():
                try:
                    found[name] = load_exported(folder, name, source), "cached conversion"
                    _touch(folder)
                    continue
                except WeightsIntegrityError:
                    shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.parent.mkdir(parents=True, exist_ok=True)
                missing[name] = folder, Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
            except OSError:
                missing[name] = None, Path(tempfile.mkdtemp(prefix="cervixqc-openvino-"))
        def convert_missing() -> None:
            _convert_in_child(weights, [(name, work, dtypes[name]) for name, (_, work) in missing.items()])

        if missing:
            try:
                convert_missing()
            except WeightsIntegrityError:
                if not _short_of_room(root) or all(folder is None for folder, _ in missing.values()):
                    raise
                # a full cache failed the conversion, and the error named the weights (an audit):
                # once more in a temporary folder, paid again at every start until there is room
                log.warning("the OpenVINO cache %s has no room: converting in a temporary folder", root)
                for name, (_, work) in list(missing.items()):
                    shutil.rmtree(work, ignore_errors=True)
                    missing[name] = None, Path(tempfile.mkdtemp(prefix="cervixqc-openvino-"))
                convert_missing()
        for name, (folder, work) in missing.items():
            found[name] = load_exported(work, name, sources[name]), "converted in a child process"  # in memory: the files can go
            if folder is not None:
                try:
                    work.rename(folder)  # atomic: another process converting at once sees it whole or not at all
                except OSError:  # that process got there first; its copy is as good
                    pass
        in_use = [_conversion_folder(root, name, source, dtypes[name]) for name, source in sources.items()]
        if _sweep_old_conversions(root, in_use):
            log.info("removed conversions unused for %d days from the OpenVINO cache", STALE_CONVERSION_S // 86400)
        return {name: found[name] for name in sources}
    finally:
        for _, work in missing.values():
            shutil.rmtree(work, ignore_errors=True)


def _short_of_room(root: Path, room: int = 1 << 30) -> bool:
    """Less free space under the cache than a conversion may take (the bundled three: about
    100 MB; a margin for larger weights)."""
    try:
        return shutil.disk_usage(root).free < room
    except OSError:
        return True


def _conversion_folder(root: Path, name: str, source: ModelCard, dtype: str) -> Path:
    import openvino as ov

    return root / f"{name}-{source.sha256[:16]}-openvino{ov.__version__.split('-')[0]}-{dtype}"


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)
    except OSError:  # a read-only cache: it is swept by no one then either
        pass


def conversion_weights(source: ModelCard, precision: Precision = "auto") -> Literal["float16", "float32"]:
    """How a conversion stores its weights. The compiled model keeps its input's weights beside
    the copies it reorders at the first inference: the bundled ResNeSt50 compiled at f32 and
    run once took 258 MB stored float32, 212 MB stored float16 (2026-12-01, a CPU without
    bf16). float16, as the exports store theirs, where the safetensors hold float16 already
    (the bundled classifier) and the precision is OpenVINO's choice: the conversion's folded
    constants are then rounded to float16 (logits moved by up to 5e-4 of their size against
    the float32 conversion; no label of the 300 real-mix photos). float32 otherwise, so that
    `--precision f32` labels as torch does."""
    return "float16" if source.storage_dtype == "float16" and precision == "auto" else "float32"


def _main(argv: list[str]) -> None:
    """The child of `converted`: WEIGHTS NAME OUT DTYPE [NAME OUT DTYPE ...] ->
    OUT/<name>.openvino.xml/.bin and card, for each NAME, weights stored as DTYPE."""
    if PARENT_PID in os.environ:
        die_with_parent(int(os.environ[PARENT_PID]))
    from pipelines.engine.detector import load_detector
    from pipelines.engine.stage2 import load_stage2

    weights = Path(argv[0])
    for name, out, dtype in zip(argv[1::3], argv[2::3], argv[3::3]):
        model, card = (load_detector if name == "detector" else load_stage2)(weights / f"{name}.json")
        export(name, model, card, Path(out), weights / f"{name}.json", compress_to_fp16=dtype == "float16",
               command="converted at load")


if __name__ == "__main__":
    _main(sys.argv[1:])
