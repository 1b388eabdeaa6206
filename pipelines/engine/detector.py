"""Running a trained detector: load it from its card, predict on batches, map boxes back to
the COCO file's (full-resolution) pixels and category ids."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from models.detector import DetectorConfig, build_detector
from models.io import ModelCard, WeightsIntegrityError, load_weights
from pipelines.data.detection import CocoDetection, collate
from pipelines.engine.loading import loading


def load_detector(card_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    with loading(card_path):
        state, card = load_weights(card_path, names=("detector",))
        model = build_detector(DetectorConfig(**card.config))
        model.load_state_dict(state)
    return model.to(device).eval(), card


def score_threshold(card: ModelCard) -> float:
    """The card's confidence threshold, as the engine reads it: `detect`, `propose-boxes` and
    `eval-detector` fell back to 0.5 on a card without one, and wrote boxes at it unsaid
    where the engine refused the card (an audit)."""
    if "score" not in card.thresholds:
        raise WeightsIntegrityError(f"the {card.name} card has no 'score' threshold (it has: "
                                    f"{', '.join(card.thresholds) or 'none'})")
    return card.thresholds["score"]


@torch.inference_mode()
def predict(model: nn.Module, images: Sequence[torch.Tensor], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Float CHW images in [0, 1] -> torchvision detections (boxes in the images' pixels)."""
    if model.training:
        model.eval()
    outs = model([im.to(device, non_blocking=True) for im in images])
    return [{k: v.cpu() for k, v in o.items()} for o in outs]


Convolutions = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def resized_then_normalized(transform: GeneralizedRCNNTransform, images: Sequence[torch.Tensor]) -> ImageList:
    """torchvision's eval transform (`GeneralizedRCNNTransform.forward`) with its two per-pixel
    steps swapped: each image resized, then normalized, then padded into one batch. Both steps
    are linear per channel (the bilinear weights sum to 1), so the values agree to float
    rounding, and the normalization then reads the 320 px input instead of the decoded photo
    (640 px or more). Measured on the engine's chunks of the 300 real-mix photos, 2-core CPU,
    alternating: the transform took 0.24-0.25 s, swapped 0.16-0.17 s (of a detector stage of
    about 2.4 s); the engine's labels, boxes, scores and findings on all 300 were unchanged."""
    resized = [transform.resize(im)[0] for im in images]
    normalized = [transform.normalize(im) for im in resized]
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in normalized]
    return ImageList(transform.batch_images(normalized, size_divisible=transform.size_divisible), sizes)


def padded_shape(transform: GeneralizedRCNNTransform, height: int, width: int) -> tuple[int, int]:
    """The detector input's shape for this image alone: resized as torchvision's eval transform
    does (`_resize_image_and_masks`: the scale in double precision, the size floored by
    `interpolate`), then padded up to `size_divisible`. Images batched together are padded to
    the largest, and a portrait photo padded to a square gets other features near its edge,
    so another box: the engine batches only images of one shape (tests/test_qc_engine.py
    holds this to the shape the transform really gives)."""
    if transform.fixed_size is not None:
        h, w = transform.fixed_size[1], transform.fixed_size[0]
    else:
        scale = min(transform.min_size[-1] / min(height, width), transform.max_size / max(height, width))
        h, w = math.floor(height * scale), math.floor(width * scale)
    d = transform.size_divisible
    return math.ceil(h / d) * d, math.ceil(w / d) * d


def shape_chunks(transform: GeneralizedRCNNTransform, shapes: Sequence[tuple[int, int]], n: int) -> list[list[int]]:
    """Positions of images of these (H, W) in chunks of at most `n` that share one detector
    input shape (`padded_shape`), in input order within a shape: run chunk by chunk, no image
    is padded for its neighbours' sake."""
    key = [padded_shape(transform, h, w) for h, w in shapes]
    order = sorted(range(len(shapes)), key=lambda k: (key[k], k))
    groups = [list(g) for _, g in itertools.groupby(order, key=key.__getitem__)]
    return [group[j : j + n] for group in groups for j in range(0, len(group), n)]


