"""Detector metrics through pycocotools (never a hand-written mAP), plus the one number the
crop stage lives on: top-1 recall at IoU 0.5 (is the best box on the cervix?)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from pipelines.data.coco import CocoDataset

# One image's detections: xyxy boxes in the COCO file's pixels, scores, category ids.
Detections = dict[str, torch.Tensor]


@dataclass
class DetectionMetrics:
    map: float  # mAP@[.5:.95], COCO stats[0] (maxDets=100)
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    per_class_ap: dict[str, float] = field(default_factory=dict)
    top1_recall50: float = 0.0  # over images with at least one ground-truth box
    n_images: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _coco_api(ds: CocoDataset) -> COCO:
    api = COCO()
    api.dataset = ds.model_dump(mode="json")
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def evaluate_detections(gt: CocoDataset, predictions: dict[int, Detections]) -> DetectionMetrics:
    """`predictions` maps image id -> {"boxes", "scores", "labels" (COCO category ids)}.

    A set without one ground-truth box (a source of negatives only) has no AP: NaN, as its
    top-1 recall already was, not the 0.0 that read as a detector failing on that source
    (pycocotools' -1 clamped). What a detector does on negatives is `presence`'s figure."""
    if not gt.annotations:
        nan = float("nan")
        return DetectionMetrics(*([nan] * 6), top1_recall50=nan, n_images=len(gt.images))
    results = []
    for image_id, det in predictions.items():
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    metrics = _no_detections(gt)
    if results:  # loadRes([]) raises; no detections at all is AP 0 wherever a box was to be found
        api = _coco_api(gt)
        with contextlib.redirect_stdout(io.StringIO()):
            dets = api.loadRes(results)
            ev = COCOeval(api, dets, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # -1 is pycocotools' "no ground-truth box in this range": undefined (NaN, null in the
        # JSON), not 0.0, which read as a detector failing on small and medium cervixes
        s = [float(v) if v >= 0 else float("nan") for v in ev.stats[:6]]
        metrics = DetectionMetrics(*s, n_images=len(gt.images))
        precision = ev.eval["precision"]  # [T, R, K, A, M]; area "all", maxDets 100
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            valid = p[p > -1]
            name = next(c.name for c in gt.categories if c.id == cat_id)
            metrics.per_class_ap[name] = float(valid.mean()) if valid.size else float("nan")
    metrics.top1_recall50 = top1_recall(gt, predictions)
    return metrics


def _no_detections(gt: CocoDataset) -> DetectionMetrics:
    """The figures of a detector that found nothing: 0.0 where a ground-truth box was to be found,
    NaN where COCOeval would say -1 (an area range, or a category, without one). All six read 0.0
    before, a "small"/"medium" AP of 0 beside the NaN the same set reads with one detection (an
    audit). The ranges are COCOeval's own (`Params.areaRng`; a box counts where lo <= area <= hi)."""
    boxes = [a for a in gt.annotations if not a.iscrowd]
    ranges = COCOeval(iouType="bbox").params.areaRng  # all, small, medium, large

    def ap(inside) -> float:
        return 0.0 if any(inside(a) for a in boxes) else float("nan")

    by_area = [ap(lambda a, lo=lo, hi=hi: lo <= a.area <= hi) for lo, hi in ranges]
    metrics = DetectionMetrics(by_area[0], by_area[0], by_area[0], *by_area[1:], n_images=len(gt.images))
    metrics.per_class_ap = {c.name: ap(lambda a, cid=c.id: a.category_id == cid) for c in gt.categories}
    return metrics


def top1_recall(gt: CocoDataset, predictions: dict[int, Detections], iou: float = 0.5,
                category: str | None = None) -> float:
    """Share of images with a ground-truth box whose highest-scoring box overlaps one by >= iou."""
    cat = gt.category_id(category) if category else None
    truth: dict[int, list[list[float]]] = {}
    for a in gt.annotations:
        if cat is None or a.category_id == cat:
            x, y, w, h = a.bbox
            truth.setdefault(a.image_id, []).append([x, y, x + w, y + h])
    if not truth:
        return float("nan")
    hits = 0
    for image_id, boxes in truth.items():
        det = predictions.get(image_id)
        if det is None or len(det["scores"]) == 0:
            continue
        keep = det["labels"] == cat if cat is not None else torch.ones_like(det["scores"], dtype=torch.bool)
        if not keep.any():
            continue
        best = det["boxes"][keep][int(np.argmax(det["scores"][keep].numpy()))]
        hits += bool(box_iou(best[None], torch.tensor(boxes)).max() >= iou)
    return hits / len(truth)


def presence(gt: CocoDataset, predictions: dict[int, Detections], threshold: float) -> dict[str, float]:
    """The decision the engine takes from the detector alone, at the card's threshold: share
    of images with a box whose top score reaches it (cervix found) and share of images
    without one whose top score stays under it (called no_cervix), with their counts."""
    has_box = {a.image_id for a in gt.annotations}
    found = rejected = n_box = n_none = 0
    for im in gt.images:
        det = predictions.get(im.id)
        top = float(det["scores"].max()) if det is not None and len(det["scores"]) else 0.0
        if im.id in has_box:
            n_box += 1
            found += top >= threshold
        else:
            n_none += 1
            rejected += top < threshold
    return {"threshold": threshold, "cervix_found": found / n_box if n_box else float("nan"), "n_cervix": n_box,
            "no_cervix_called": rejected / n_none if n_none else float("nan"), "n_no_cervix": n_none}
