"""What the duplicate search's pixel check costs next to the engine, on one folder of photos:
the engine over them (default config), then `find_duplicates` on its records with the keys
alone and with the pixel check, alternating rounds in one process, medians per photo, and
the check's peak RSS. A collection without planted copies is the expensive case: nothing is
joined by the keys first, so every candidate pair is checked.

    python -m tests.benchmarks.duplicates_cost --weights weights --images FOLDER [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

from pipelines.data.copy_check import CopyCheckConfig
from pipelines.data.duplicates import DuplicateConfig, find_duplicates
from pipelines.engine.qc import QCPipeline
from tests.benchmarks.duplicates_scale import PeakRss, _rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--in-memory", type=int, default=CopyCheckConfig().in_memory,
                    help="photos whose keypoints stay in RAM; 0 puts them all in the temporary file, as a "
                         "collection above the limit does")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    names = sorted(str(p.relative_to(args.images)) for p in args.images.rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    qc = QCPipeline(args.weights)
    qc.run([args.images / n for n in names[: args.batch]])  # warm-up
    cfg = DuplicateConfig(copy_check=CopyCheckConfig(in_memory=args.in_memory))
    times: dict[str, list[float]] = {"engine": [], "keys": [], "pixel check": []}
    peak = 0.0
    for _ in range(args.rounds):
        t = time.perf_counter()
        records = []
        for i in range(0, len(names), args.batch):
            chunk = names[i : i + args.batch]
            records += qc.run([args.images / n for n in chunk], names=chunk)
        times["engine"].append(time.perf_counter() - t)
        keys = ([r.path for r in records], [r.sha256 for r in records], [r.phash for r in records],
                [r.crop_hash for r in records], [r.embedding for r in records])
        t = time.perf_counter()
        find_duplicates(*keys, cfg)
        times["keys"].append(time.perf_counter() - t)
        before = _rss_mb()
        with PeakRss() as rss:
            t = time.perf_counter()
            groups = find_duplicates(*keys, cfg, read=lambda rel: (args.images / rel).read_bytes())
            times["pixel check"].append(time.perf_counter() - t)
        peak = max(peak, rss.peak - before)
    med = {k: statistics.median(v) / len(names) * 1000 for k, v in times.items()}
    print(f"{len(names)} photos, {args.rounds} alternating rounds, verify_k {cfg.verify_k}, keypoints in "
          f"{'RAM' if len(names) <= args.in_memory else 'a temporary file'}; ms a photo (median):")
    for k, v in med.items():
        print(f"  {k:>12}: {v:.2f} ({', '.join(f'{s / len(names) * 1000:.2f}' for s in times[k])})")
    print(f"  grouping with the pixel check / engine: {med['pixel check'] / med['engine']:.2f}; "
          f"keys alone / engine: {med['keys'] / med['engine']:.3f}")
    print(f"  peak RSS of the check over the process before it: {peak:.0f} MB; "
          f"{groups['group'].nunique() if len(groups) else 0} groups found")


if __name__ == "__main__":
    main()
