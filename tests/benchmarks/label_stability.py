"""How often a photo's label changes under the benign changes a clinic's workflow makes: JPEG
re-saves, smaller copies, a 5% border crop, a mirror image, a 256-colour copy, 10% more or
less brightness, a quarter turn stored in the pixels. A QC label that changes when a photo is
saved again is one a site cannot lean on, and the counts say where the models are fragile.

Each variant is made from the photo as displayed and encoded in memory: the JPEG ones as
JPEG, every other as lossless PNG, so only the named change differs (`png`, the unchanged
pixels as PNG, is the control and must flip nothing). Variants run through the engine (its
default configuration, as `clean` runs it) beside their original, and a flip is counted by
direction: R regular, N non_regular, X no_cervix.

    python -m tests.benchmarks.label_stability MANIFEST [--split val] [--weights weights] [-o flips.csv]

Run it on a split the thresholds were not chosen on where there is one; on the bundled
weights' own validation split (the README's figures) the thresholds sit where those photos put
them.
"""

from __future__ import annotations

import argparse
import io
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image, ImageEnhance

from pipelines.data.manifest import load_manifest
from pipelines.engine.decode import as_displayed
from pipelines.engine.qc import QCPipeline

SHORT = {"regular": "R", "non_regular": "N", "no_cervix": "X", "unreadable": "U"}


def _scaled(k: int) -> Callable[[Image.Image], Image.Image]:
    return lambda im: im.resize((max(1, round(im.width / k)), max(1, round(im.height / k))), Image.Resampling.LANCZOS)


def _border_crop(im: Image.Image) -> Image.Image:
    dx, dy = round(0.05 * im.width), round(0.05 * im.height)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


PNG_VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "png": lambda im: im,  # the control: the format alone
    "half": _scaled(2),
    "quarter": _scaled(4),
    "crop5": _border_crop,
    "hflip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "palette256": lambda im: im.quantize(256),
    "bright0.9": lambda im: ImageEnhance.Brightness(im).enhance(0.9),
    "bright1.1": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "rot90": lambda im: im.transpose(Image.Transpose.ROTATE_90),  # turned in the pixels, no EXIF tag
    "rot270": lambda im: im.transpose(Image.Transpose.ROTATE_270),
}
JPEG_QUALITIES = (95, 85, 70, 50)


def variants(data: bytes) -> dict[str, bytes]:
    """Every variant of one photo's file, encoded."""
    with Image.open(io.BytesIO(data)) as opened:
        im = as_displayed(opened).convert("RGB")
    out = {}
    for q in JPEG_QUALITIES:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        out[f"jpeg{q}"] = buf.getvalue()
    for name, change in PNG_VARIANTS.items():
        buf = io.BytesIO()
        change(im).save(buf, "PNG", compress_level=1)  # lossless at any level; 1 is the fast one
        out[name] = buf.getvalue()
    return out


def label_flips(qc: QCPipeline, rows: pd.DataFrame, batch: int = 16) -> pd.DataFrame:
    """One row per photo and variant: the original's label and the variant's."""
    found = []
    for start in range(0, len(rows), batch):
        chunk = rows.iloc[start : start + batch]
        items, keys = [], []
        for path, abspath in zip(chunk["path"], chunk["abspath"]):
            data = Path(abspath).read_bytes()
            for name, encoded in {"original": data, **variants(data)}.items():
                items.append(encoded)
                keys.append((path, name))
        labels = {}
        for i in range(0, len(items), batch):
            for key, r in zip(keys[i : i + batch], qc.run(items[i : i + batch])):
                labels[key] = r.label.value
        for _, row in chunk.iterrows():
            before = labels[(row["path"], "original")]
            for name in [*(f"jpeg{q}" for q in JPEG_QUALITIES), *PNG_VARIANTS]:
                found.append({"path": row["path"], "source": row["source"], "truth": row["kind"], "variant": name,
                              "before": before, "after": labels[(row["path"], name)]})
        print(f"  {min(start + batch, len(rows))}/{len(rows)} photos", flush=True)
    return pd.DataFrame(found)


def summary(flips: pd.DataFrame) -> str:
    n = flips["path"].nunique()
    changed = flips[flips["before"] != flips["after"]]
    lines = [f"{n} photos; a flip is a label that differs from the original's (R regular, N non_regular, "
             "X no_cervix)", "", "| variant | flips | directions |", "|---|---|---|"]
    counts = changed.groupby("variant").size().reindex(flips["variant"].unique(), fill_value=0)
    for variant, k in counts.sort_values(ascending=False, kind="stable").items():
        ways = Counter(f"{SHORT[b]}>{SHORT[a]}" for b, a in changed.loc[changed["variant"] == variant,
                                                                      ["before", "after"]].itertuples(index=False))
        lines.append(f"| {variant} | {k} ({k / n:.1%}) | {' '.join(f'{w} {c}' for w, c in ways.most_common())} |")
    photos = flips.groupby("truth").size()
    by_truth = changed.groupby("truth").size().reindex(photos.index, fill_value=0) / photos
    lines += ["", "flips per truth class, all variants: " + ", ".join(
        f"{t} {by_truth.get(t, 0):.1%}" for t in sorted(flips["truth"].unique()))]
    lines.append(f"photos flipped by at least one variant: {changed['path'].nunique()} of {n}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--split", default=None, help="only the rows of this split (default: every row)")
    ap.add_argument("--weights", type=Path, default=Path("weights"))
    ap.add_argument("-o", "--out", type=Path, default=None, help="CSV of every photo and variant")
    args = ap.parse_args()
    rows = load_manifest(args.manifest)
    if args.split is not None:
        rows = rows[rows["split"] == args.split]
    qc = QCPipeline(args.weights)
    try:
        flips = label_flips(qc, rows.reset_index(drop=True))
    finally:
        qc.close()
    if args.out is not None:
        flips.to_csv(args.out, index=False)
    print(summary(flips))


if __name__ == "__main__":
    main()