def best_detections(model: RetinaNet, cls_logits: torch.Tensor, bbox_regression: torch.Tensor,
                    anchors: Sequence[torch.Tensor], per_level: Sequence[int], image_sizes: Sequence[tuple[int, int]],
                    original_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """Each image's best detection (none below `score_thresh`) in its original pixels: what
    RetinaNet's `postprocess_detections` + `transform.postprocess` put first, for the whole
    chunk in one set of tensor operations instead of some twenty per image and level.

    The engine reads only the best box of a photo, and non-maximum suppression never removes
    the highest score, so the per-level top-k, the other boxes and the NMS itself are work the
    engine throws away. Where torchvision's answer depends on an order this shortcut cannot see
    (two candidates tied at the best score, whose order the top-k leaves unspecified; a NaN
    logit), that image goes through torchvision's own code. Each step is torchvision's own
    element-wise arithmetic on the same values (sigmoid per level, `box_coder.decode_single`,
    the clip, the resize), so boxes, scores and labels come out bit for bit as torchvision's
    best detection (tests/test_detector_models.py). Replayed on the engine's 75 chunks of the
    300 real-mix photos (8 photos through the fallback, all 300 equal), 2-core CPU, the two
    postprocess steps took 0.21 s with torchvision, 0.033 s this way. The regression is
    decoded in float32 also under bf16 autocast, where torchvision (and so the fallback) casts
    the anchors to bf16 (a 2 px step at 320 px)."""
    n, num_classes = cls_logits.shape[0], cls_logits.shape[-1]
    if n == 0:
        return []
    level_scores = [torch.sigmoid(level).flatten(1) for level in cls_logits.split(list(per_level), 1)]
    best = [s.max(1) for s in level_scores]
    level_best = torch.stack([b.values for b in best], 1)  # [N, levels]
    top, level = level_best.max(1)  # the first level holding the best: the first in torchvision's concatenation
    ties = sum((s == top[:, None]).sum(1) for s in level_scores)
    found = top > model.score_thresh
    fallback = level_best.isnan().any(1) | (found & (ties > 1))
    at = torch.stack([b.indices for b in best], 1).gather(1, level[:, None]).squeeze(1)
    starts = torch.tensor([sum(per_level[:k]) for k in range(len(per_level))], device=at.device)
    anchor = starts[level] + torch.div(at, num_classes, rounding_mode="floor")
    rows = torch.arange(n, device=at.device)
    boxes = model.box_coder.decode_single(bbox_regression[rows, anchor].float(), torch.stack(list(anchors))[rows, anchor])
    resized = torch.tensor(list(image_sizes), dtype=torch.float32, device=boxes.device)  # (h, w) each
    original = torch.tensor(list(original_sizes), dtype=torch.float32, device=boxes.device)
    # torchvision's clip_boxes_to_image and resize_boxes with each image's own bounds and ratios
    xs = torch.minimum(boxes[:, 0::2].clamp(min=0), resized[:, 1:])
    ys = torch.minimum(boxes[:, 1::2].clamp(min=0), resized[:, :1])
    ratio = original / resized
    boxes = torch.stack((xs * ratio[:, 1:], ys * ratio[:, :1]), 2).reshape(n, 4)
    boxes, scores, labels, fallback = (t.cpu() for t in (boxes, top, at % num_classes, fallback))
    out = [{"boxes": boxes[k : k + 1], "scores": scores[k : k + 1], "labels": labels[k : k + 1]} if hit
           else {"boxes": boxes[:0], "scores": scores[:0], "labels": labels[:0]} for k, hit in enumerate(found.tolist())]
    for k in fallback.nonzero().flatten().tolist():
        det = all_detections(model, cls_logits[k : k + 1], bbox_regression[k : k + 1], anchors[k : k + 1], per_level,
                             image_sizes[k : k + 1], original_sizes[k : k + 1])[0]
        out[k] = {key: v[:1] for key, v in det.items()}
    return out


def all_detections(model: RetinaNet, cls_logits: torch.Tensor, bbox_regression: torch.Tensor,
                   anchors: Sequence[torch.Tensor], per_level: Sequence[int], image_sizes: Sequence[tuple[int, int]],
                   original_sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """RetinaNet's own decoding of the concatenated head outputs (per-level top-k, NMS) into
    detections in the images' original pixels, on the CPU."""
    levels = list(per_level)
    head = {"cls_logits": list(cls_logits.split(levels, 1)), "bbox_regression": list(bbox_regression.split(levels, 1))}
    dets = model.postprocess_detections(head, [list(a.split(levels)) for a in anchors], list(image_sizes))
    dets = model.transform.postprocess(dets, list(image_sizes), list(original_sizes))
    return [{k: v.cpu() for k, v in d.items()} for d in dets]


@torch.inference_mode()
def detect(model: nn.Module, images: Sequence[torch.Tensor], device: torch.device,
           convolutions: Convolutions | None = None,
           best_only: bool = False) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], ImageList]:
    """Detections in the images' pixels, the FPN maps (stage 0 pools them) and the padded
    batch they came from.

    Without `convolutions`: torchvision's own forward, any architecture, with the padded batch
    and the maps read by forward hooks (no second pass). With them (an exported graph's, from
    `pipelines.engine.openvino_runtime`): RetinaNet's eval forward step by step, in its order,
    with those convolutions in place of backbone + head; tests/test_exported_runtime.py holds
    the two paths to the same boxes. `best_only` (with convolutions): each image's best
    detection alone, through `best_detections`."""
    if best_only and convolutions is None:
        raise ValueError("best_only decodes step by step: it needs the convolutions")
    if model.training:  # eval() walks all 297 submodules: 0.75 ms, per chunk of 4 photos on the CPU
        model.eval()
    if convolutions is None:
        seen: dict = {}
        hooks = [model.transform.register_forward_hook(lambda m, i, o: seen.__setitem__("batch", o[0])),
                 model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("maps", list(o.values())))]
        try:
            dets = predict(model, images, device)
        finally:
            for h in hooks:
                h.remove()
        return dets, seen["maps"], seen["batch"]
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    batch = resized_then_normalized(model.transform, [im.to(device, non_blocking=True) for im in images])
    cls_logits, bbox_regression, *maps = convolutions(batch.tensors)
    anchors = model.anchor_generator(batch, maps)
    per_level = [m.shape[-2] * m.shape[-1] for m in maps]
    per_anchor = cls_logits.shape[1] // sum(per_level)
    per_level = [n * per_anchor for n in per_level]
    decode = best_detections if best_only else all_detections
    return decode(model, cls_logits, bbox_regression, anchors, per_level, batch.image_sizes, original_sizes), maps, batch


