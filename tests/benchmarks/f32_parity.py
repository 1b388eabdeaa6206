"""OpenVINO at `--precision f32` against torch on the same photos: the folder's float16 export
compiled at f32 (what the engine ran at f32 before 2026-12-02) and the float32 conversion it
runs now (`QCPipeline._compile`). Prints the largest |difference| of each score and how many
labels differ.

    python -m tests.benchmarks.f32_parity --weights weights --images DIR [--n 13]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.engine import openvino_runtime
from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline

SCORES = ("cervix_score", "presence_score", "deep_sad_score", "resnest_prob")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--n", type=int, default=13)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[: args.n]]
    cache = Path(tempfile.mkdtemp(prefix="cervixqc-f32-"))
    try:
        config = dict(device="cpu", openvino_cache=cache)
        reference = QCPipeline(args.weights, QCConfig(runtime="torch", **config)).run(data)
        now = QCPipeline(args.weights, QCConfig(precision="f32", **config))
        before = QCPipeline(args.weights, QCConfig(precision="f32", **config))
        for name, card in (("detector", before.det_card), ("deep_sad", before.sad_card)):
            exported = openvino_runtime.load_exported(args.weights, name, card)
            if exported is not None:  # the folder's own export, compiled at f32
                before._runs[name] = openvino_runtime.Compiled(exported, "f32", threads=1)
        print(f"{len(data)} photos; runtimes now: {now.runtimes}")
        for label, qc in (("export at f32 (before)", before), ("float32 conversion (now)", now)):
            rows = qc.run(data)
            worst = {f: max(abs((getattr(a, f) or 0) - (getattr(b, f) or 0)) for a, b in zip(reference, rows))
                     for f in SCORES}
            differ = sum(a.label != b.label or a.kind != b.kind for a, b in zip(reference, rows))
            print(f"{label}: " + ", ".join(f"{f} {v:.1e}" for f, v in worst.items()) + f"; labels differing {differ}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
