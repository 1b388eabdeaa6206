"""Where the engine's detector stage spends its time on a GPU, per weight layout and precision:
`python -m tests.benchmarks.cuda_detect --weights weights [--n 256] [--out FILE]` on a lent
NVIDIA machine (tests/benchmarks/gpu_check.sh runs it with PARTS=layout).

Why it exists: the first bench on an H200 (2026-12-04, bundled weights, 512 clinic photos)
read the batched detector stage at 37 s (f32) and 43 s (bf16), three times the naive loop's
11.5 s for the same photos, while the models around it took about a second. This times
`QCPipeline._detect` alone, on the engine's own decoded photos, for channels_last on and off
and bf16 on and off (one engine each, the same decoded photos), first pass (new shapes) apart
from the warm passes, and profiles one warm pass of channels_last + bf16 (the engine's CUDA
default before this script's finding).

Without weights/classifier.safetensors (the 51 MB file cannot travel to the device with the
rest, see gpu_check.sh) the classifier is a stand-in at the bundled card's configuration:
the detector stage never reads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def stand_in_weights(weights: Path, work: Path) -> Path:
    """`weights`, or where it lacks the classifier's file a copy of it (OpenVINO files left out)
    with an untrained classifier of the bundled card's configuration: speed only."""
    if (weights / "classifier.safetensors").is_file():
        return weights
    from models.classifier import ClassifierConfig, RegularityClassifier
    from models.io import load_card, save_weights
    from pipelines.evaluation.untrained import NOTE

    folder = work / "weights"
    folder.mkdir(parents=True)
    for f in weights.glob("*"):
        if f.is_file() and not f.name.startswith("classifier.") and ".openvino." not in f.name:
            shutil.copy2(f, folder / f.name)
    card = load_card(weights / "classifier.json")
    model = RegularityClassifier(ClassifierConfig(**card.config))
    save_weights(model.state_dict(), folder / "classifier", card.model_copy(update={"data": NOTE}),
                 dtype=card.storage_dtype)
    print("note: weights/classifier.safetensors absent: an untrained classifier of its card's configuration",
          file=sys.stderr)
    return folder


def clinic_inputs(weights: Path, n: int, work: Path) -> tuple[Path, list[Path]]:
    """(`stand_in_weights`, n seeded clinic photos of 1-12 MP) under `work`: what the GPU scripts time."""
    from pipelines.clean.inputs import list_inputs
    from pipelines.data.synth import PRESETS, generate
    from pipelines.evaluation.engine_bench import usable

    folder = generate(replace(PRESETS["clinic"], n_images=n, seed=0), work / "photos").out_dir / "images"
    return stand_in_weights(weights, work), usable([folder / p for p in list_inputs(folder)])[0]


def _timed(fn, passes: int, cuda: bool) -> list[float]:
    out = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu checks the script itself where no GPU is lent")
    args = ap.parse_args()

    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    cuda = args.device.startswith("cuda")

    work = Path(tempfile.mkdtemp(prefix="cuda-detect-"))
    try:
        weights, paths = clinic_inputs(args.weights, args.n, work)
        rows, images = [], None
        for channels_last in (False, True):
            for bf16 in (False, True):
                qc = QCPipeline(weights, QCConfig(device=args.device, runtime="torch", channels_last=channels_last,
                                                  bf16=bf16, jpeg_decoder="torchvision", findings=False))
                # the engine keeps the detector NCHW on CUDA (this script's finding): set here, so
                # both layouts stay measurable
                qc.detector.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                if images is None:  # the same decoder, long side and device for every engine: decoded once
                    images = [d.image for d in qc._decode(paths)]
                first = _timed(lambda: qc._detect(images), 1, cuda)[0]
                warm = _timed(lambda: qc._detect(images), 3, cuda)
                row = {"channels_last": channels_last, "bf16": bf16, "photos": len(images),
                       "first_pass_s": round(first, 3), "warm_pass_s": round(statistics.median(warm), 3)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if channels_last and bf16:
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
                        _timed(lambda: qc._detect(images), 1, cuda)
                    for key in ("self_cuda_time_total",) * cuda + ("self_cpu_time_total",):
                        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
                qc.close()
        if args.out is not None:
            name = torch.cuda.get_device_name(0) if cuda else "cpu"
            args.out.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                            "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