def predict_dataset(model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 8,
                    workers: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Image id -> detections in the COCO file's pixels with COCO category ids. Each loaded
    batch runs in chunks of one detector-input shape (`shape_chunks`), as the engine does:
    an image's detections, and so the mAP, do not depend on which images share its batch."""
    cat_of = {label: cid for cid, label in dataset.label_of.items()}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)
    transform = getattr(model, "transform", None)
    result = {}
    for images, targets in loader:
        if isinstance(transform, GeneralizedRCNNTransform):
            chunks = shape_chunks(transform, [tuple(im.shape[-2:]) for im in images], len(images))
        else:
            chunks = [list(range(len(images)))]
        for chunk in chunks:
            for det, tgt in zip(predict(model, [images[k] for k in chunk], device), [targets[k] for k in chunk]):
                sx, sy = tgt["scale"].tolist()
                # RetinaNet scores label 0 (background) like any class; a low score_thresh lets it through
                known = torch.tensor([int(v) in cat_of for v in det["labels"]], dtype=torch.bool)
                boxes = det["boxes"][known] / torch.tensor([sx, sy, sx, sy])
                labels = torch.tensor([cat_of[int(v)] for v in det["labels"][known]], dtype=torch.int64)
                result[int(tgt["image_id"])] = {"boxes": boxes, "scores": det["scores"][known], "labels": labels}
    return result


