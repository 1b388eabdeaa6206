"""Duplicate finding judged on real photos and copies made of them: `cervixqc eval-duplicates`.

Each original photo of one split gets a byte-identical copy and, per transform, seeded copies
a collection really collects: JPEG re-encoded (quality 50-95), resized (0.5-2x), cropped (up
to 10% a side) and turned (0.5-5 degrees, black corners); the geometric copies are saved as
JPEG at quality 90, so none shares the original's bytes. Truth: a copy belongs with its
original, and originals with equal bytes belong together (the real collection has some).
Everything else grouped together is a false pair, including two photos of one patient
minutes apart (saline, acetic acid, green filter, iodine), which look alike but are not
copies; those are counted apart because they are the hard negatives.

Recall is per copy (grouped with its original?), precision over the pairs inside the
predicted groups (a chain that joins two photos' copies costs every pair across).
`sweep` scores a grid of thresholds on the same engine run: thresholds are chosen on val
and the report is on test.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipelines.data.copy_check import CopyCheckConfig, compare, features
from pipelines.data.duplicates import DuplicateConfig, find_duplicates
from pipelines.engine.hashes import decode_embeddings, hamming
from pipelines.engine.qc_result import QCResult

TRANSFORMS = ("exact", "reencode", "resize", "crop", "rotate")
NEAR = TRANSFORMS[1:]


@dataclass(frozen=True)
class CopyPlan:
    copies: int = 2  # per transform and photo (the exact copy is always one)
    seed: int = 0
    quality: tuple[int, int] = (50, 95)
    scale: tuple[float, float] = (0.5, 2.0)
    crop: float = 0.10  # most cut off one side, as a share of that side
    rotation: tuple[float, float] = (0.5, 5.0)  # degrees, either way


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_copy(data: bytes, transform: str, rng: np.random.Generator, plan: CopyPlan = CopyPlan()) -> tuple[bytes, str]:
    """One copy of an encoded photo and a note of its parameters."""
    if transform == "exact":
        return data, ""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = img.size
    if transform == "reencode":
        q = int(rng.integers(plan.quality[0], plan.quality[1] + 1))
        return _jpeg(img, q), f"quality={q}"
    if transform == "resize":
        s = float(np.exp(rng.uniform(np.log(plan.scale[0]), np.log(plan.scale[1]))))
        return _jpeg(img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.Resampling.LANCZOS), 90), f"scale={s:.2f}"
    if transform == "crop":
        left, top, right, bottom = rng.uniform(0, plan.crop, 4)
        box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
        return _jpeg(img.crop(box), 90), "crop=" + ",".join(f"{v:.3f}" for v in (left, top, right, bottom))
    if transform == "rotate":
        a = float(rng.uniform(*plan.rotation) * rng.choice([-1, 1]))
        return _jpeg(img.rotate(a, Image.Resampling.BICUBIC, expand=False), 90), f"degrees={a:.2f}"
    raise ValueError(f"unknown transform {transform!r}: one of {TRANSFORMS}")


def build_set(df: pd.DataFrame, plan: CopyPlan = CopyPlan()) -> tuple[list[bytes], pd.DataFrame]:
    """Originals (a loaded manifest's rows, `abspath` to read) and their copies, as encoded
    bytes, with a truth table: name, original, transform, params, source, patient_id, cluster."""
    rng = np.random.default_rng(plan.seed)
    items: list[bytes] = []
    rows: list[dict] = []
    sha = df["sha256"] if "sha256" in df.columns else pd.Series([""] * len(df))
    cluster_of = {}
    for path, abspath, source, patient, digest in zip(df["path"], df["abspath"], df["source"], df["patient_id"], sha):
        data = open(abspath, "rb").read()
        cluster = cluster_of.setdefault(digest or path, len(cluster_of))  # equal bytes: one truth cluster
        base = {"original": path, "source": source, "patient_id": patient, "cluster": cluster}
        items.append(data)
        rows.append({"name": path, "transform": "original", "params": "", **base})
        for transform in TRANSFORMS:
            for c in range(1 if transform == "exact" else plan.copies):
                copy, params = make_copy(data, transform, rng, plan)
                items.append(copy)
                rows.append({"name": f"copies/{transform}{c}/{path}", "transform": transform, "params": params, **base})
    return items, pd.DataFrame(rows)


def run_engine(qc, items: Sequence[bytes], names: Sequence[str], batch_size: int = 16,
               progress: Callable[[int, int], None] | None = None) -> list[QCResult]:
    out: list[QCResult] = []
    for start in range(0, len(items), batch_size):
        out += qc.run(list(items[start:start + batch_size]), names=list(names[start:start + batch_size]))
        if progress is not None:
            progress(len(out), len(items))
    return out


def _group(records: Sequence[QCResult], cfg: DuplicateConfig, read: Callable[[str], bytes] | None) -> np.ndarray:
    """Predicted group per record; -1-i for a record in no group (its own)."""
    df = find_duplicates([r.path for r in records], [r.sha256 for r in records], [r.phash for r in records],
                         [r.crop_hash for r in records], [r.embedding for r in records], cfg, read=read)
    group_of = dict(zip(df["path"], df["group"]))
    return np.array([group_of.get(r.path, -1 - i) for i, r in enumerate(records)])


def score(records: Sequence[QCResult], truth: pd.DataFrame, cfg: DuplicateConfig, examples: int = 10,
          read: Callable[[str], bytes] | None = None) -> dict:
    """Recall per transform, pair precision overall and per source, false pairs by kind.
    `read(name)`: the photos' bytes, for the pixel check (None: the keys alone)."""
    t = truth.set_index("name").loc[[r.path for r in records]].reset_index()
    t["group"] = _group(records, cfg, read)
    original_group = t[t["transform"] == "original"].set_index("original")["group"]
    t["found"] = t["group"].to_numpy() == original_group.loc[t["original"]].to_numpy()
    copies = t[t["transform"] != "original"]
    recall = {tr: float(copies.loc[copies["transform"] == tr, "found"].mean()) for tr in TRANSFORMS}
    grouped = t[t["group"] > 0]
    total, true = _pair_count(grouped, ["group"]), _pair_count(grouped, ["group", "cluster"])
    same_patient = _pair_count(grouped, ["group", "patient_id"]) - true
    out = {
        "config": asdict(cfg), "pixel_check": read is not None and cfg.verify_k > 0,
        "n_originals": int((t["transform"] == "original").sum()), "n_copies": int(len(copies)),
        "exact_recall": recall["exact"], "near_recall": {tr: recall[tr] for tr in NEAR},
        "near_recall_min": min(recall[tr] for tr in NEAR),
        "predicted_pairs": total, "false_pairs": total - true,
        # no pair predicted: undefined (null in the report), not 1.0, which read as perfectly precise (an audit)
        "precision": true / total if total else float("nan"),
        "false_pairs_same_patient": same_patient,
        "false_pairs_across_sources": total - _pair_count(grouped, ["group", "source"]),
        "per_source": {},
        "false_pair_examples": _false_examples(grouped, examples),
    }
    for source, part in copies.groupby("source"):
        mine = grouped[grouped["source"] == source]
        n, k = _pair_count(mine, ["group"]), _pair_count(mine, ["group", "cluster"])
        out["per_source"][source] = {
            "near_recall": {tr: float(part.loc[part["transform"] == tr, "found"].mean()) for tr in NEAR},
            "exact_recall": float(part.loc[part["transform"] == "exact", "found"].mean()),
            "precision": k / n if n else float("nan"), "predicted_pairs": n}
    return out


def _pair_count(t: pd.DataFrame, by: list[str]) -> int:
    """Pairs of rows that agree on every column of `by`."""
    n = t.groupby(by).size().to_numpy()
    return int((n * (n - 1) // 2).sum())


def _false_examples(grouped: pd.DataFrame, limit: int) -> list[dict]:
    """A few false pairs, originals first: what a reviewer would look at."""
    out: list[dict] = []
    for _, g in grouped.groupby("group"):
        if len(out) >= limit or g["cluster"].nunique() < 2:
            continue
        g = g.sort_values("transform", key=lambda s: s != "original", kind="stable")
        for a, b in itertools.combinations(g.to_dict("records"), 2):
            if a["cluster"] != b["cluster"]:
                out.append({"a": a["name"], "b": b["name"], "same_patient": a["patient_id"] == b["patient_id"]})
                break
    return out[:limit]


def key_distances(records: Sequence[QCResult], truth: pd.DataFrame) -> dict:
    """How each key separates copies from other photos: per transform, the distance of copies
    to their original (quantiles); between distinct originals, the closest other photo of the
    same patient and of another patient (quantiles and minimum)."""
    t = truth.set_index("name").loc[[r.path for r in records]].reset_index()
    by_name = {r.path: r for r in records}
    originals = t[t["transform"] == "original"].drop_duplicates("cluster")
    out: dict = {}
    for key in ("phash", "crop_hash", "embedding"):
        def dist(a: QCResult, b: QCResult) -> float | None:
            x, y = getattr(a, key), getattr(b, key)
            if x is None or y is None:
                return None
            if key == "embedding":
                u, v = decode_embeddings([x, y])
                return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
            return float(hamming(x, y))

        section: dict = {}
        for tr in NEAR:
            d = [dist(by_name[n], by_name[o]) for n, o in t.loc[t["transform"] == tr, ["name", "original"]].to_numpy()]
            section[tr] = _quantiles([v for v in d if v is not None], key == "embedding")
        for label, same in (("other_photo_same_patient", True), ("other_photo_other_patient", False)):
            best = []
            for _, o in originals.iterrows():
                others = originals[(originals["patient_id"] == o["patient_id"]) == same]
                others = others[others["name"] != o["name"]]
                d = [dist(by_name[o["name"]], by_name[n]) for n in others["name"]]
                d = [v for v in d if v is not None]
                if d:
                    best.append(max(d) if key == "embedding" else min(d))
            section[label] = _quantiles(best, key == "embedding", closest=True)
        out[key] = section
    return out


def aligned_distances(items: Sequence[bytes], truth: pd.DataFrame, cfg: CopyCheckConfig = CopyCheckConfig()) -> dict:
    """The pixel check's two numbers, RANSAC inliers and the aligned difference, for each copy
    against its original, and for each original against the other photos of its patient (the
    hard negatives: same scene minutes apart): what its thresholds are chosen from."""
    feats = [features(b, cfg) for b in items]
    t = truth.reset_index(drop=True)
    row_of = {name: i for i, name in enumerate(t["name"])}
    out: dict = {}

    def measure(pairs, negatives: bool) -> dict:
        """Copies: the fewest inliers and the largest differences; other photos: the most
        inliers and the smallest differences (among those that could be aligned)."""
        v = [compare(feats[a], feats[b], cfg) for a, b in pairs]
        return {"pairs": len(v), "called_copy": sum(x.copy for x in v),
                "inliers": _quantiles([float(x.inliers) for x in v], similarity=True, closest=negatives),
                "difference": _quantiles([x.difference for x in v if x.difference is not None], similarity=False,
                                         closest=negatives)}

    for tr in NEAR:
        part = t[t["transform"] == tr]
        out[tr] = measure([(row_of[o], i) for i, o in zip(part.index, part["original"])], negatives=False)
    originals = t[t["transform"] == "original"].drop_duplicates("cluster")
    same = [(a, b) for _, g in originals.groupby("patient_id") for a, b in itertools.combinations(g.index, 2)]
    out["other_photo_same_patient"] = measure(same, negatives=True)
    return out


def _quantiles(values: list[float], similarity: bool, closest: bool = False) -> dict:
    """For copies: how far the worst ones go; for other photos: how close the closest come."""
    if not values:
        return {"n": 0}
    v = np.asarray(values)
    qs = (0.0, 0.01, 0.05, 0.5) if closest != similarity else (0.5, 0.95, 0.99, 1.0)
    return {"n": int(len(v)), **{f"q{int(q * 100)}": round(float(np.quantile(v, q)), 4) for q in qs}}


def sweep(records: Sequence[QCResult], truth: pd.DataFrame, base: DuplicateConfig = DuplicateConfig(),
          min_precision: float = 0.995) -> tuple[DuplicateConfig, list[dict]]:
    """Score a grid of the keys' thresholds, without the pixel check (it would run again at
    each point; its own thresholds come from `aligned_distances`); the best keeps precision
    >= min_precision and has the highest worst-transform recall (then precision, then the
    tighter thresholds)."""
    grid = itertools.product(range(-1, 17, 1), range(-1, 17, 1), (1.01, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99))
    rows = []
    for p, c, cos in grid:
        cfg = replace(base, max_phash_distance=p, max_crop_distance=c, min_cosine=cos)
        s = score(records, truth, cfg, examples=0)
        rows.append({"max_phash_distance": p, "max_crop_distance": c, "min_cosine": cos, "precision": s["precision"],
                     "near_recall_min": s["near_recall_min"], "exact_recall": s["exact_recall"], **s["near_recall"]})
    table = pd.DataFrame(rows)
    ok = table[table["precision"] >= min_precision]
    if ok.empty:
        raise ValueError(f"no threshold on the grid keeps precision >= {min_precision}")
    best = ok.sort_values(["near_recall_min", "precision", "max_phash_distance", "max_crop_distance", "min_cosine"],
                          ascending=[False, False, True, True, False]).iloc[0]
    chosen = replace(base, max_phash_distance=int(best["max_phash_distance"]),
                     max_crop_distance=int(best["max_crop_distance"]), min_cosine=float(best["min_cosine"]))
    return chosen, table.to_dict("records")
