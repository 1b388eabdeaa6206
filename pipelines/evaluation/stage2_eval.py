"""`cervixqc eval`: a stage-2 model's scores on a split, with the paper's metrics overall and
per source at the threshold stored in its card (chosen on validation, never here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from pipelines.data.crop_set import CropSet, split_crops
from pipelines.evaluation.classification import metrics_by_group
from pipelines.engine.stage2 import load_stage2, score_batch, threshold_of
from pipelines.outputs import write_json


def crop_size_for(card) -> int:
    size = card.input_size[0]
    return size if card.name == "deep_sad" else round(size * 8 / 7)


def score_crops(card_path: Path, crops: CropSet, batch_size: int = 128, device: str = "cpu") -> dict[str, np.ndarray]:
    model, card = load_stage2(card_path, device)
    centre = v2.CenterCrop(card.input_size[0])
    parts: dict[str, list] = {}
    for i in range(0, len(crops), batch_size):
        x = centre(crops.images[i : i + batch_size].float() / 255.0).to(device)
        for k, v in score_batch(model, card, x).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def evaluate_stage2(card_path: Path, manifest: Path, coco: Path, split: str, out_dir: Path,
                    device: str = "cpu") -> dict:
    _, card = load_stage2(card_path)
    crops = split_crops(manifest, coco, crop_size_for(card), splits=(split,))[split]
    if len(crops) == 0:
        raise ValueError(f"no {split!r} image of {manifest.name} has a cervix box in {coco.name}: nothing to score")
    scores = score_crops(card_path, crops, device=device)
    y = crops.non_regular.numpy()
    report = {k: m.as_dict() for k, m in metrics_by_group(y, scores["score"], threshold_of(card), crops.sources).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{card.name}_{card.input_size[0]}_{split}"
    write_json(out_dir / f"{stem}_metrics.json", report)
    # Everything the report needs, so it never reruns a model.
    np.savez_compressed(out_dir / f"{stem}_scores.npz", y=y, kinds=crops.kinds.numpy(),
                        sources=np.array(crops.sources), paths=np.array(crops.paths),
                        threshold=threshold_of(card), model=card.name, input_size=card.input_size[0],
                        split=split, **scores)
    return report
