"""`cervixqc eval-detector`: COCO metrics of a trained detector on a COCO set, per source when
a manifest is given, and a PNG gallery of predictions beside the ground truth."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipelines.data.coco import CocoDataset, load_coco
from pipelines.data.detection import CocoDetection
from pipelines.data.images import load_rgb
from pipelines.data.presets import detection_eval
from pipelines.data.schema import on_disk
from pipelines.engine.detector import load_detector, predict_dataset
from pipelines.evaluation.coco_map import evaluate_detections, presence
from pipelines.outputs import write_json


def evaluate_detector(card: Path, coco_path: Path, images: Path | None, out_dir: Path,
                      device: str = "cpu", batch_size: int = 8, gallery: int = 24,
                      manifest: Path | None = None) -> dict:
    model, mcard = load_detector(card, device)
    coco = load_coco(coco_path)
    root = images or coco_path.parent
    ds = CocoDetection(coco, root, detection_eval(), 2 * mcard.config["max_size"], mcard.classes)
    preds = predict_dataset(model, ds, torch.device(device), batch_size)
    threshold = mcard.thresholds.get("score", 0.5)
    report = {"overall": evaluate_detections(coco, preds).as_dict() | presence(coco, preds, threshold)}
    if manifest is not None:
        import pandas as pd

        src = dict(zip(*pd.read_csv(manifest, dtype=str)[["path", "source"]].T.values))
        present = {src.get(im.file_name) for im in coco.images} - {None}
        for source in sorted(present):
            ids = {im.id for im in coco.images if src.get(im.file_name) == source}
            sub = CocoDataset(images=[im for im in coco.images if im.id in ids],
                              annotations=[a for a in coco.annotations if a.image_id in ids],
                              categories=coco.categories)
            mine = {i: p for i, p in preds.items() if i in ids}
            report[source] = evaluate_detections(sub, mine).as_dict() | presence(sub, mine, threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    # NaN where a figure has no images (no AP without a box): null, so the file is JSON
    write_json(out_dir / "detector_metrics.json", report)
    if gallery:
        draw_gallery(coco, root, preds, out_dir / "detector_gallery.png", mcard.thresholds.get("score", 0.5), gallery)
    return report


def draw_gallery(coco: CocoDataset, root: Path, preds: dict, path: Path, threshold: float, n: int,
                 cell: int = 256) -> Path:
    """Ground truth in green, the top prediction in red (dashed when under the threshold)."""
    chosen = coco.images[:: max(1, len(coco.images) // n)][:n]
    cols = 6
    rows = -(-len(chosen) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), "white")
    truth: dict[int, list] = {}
    for a in coco.annotations:
        truth.setdefault(a.image_id, []).append(a.bbox)
    for k, im in enumerate(chosen):
        t, _, _ = load_rgb(on_disk(root, im.file_name), cell)
        thumb = Image.fromarray(t.permute(1, 2, 0).numpy())
        s = min(cell / im.width, cell / im.height)
        thumb = thumb.resize((max(1, int(im.width * s)), max(1, int(im.height * s))))
        d = ImageDraw.Draw(thumb)
        for x, y, w, h in truth.get(im.id, []):
            d.rectangle([x * s, y * s, (x + w) * s, (y + h) * s], outline=(0, 255, 0), width=2)
        det = preds.get(im.id)
        if det is not None and len(det["scores"]):
            i = int(det["scores"].argmax())
            x1, y1, x2, y2 = (det["boxes"][i] * s).tolist()
            score = float(det["scores"][i])
            d.rectangle([x1, y1, x2, y2], outline=(255, 0, 0), width=2 if score >= threshold else 1)
            d.text((x1 + 3, y1 + 3), f"{score:.2f}", fill=(255, 0, 0))
        sheet.paste(thumb, ((k % cols) * cell, (k // cols) * cell))
    sheet.save(path)
    return path
