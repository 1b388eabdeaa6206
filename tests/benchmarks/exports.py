"""What `export_records` costs over a large state: results.csv, results.parquet and
duplicates.csv from N stored rows, parsed from JSON as `StateStore.records` gives them, the
duplicate groups given (the search is measured in tests/benchmarks/duplicates_scale.py).
`python -m tests.benchmarks.exports --rows 100200 --runs 2`; prints each run's seconds and a
digest of both tables, to compare two versions of the code on the same rows."""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import pandas as pd

from pipelines.clean.exports import export_records
from pipelines.engine.qc_result import Label, QCResult


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_200)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    stored = [QCResult(path=f"site/{i:06d}.jpg", label=Label.REGULAR if i % 3 else Label.NON_REGULAR,
                       kind=None if i % 3 else "green", sha256=f"{i:064x}", width=800, height=600,
                       cervix_box=[10.0, 20.0, 300.5, 400.25], resnest_prob=0.1, deep_sad_score=0.5).model_dump_json()
              for i in range(args.rows)]
    dups = pd.DataFrame(columns=["path", "duplicate_group", "duplicate_of", "duplicate_kind"])
    out = Path(tempfile.mkdtemp())
    for _ in range(args.runs):
        t0 = time.perf_counter()
        export_records(lambda: (QCResult.model_validate_json(s) for s in stored), out, duplicates=dups)
        print(f"{args.rows} rows: {time.perf_counter() - t0:.2f} s")
    csv = hashlib.sha256((out / "results.csv").read_bytes()).hexdigest()[:16]
    parquet = hashlib.sha256(pd.read_parquet(out / "results.parquet").to_csv().encode()).hexdigest()[:16]
    print(f"results.csv {csv}, results.parquet's rows {parquet}")


if __name__ == "__main__":
    main()
