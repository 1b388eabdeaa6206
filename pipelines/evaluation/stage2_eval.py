"""`cervixqc eval`: a stage-2 model's scores on a split, with the paper's metrics overall and
per source at the threshold stored in its card (chosen on validation, never here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from models.io import sha256_file
from pipelines.data.crop_set import KIND_INDEX, CropSet, split_crops
from pipelines.data.manifest import load_manifest
from pipelines.data.splits import split_fingerprint
from pipelines.evaluation.classification import metrics_by_group
from pipelines.evaluation.stage2_thresholds import chosen_on
from pipelines.engine.stage2 import load_stage2, score_batch, threshold_of
from pipelines.outputs import changed_since, write_json


def crop_size_for(card) -> int:
    size = card.input_size[0]
    return size if card.name == "deep_sad" else round(size * 8 / 7)


def score_crops(model: torch.nn.Module, card, crops: CropSet, batch_size: int = 128,
                device: str = "cpu") -> dict[str, np.ndarray]:
    """Scores of a loaded model: evaluate_stage2 used to read and hash the weights twice, once
    for the card and once here, and a file replaced between the two scored other weights than
    the metrics' `model_sha256` named."""
    centre = v2.CenterCrop(card.input_size[0])
    parts: dict[str, list] = {}
    for i in range(0, len(crops), batch_size):
        x = centre(crops.images[i : i + batch_size].float() / 255.0).to(device)
        for k, v in score_batch(model, card, x).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def evaluate_stage2(card_path: Path, manifest: Path, coco: Path, split: str, out_dir: Path,
                    device: str = "cpu") -> tuple[dict, dict[str, dict[str, int]], str]:
    """(metrics per group, photos of each kind left out for want of a box, by source, what the rows
    are to the card: `threshold_role`). The figures are of
    the crops alone: with a detector's box file, the photos it missed are in no crop, and the
    count says how many (they were left out unsaid, and the sensitivity read higher)."""
    model, card = load_stage2(card_path, device)
    stem = f"{card.name}_{card.input_size[0]}_{split}"
    _refuse_other_weights(out_dir / f"{stem}_metrics.json", card.sha256)
    crops = split_crops(manifest, coco, crop_size_for(card), splits=(split,), allow_unboxed=True)[split]
    df = load_manifest(manifest)
    manifest_sha256 = sha256_file(manifest)
    role = threshold_role(card, manifest_sha256, split_fingerprint(df), split)
    if len(crops) == 0:
        splits = sorted(df["split"].dropna().astype(str).unique()) if "split" in df.columns else []
        if split not in splits:  # "no 'bogus' image has a cervix box" for a split that is not there (an audit)
            raise ValueError(f"{manifest.name} has no {split!r} split (its splits: {', '.join(splits) or 'none'})")
        raise ValueError(f"no {split!r} image of {manifest.name} has a cervix box in {coco.name}: nothing to score")
    rows = df[(df["split"] == split) & df["kind"].isin(list(KIND_INDEX))]
    scored = set(crops.paths)
    missed = rows.loc[~rows["path"].isin(scored)]
    left_out = {str(k): int(n) for k, n in missed["kind"].value_counts().items()}
    # and by source: a source's row read "pos=0, sens -" where its one iodine photo had no box (an audit)
    by_source = {str(src): {str(k): int(n) for k, n in part["kind"].value_counts().items()}
                 for src, part in missed.groupby("source")}
    scores = score_crops(model, card, crops, device=device)
    y = crops.non_regular.numpy()
    report = {k: m.as_dict() for k, m in metrics_by_group(y, scores["score"], threshold_of(card), crops.sources).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    # the photos and boxes scored, by content: the report sets runs side by side only when
    # they scored the same (two re-splits of one collection passed as one "test": an audit)
    scored_on = {"manifest_sha256": manifest_sha256, "coco_sha256": sha256_file(coco)}
    write_json(out_dir / f"{stem}_metrics.json",
               report | {"left_out_without_box": left_out, "left_out_without_box_by_source": by_source,
                         "model_sha256": card.sha256, "card": str(card_path), "role": role}
               | scored_on)
    # Everything the report needs, so it never reruns a model; the photos left out for want of
    # a box too (the report showed sensitivity 1.000 where 6 of 11 positives had none: an audit)
    np.savez_compressed(out_dir / f"{stem}_scores.npz", y=y, kinds=crops.kinds.numpy(),
                        sources=np.array(crops.sources), paths=np.array(crops.paths),
                        threshold=threshold_of(card), model=card.name, input_size=card.input_size[0],
                        split=split, model_sha256=card.sha256, left_out_kinds=np.array(list(left_out), dtype=str),
                        left_out_counts=np.array(list(left_out.values()), dtype=np.int64), **scored_on, **scores,
                        role=role, **_by_source_arrays(by_source))
    return report, by_source, role


CHOSEN_HERE = "threshold chosen on these rows (calibrate-stage2): optimistic"


def threshold_role(card, manifest_sha256: str, fingerprint: str | None, split: str) -> str:
    """What the scored rows are to the card's threshold and training, from the card's records
    (`site_calibration`: the manifest's sha256 and split that chose it; `data.split_fingerprint`:
    the split the model was trained under). The report named a row by its split's name alone:
    test rows that `calibrate-stage2 --split all` chose the threshold on read "held out", and
    any manifest's val rows "optimistic" (an audit). Photos of the training in another manifest
    cannot be told from its sha256s; that manifest's rows are said to be another split's."""
    site = card.metrics.get("site_calibration") or {}
    trained = card.data.get("split_fingerprint")
    if chosen_on(site, manifest_sha256, split):
        return CHOSEN_HERE
    if split == "train" and trained is not None and fingerprint == trained:
        return "trained on these rows"
    if site.get("manifest_sha256") == manifest_sha256:
        return f"held out (threshold chosen on this manifest's {site.get('split')} rows)"
    if trained is None or fingerprint is None:  # a card or manifest without the record: by the split's name
        return {"train": "train: trained on these rows if the training's split",
                "val": "val: optimistic if the training's (threshold chosen there)",
                "test": "test: held out if the training's split"}.get(split, "")
    if fingerprint != trained:
        return "not the training's split" + (" (threshold chosen on another manifest)" if site else "")
    if split == "val":
        return "model chosen here, threshold on another manifest" if site else "threshold chosen here: optimistic"
    return "held out" if split == "test" else ""


def _by_source_arrays(by_source: dict[str, dict[str, int]]) -> dict[str, np.ndarray]:
    """The photos left out for want of a box, by source and kind, as flat arrays for the
    scores file: the report's source rows had an empty "left out" cell (an audit)."""
    rows = [(src, kind, n) for src, kinds in sorted(by_source.items()) for kind, n in sorted(kinds.items())]
    return {"left_out_sources": np.array([r[0] for r in rows], dtype=str),
            "left_out_source_kinds": np.array([r[1] for r in rows], dtype=str),
            "left_out_source_counts": np.array([r[2] for r in rows], dtype=np.int64)}


def _refuse_other_weights(metrics: Path, sha256: str) -> None:
    """An eval of other weights (same model, size and split) already in the folder: the second
    replaced the first unsaid, and the report showed one row of either (an audit)."""
    if changed_since(metrics, {"model_sha256": sha256}):  # unreadable, or from before the record: replaced
        earlier = json.loads(metrics.read_text())["model_sha256"]
        raise ValueError(f"{metrics} holds an eval of other weights (sha256 {earlier[:12]}, these are {sha256[:12]}): "
                         "write this one into another -o folder, or remove that one")