DETECTED = "top boxes of detector "  # a box file `detect_to_coco` wrote: its description begins so


def detect_to_coco(model: nn.Module, card: ModelCard, files: Sequence[Path], names: Sequence[str],
                   device: str = "cpu", batch_size: int = 8, min_score: float | None = None):
    """The detector's top box per image file as COCO, the image named as `names` says (score
    kept as an extra field), so stage 2 can train and be evaluated on detector crops; and the
    names of the files that could not be read. Those are left out and listed: one corrupt photo
    was a traceback that lost the boxes of every other (an audit); stage 2's `--allow-unboxed`
    counts them with the detector's misses."""
    from PIL import Image

    from pipelines.data.coco import CERVIX, CocoCategory, CocoDataset, CocoImage, make_annotation
    from pipelines.data.images import load_rgb

    threshold = score_threshold(card) if min_score is None else min_score
    label = card.classes.index(CERVIX) + 1 if CERVIX in card.classes else 1
    images, anns, unreadable = [], [], []
    dev = torch.device(device)
    for start in range(0, len(files), batch_size):
        chunk = []
        for path, name in zip(files[start : start + batch_size], names[start : start + batch_size]):
            try:
                chunk.append((path, name, load_rgb(path, 2 * card.config["max_size"])))
            except ValueError:
                unreadable.append(name)
        if not chunk:
            continue
        dets = predict(model, [t.float() / 255 for _, _, (t, _, _) in chunk], dev)
        for (path, name, (t, sx, sy)), det in zip(chunk, dets):
            image_id = len(images) + 1
            with Image.open(path) as im:
                w, h = im.size if not (sx and sy) else (round(t.shape[2] / sx), round(t.shape[1] / sy))
            images.append(CocoImage(id=image_id, file_name=name, width=w, height=h))
            keep = det["labels"] == label
            if keep.any() and float(det["scores"][keep].max()) >= threshold:
                i = int(det["scores"][keep].argmax())
                box = det["boxes"][keep][i] / torch.tensor([sx, sy, sx, sy])
                box[0::2] = box[0::2].clamp(0, w)
                box[1::2] = box[1::2].clamp(0, h)
                if box[2] - box[0] > 1 and box[3] - box[1] > 1:
                    ann = make_annotation(len(anns) + 1, image_id, 1, box.tolist())
                    ann.score = round(float(det["scores"][keep][i]), 4)  # type: ignore[attr-defined]
                    anns.append(ann)
    info = {"description": f"{DETECTED}{card.sha256[:12]}", "threshold": threshold,
            "unreadable": len(unreadable)}
    return CocoDataset(info=info, images=images, annotations=anns,
                       categories=[CocoCategory(id=1, name=CERVIX)]), unreadable


def top_box_fn(card_path: str | Path, min_score: float | None = None, device: str = "cpu"):
    """path -> Proposal of the detector's top box in the file's full-size pixels (None box
    below the threshold, default the card's): the proposer for `cervixqc propose-boxes`."""
    from pipelines.data.box_proposals import Proposal
    from pipelines.data.images import load_rgb

    model, card = load_detector(card_path, device)
    threshold = score_threshold(card) if min_score is None else min_score
    dev = torch.device(device)

    def detect(path) -> Proposal:
        image, sx, sy = load_rgb(path, 2 * card.config["max_size"])
        det = predict(model, [image.float() / 255], dev)[0]
        if not len(det["scores"]) or float(det["scores"].max()) < threshold:
            return Proposal(None, float(det["scores"].max()) if len(det["scores"]) else 0.0, "none")
        k = int(det["scores"].argmax())
        box = (det["boxes"][k] / torch.tensor([sx, sy, sx, sy])).tolist()
        return Proposal(box, float(det["scores"][k]), "detector")

    return detect
