"""A run's exports: results.csv, results.parquet and duplicates.csv from its state, written
atomically together. Duplicates are a property of the whole collection: they are grouped
here, from the keys every result carries (sha256, hashes, embedding), and written to every
row plus duplicates.csv."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.clean.state import StateStore
from pipelines.data.schema import on_disk
from pipelines.engine.qc_result import CSV_TEXT_FIELDS, QCResult, spreadsheet_safe
from pipelines.outputs import write_together

# The duplicate search (faiss, OpenCV) loads only when a run exports
if TYPE_CHECKING:
    from pipelines.data.copy_check import VerdictStore


def export(store: StateStore, out_dir: Path, src_root: Path | None = None,
           inputs: Collection[str] | None = None) -> tuple[Path, Path]:
    """The state's records written out; `src_root` (the photos' folder) lets the duplicate
    search check cropped and turned copies with the pixels. Given the run's `inputs`, only
    their rows: a file deleted from the source (or a row taken out of its manifest) since an
    earlier run no longer appears in the results."""
    records = store.records if inputs is None else (lambda: store.records(inputs))
    return export_records(records, out_dir, read=None if src_root is None else reader(src_root), verdicts=store)


def export_mark(inputs: list[str], pixel_check: bool) -> str:
    """What a run's exports are made of: the code that writes them (this package, whose state
    decides which rows they hold and which pixel verdicts, the result schema, the duplicate
    search with its keys and pixel check, the file writers: by their source, since an upgrade
    within one version number changes the files too), the pixel check on or off, and the
    inputs (a file deleted since drops out of them)."""
    from pipelines import outputs
    from pipelines.data import copy_check, duplicates, schema
    from pipelines.engine import hashes, qc_result

    digest = hashlib.sha256(json.dumps(pixel_check).encode())
    package = sorted(Path(__file__).parent.glob("*.py"))  # one module before the split: all of it counted
    for module in (*package, qc_result, duplicates, copy_check, hashes, outputs, schema):
        digest.update(Path(module if isinstance(module, Path) else module.__file__).read_bytes())
    for path in sorted(inputs):
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def reader(root: Path) -> Callable[[str], bytes]:
    """A collection's photos by the paths its records carry (relative to `root`)."""
    return lambda rel: on_disk(root, rel).read_bytes()


EXPORT_CHUNK = 20_000  # rows a chunk of the exports holds in memory


def export_records(records: Callable[[], Iterable[QCResult]], out_dir: Path,
                   duplicates: pd.DataFrame | None = None,
                   read: Callable[[str], bytes] | None = None,
                   verdicts: VerdictStore | None = None) -> tuple[Path, Path]:
    """results.csv, results.parquet and duplicates.csv, each written to a temporary name and
    renamed. Without `duplicates` they are grouped here over the whole collection first; then
    every row carries its group. The rows are streamed in chunks of EXPORT_CHUNK, each chunk
    written to both files: built as one table (and two copies of it) the exports held 3-3.7 KB
    a row at once, about 3.5 GB at 10^6, at the end of a run (or inside the service, for a
    job); a pass per file read, parsed and grouped every row twice: 100,200 rows took 6.26,
    5.68, 5.70 and 4.93 s so, and 3.39, 2.95, 3.84 and 4.11 s in one pass, the same bytes
    (`python -m tests.benchmarks.exports`, two sessions of two runs)."""
    from pipelines.data.duplicates import write_table

    out_dir.mkdir(parents=True, exist_ok=True)
    dups = collection_duplicates(records(), read, verdicts) if duplicates is None else duplicates
    group = {row.path: row for row in dups.itertuples(index=False)}
    csv_path, pq_path = out_dir / "results.csv", out_dir / "results.parquet"

    def write_both(csv_tmp: Path, pq_tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer, schema = None, None
        try:
            with open(csv_tmp, "w", encoding="utf-8", newline="") as f:
                for i, df in enumerate(_result_frames(records(), group)):
                    df.assign(**{c: df[c].map(spreadsheet_safe) for c in CSV_TEXT_FIELDS}).to_csv(f, index=False,
                                                                                                 header=i == 0)
                    # Parquet keeps types: the box a list of floats and no box null (it was the
                    # CSV's text, "" beside the nulls of every other missing value)
                    typed = df.assign(cervix_box=df["cervix_box"].map(lambda b: json.loads(b) if b else None))
                    if writer is None:
                        schema = _parquet_schema(typed)
                        writer = pq.ParquetWriter(pq_tmp, schema)
                    writer.write_table(pa.Table.from_pandas(typed, schema=schema, preserve_index=False))
        finally:
            if writer is not None:
                writer.close()

    write_together({(csv_path, pq_path): write_both,
                    out_dir / "duplicates.csv": lambda p: write_table(dups, p)})
    return csv_path, pq_path


def _result_frames(records: Iterable[QCResult], group: Mapping) -> Iterator[pd.DataFrame]:
    """The rows as results.csv's columns, EXPORT_CHUNK at a time (one empty frame for none)."""
    from pipelines.data.duplicates import with_group

    rows: list[dict] = []
    sent = False
    for r in records:
        rows.append(with_group(r, group.get(r.path)).csv_row())
        if len(rows) == EXPORT_CHUNK:
            yield _frame(rows)
            rows, sent = [], True
    if rows or not sent:
        yield _frame(rows)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=QCResult.csv_fields())
    for column in ("width", "height", "duplicate_group"):  # 400, not 400.0, beside the blanks
        df[column] = df[column].astype("Int64")
    return df


def _parquet_schema(typed: pd.DataFrame):
    """results.parquet's columns, fixed: every chunk must match the first, and a column with
    no value in it (no duplicates, no error) was typed null, so its type changed from run to
    run. With pandas' metadata of the first chunk (read back as Int64, not float)."""
    import pyarrow as pa

    def arrow_type(name: str) -> pa.DataType:
        if name == "cervix_box":
            return pa.list_(pa.float64())
        if name in ("width", "height", "duplicate_group"):
            return pa.int64()
        if name.endswith("_score") or name == "resnest_prob":
            return pa.float64()
        return pa.string()

    return pa.schema([(name, arrow_type(name)) for name in QCResult.csv_fields()],
                     metadata=pa.Schema.from_pandas(typed, preserve_index=False).metadata)


def collection_duplicates(records: Iterable[QCResult], read: Callable[[str], bytes] | None = None,
                          verdicts: VerdictStore | None = None) -> pd.DataFrame:
    """Exact and near duplicates over a whole collection (pipelines/data/duplicates.py);
    `read(path)` gives the photos for the pixel check of cropped and turned copies, whose
    verdicts `verdicts` keeps between runs."""
    from pipelines.data.duplicates import DuplicateConfig, duplicates_of_records

    return duplicates_of_records(records, DuplicateConfig(), read, verdicts)
