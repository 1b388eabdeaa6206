"""Where the whole engine spends its time on a GPU, and how full its detector forwards are:
`python -m tests.benchmarks.cuda_engine_profile --weights weights [--n 1024] [--batches 64,256]
[--out FILE]` on a lent NVIDIA machine (tests/benchmarks/gpu_check.sh runs it with
PARTS=profile; `--device cpu` checks the script itself where no GPU is lent).

Why it exists: on an H200 (2026-12-04) the engine ran 126-135 images/s over 4,096 clinic photos
at engine batch 64, far from issue 15's 1,000, and no stage alone was fast enough (per 4,096
photos: detector about 10 s, nvJPEG decode 7.3, crops 4.4, findings 2.6, classifiers 2.8). The
detector batches only photos of one input shape (`shape_chunks`), so an engine batch of photos
in several shapes makes several smaller forwards. This script counts the forwards and their
sizes per engine batch size, times the engine (its defaults for the device) at each size on
the same photos, and profiles one pass at the first size with torch.profiler (CPU and CUDA
ops), so one call on a lent machine says which stage and which ops to work on next.

Without weights/classifier.safetensors the classifier is a stand-in of the bundled card's
configuration (`cuda_detect.stand_in_weights`): speed only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from tests.benchmarks.cuda_detect import clinic_inputs


def forward_sizes(qc, paths: list[Path], size: int) -> Counter:
    """How many photos each detector forward holds at engine batch `size` (decoded untimed)."""
    from pipelines.engine.decode import Decoded
    from pipelines.engine.detector import shape_chunks

    sizes: Counter = Counter()
    for start in range(0, len(paths), size):
        shapes = [d.image.shape[-2:] for d in qc._decode(paths[start : start + size]) if isinstance(d, Decoded)]
        sizes.update(len(c) for c in shape_chunks(qc.detector.transform, shapes, qc.detector_batch))
    return sizes


def timed_pass(qc, paths: list[Path], size: int, cuda: bool) -> dict:
    """The engine over `paths` as the bench runs it (`engine_bench._run_in_batches`), timed."""
    from pipelines.evaluation.engine_bench import _run_in_batches

    t0 = time.perf_counter()
    stages, _, _ = _run_in_batches(qc, paths, size)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 1),
            "stage_seconds": {k: round(v, 3) for k, v in stages.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batches", default="64,256", help="engine batch sizes, comma-separated")
    ap.add_argument("--out", type=Path, help="the figures as JSON; the profiler's tables go to stdout")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    sizes = [int(s) for s in args.batches.split(",") if s.strip()]

    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline

    cuda = args.device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="cuda-engine-profile-"))
    try:
        weights, paths = clinic_inputs(args.weights, args.n, work)
        qc = QCPipeline(weights, QCConfig(device=args.device))
        rows = []
        for size in sizes:
            timed_pass(qc, paths[: 2 * size], size, cuda)  # first shapes and allocations, untimed
            forwards = forward_sizes(qc, paths, size)
            n_forwards = sum(forwards.values())
            row = {"engine_batch": size, "photos": len(paths), "detector_forwards": n_forwards,
                   "photos_per_forward": round(sum(k * v for k, v in forwards.items()) / max(1, n_forwards), 1),
                   "forward_sizes": dict(sorted(forwards.items())), **timed_pass(qc, paths, size, cuda)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            timed_pass(qc, paths[: 4 * sizes[0]], sizes[0], cuda)
        for key in ("self_cuda_time_total",) * cuda + ("self_cpu_time_total",):
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
        qc.close()
        if args.out is not None:
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                                            "torch": torch.__version__, "decoder": qc.jpeg_decoder,
                                            "rows": rows}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
