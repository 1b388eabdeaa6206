"""Cropped and turned copies found without chains: `cervixqc eval-duplicates` gives every
photo nine copies, and a cropped copy joined to any of them counts as found. Here each
photo keeps one copy of one transform and nothing else (the copies and engine records of
eval-duplicates, seed 0, subset to originals + `<transform>0`), at several verify_k.

    python -m tests.benchmarks.duplicates_one_copy .cache/real-data/real/split.csv --split val --k 4 8

Not a test: it reads the real photos and runs the engine over ~1,000 photos and copies.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from pipelines.commands.common import _split_manifest
from pipelines.data.duplicates import DuplicateConfig
from pipelines.engine.qc import QCPipeline
from pipelines.evaluation.duplicates_eval import CopyPlan, build_set, run_engine, score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("split_csv", type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--k", type=int, nargs="+", default=[8])
    ap.add_argument("--transforms", nargs="+", default=["crop", "rotate"])
    args = ap.parse_args()
    df = _split_manifest(args.split_csv)
    df = df[df["split"] == args.split].reset_index(drop=True)
    items, truth = build_set(df, CopyPlan())
    records = run_engine(QCPipeline(args.weights), items, list(truth["name"]))
    read = dict(zip(truth["name"], items)).__getitem__
    for k in args.k:
        for tr in args.transforms:
            keep = ((truth["transform"] == "original") | truth["name"].str.startswith(f"copies/{tr}0/")).to_numpy()
            t = time.perf_counter()
            s = score([r for r, m in zip(records, keep) if m], truth[keep], replace(DuplicateConfig(), verify_k=k),
                      examples=0, read=read)
            print(f"{args.split} verify_k {k} {tr}: recall {s['near_recall'][tr]:.3f} over {int(keep.sum()) // 2} "
                  f"copies, pair precision {s['precision']:.4f} ({s['false_pairs']} false of "
                  f"{s['predicted_pairs']}), {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
