"""What the quality findings and the duplicate keys cost the engine: the same weights and
photos with them (`QCConfig(findings=True)`, the default) and without, side by side in one
process, alternating rounds, median per image. The issue's target: <= 10% more time.

    python -m tests.benchmarks.findings_cost --weights weights --images FOLDER [--rounds 5]

The weights folder must carry findings.json (else only the hashes and embedding are timed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    files = sorted(p for p in args.images.rglob("*") if p.is_file() and not p.name.startswith("."))
    engines = {name: QCPipeline(args.weights, QCConfig(findings=on)) for name, on in (("without", False), ("with", True))}
    if engines["with"].findings_card is None:
        print(f"note: {args.weights} has no findings.json: timing the hashes and embedding only")
    datas = [p.read_bytes() for p in files]  # from memory: the file system's cache is not what is timed
    for qc in engines.values():
        qc.run(datas[: args.batch])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in engines}
    stage: dict[str, dict[str, float]] = {name: {} for name in engines}
    for _ in range(args.rounds):
        for name, qc in engines.items():
            t = time.perf_counter()
            for i in range(0, len(datas), args.batch):
                out = qc.run(datas[i : i + args.batch])
                for key, ms in out[0].timings_ms.items():
                    stage[name][key] = stage[name].get(key, 0.0) + ms
            times[name].append((time.perf_counter() - t) / len(datas) * 1000)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"{len(files)} photos, {args.rounds} alternating rounds, batch {args.batch}, runtimes {engines['with'].runtimes}")
    for name in engines:
        print(f"  {name:>8} findings: {med[name]:.2f} ms/photo (rounds: {', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"  ratio with/without: {med['with'] / med['without']:.3f}")
    # each round's two arms ran back to back, so their ratio cancels the machine's drift
    # between rounds, which the ratio of the two medians does not
    paired = [w / wo for w, wo in zip(times["with"], times["without"])]
    print(f"  paired ratio, median of rounds: {statistics.median(paired):.3f} "
          f"(rounds: {', '.join(f'{r:.3f}' for r in paired)})")
    for name in engines:
        print(f"  {name}: stages, ms a photo: " + ", ".join(
            f"{k} {v / args.rounds / len(datas):.2f}" for k, v in stage[name].items()))


if __name__ == "__main__":
    main()
