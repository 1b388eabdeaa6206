"""`cervixqc train-detector`: COCO boxes in, a safetensors detector + model card out.

Wiring only (the torchvision references' train.py): data, model, optimiser, then the shared
loop in `pipelines.training.loop`, then export of the best epoch.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader

from models.detector import DetectorConfig, build_detector
from models.io import ModelCard, load_card, reading_weights, save_weights, sha256_file
from pipelines.data.coco import load_coco
from pipelines.data.detection import CocoDetection, MixedEpochSampler, collate
from pipelines.data.presets import detection_eval, detection_train
from pipelines.data.schema import on_disk
from pipelines.engine.detector import predict_dataset
from pipelines.evaluation.classification import margin_threshold
from pipelines.evaluation.coco_map import evaluate_detections
from pipelines.training.distributed import DistInfo, device_for, init_distributed, leave
from pipelines.training.loop import FitResult, LoopConfig, fit, recipe_of

log = logging.getLogger(__name__)


@dataclass
class DetectorTrainConfig:
    train_coco: Path
    val_coco: Path
    out_dir: Path
    train_images: Path | None = None  # default: the COCO file's folder
    val_images: Path | None = None
    model: DetectorConfig = field(default_factory=DetectorConfig)
    epochs: int = 12
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    grad_clip: float | None = 10.0
    workers: int = 2
    seed: int = 0
    resume: bool = False
    amp: bool = True
    extra_coco: Path | None = None
    extra_images: Path | None = None
    extra_ratio: float = 0.0
    backbone_weights: Path | None = None
    init_from: Path | None = None  # a detector card of ours (e.g. trained on synthetic data) to start from
    max_steps_per_epoch: int | None = None
    category: str = "cervix"  # the class whose presence threshold goes on the card
    permute_channels: bool = True  # RandomPhotometricDistort's channel orders (`detection_train`)
    quarter_turns: bool = False  # half the photos turned by 90 degrees too (`detection_train`)
    progress: bool = True


class DetectorTask:
    """torchvision detectors own their loss: training_step just hands it the targets."""

    def __init__(self, val_set: CocoDetection, batch_size: int) -> None:
        self.val_set, self.batch_size_ = val_set, batch_size
        self.last_predictions: dict = {}

    def training_step(self, model, batch, device):
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        return model(images, targets)

    def batch_size(self, batch) -> int:
        return len(batch[0])

    def validate(self, model, device) -> dict[str, float]:
        self.last_predictions = predict_dataset(model, self.val_set, device, self.batch_size_)
        m = evaluate_detections(self.val_set.coco, self.last_predictions)
        return {"map": m.map, "ap50": m.ap50, "ap75": m.ap75, "top1_recall50": m.top1_recall50}


def presence_threshold(gt_has_box: np.ndarray, top_scores: np.ndarray) -> tuple[float, float]:
    """The top-box score threshold that best tells images with a box from those without
    (balanced accuracy), chosen on validation and moved to the middle (logit space) of the
    score gap under it; (threshold, balanced accuracy)."""
    if gt_has_box.all() or not gt_has_box.any():
        return 0.5, float("nan")
    best = (0.5, -1.0)
    for t in np.unique(np.concatenate([top_scores, [0.5]])):
        pred = top_scores >= t
        bacc = 0.5 * (pred[gt_has_box].mean() + (~pred[~gt_has_box]).mean())
        if bacc > best[1]:
            best = (float(t), float(bacc))
    return margin_threshold(top_scores, best[0], "logit"), best[1]


def _loader(cfg: DetectorTrainConfig, dist_info: DistInfo) -> tuple[DataLoader, list[CocoDetection]]:
    train_coco = load_coco(cfg.train_coco)
    categories = [c.name for c in train_coco.categories]
    long_side = 2 * cfg.model.max_size
    augment = detection_train(permute_channels=cfg.permute_channels, quarter_turns=cfg.quarter_turns)
    train = CocoDetection(train_coco, cfg.train_images or cfg.train_coco.parent, augment, long_side, categories)
    datasets, n_extra = [train], 0
    if cfg.extra_coco is not None:
        extra = CocoDetection(load_coco(cfg.extra_coco), cfg.extra_images or cfg.extra_coco.parent,
                              augment, long_side, categories)
        if not len(extra):  # trained without it, and the card said extra_ratio 1.0 (an audit)
            raise ValueError(f"{cfg.extra_coco}: the extra boxes hold no image: --extra-coco would mix in nothing")
        datasets.append(extra)
        n_extra = len(extra)
    sampler = MixedEpochSampler(len(train), n_extra, cfg.extra_ratio, cfg.seed, dist_info.rank,
                                dist_info.world_size)
    loader = DataLoader(ConcatDataset(datasets), batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.workers, collate_fn=collate, drop_last=True,
                        persistent_workers=cfg.workers > 0, pin_memory=torch.cuda.is_available())
    return loader, datasets


def _check_sets(train: CocoDetection, val_coco, val_root: Path) -> None:
    """What used to surface late or never: a validation photo missing on disk crashed at the
    end of the first epoch with nothing saved; a training set without one box, or a
    validation set without one photo, trained and exported a card with a NaN mAP."""
    problems = []
    if not train.coco.annotations:
        problems.append("the training boxes hold no box")
    if not val_coco.images:
        problems.append("the validation boxes hold no image")
    elif not val_coco.annotations:  # mAP, which picks the best epoch, is undefined without a box
        problems.append("the validation boxes hold no box")
    for name, coco, root in (("training", train.coco, train.root), ("validation", val_coco, Path(val_root))):
        missing = [im.file_name for im in coco.images if not on_disk(root, im.file_name).is_file()]
        if missing:
            problems.append(f"{len(missing)} {name} images missing under {root} (first: {', '.join(missing[:3])})")
    if problems:
        raise ValueError("; ".join(problems))


def validation_trained_on(datasets: list[CocoDetection], val_coco, val_root: Path) -> int:
    """Validation photos that are training photos too (the same file, or the same sha256 where
    the box files record one, as the real photos' do). They chose the best epoch and the score
    threshold on photos trained on, exit 0 and unsaid: the training box file given twice
    (an audit). Warned of and counted on the card (`data.val_photos_trained_on`), not refused:
    a smoke run on one tiny set is a use of its own, and the tests train so."""
    val = {im.id: _photo_keys(im, Path(val_root)) for im in val_coco.images}
    trained = set().union(*(_photo_keys(im, ds.root) for ds in datasets for im in ds.coco.images))
    shared = [im.file_name for im in val_coco.images if val[im.id] & trained]
    if shared:
        log.warning("%d of %d validation photos are training photos too (first: %s): the best epoch, the score "
                    "threshold and the card's validation figures come from photos trained on; give validation "
                    "photos of their own", len(shared), len(val), ", ".join(shared[:3]))
    return len(shared)


def _photo_keys(im, root: Path) -> set[str]:
    """A photo of a box file as its resolved path and, where the file records it, its sha256."""
    sha = getattr(im, "sha256", None)
    return {str(on_disk(root, im.file_name).resolve())} | ({f"sha256 {sha}"} if sha else set())


def train_detector(cfg: DetectorTrainConfig) -> tuple[FitResult, Path | None]:
    """Trains, keeps the best epoch and exports it (rank 0). Under torchrun it does not return:
    each rank exits with status 0 once all are done (`distributed.leave`), rank 0 having logged
    the exported card."""
    dist_info = init_distributed()
    device = device_for(dist_info)
    torch.manual_seed(cfg.seed + dist_info.rank)
    loader, datasets = _loader(cfg, dist_info)
    train = datasets[0]
    val_coco = load_coco(cfg.val_coco)
    _check_sets(train, val_coco, cfg.val_images or cfg.val_coco.parent)
    trained_on = validation_trained_on(datasets, val_coco, cfg.val_images or cfg.val_coco.parent)
    model_cfg = DetectorConfig(**{**asdict(cfg.model), "num_classes": len(train.categories) + 1})
    backbone = None
    if cfg.backbone_weights is not None:
        from safetensors.torch import load_file

        p = str(cfg.backbone_weights)
        with reading_weights(p):
            backbone = load_file(p) if p.endswith(".safetensors") else torch.load(p, map_location="cpu",
                                                                                  weights_only=True)
    # a state dict that does not fit the backbone: named with its file too
    with reading_weights(cfg.backbone_weights) if backbone is not None else nullcontext():
        model = build_detector(model_cfg, backbone)
    init_scope = _init_from_card(model, model_cfg, cfg.init_from) if cfg.init_from is not None else None
    if init_scope is not None:
        if init_scope == "all":
            log.info("started from %s (%s)", cfg.init_from, init_scope)
        else:  # said at INFO alone, a run that kept a card's backbone only looked like a fine-tune (an audit)
            log.warning("started from %s: its backbone body only, the FPN and head from random (another "
                        "--fpn-channels than the card's)", cfg.init_from)
    model = model.to(device)
    if dist_info.enabled:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    val = CocoDetection(val_coco, cfg.val_images or cfg.val_coco.parent, detection_eval(),
                        2 * cfg.model.max_size, train.categories)
    task = DetectorTask(val, cfg.batch_size)
    loop = LoopConfig(out_dir=cfg.out_dir, epochs=cfg.epochs, warmup_iters=cfg.warmup_iters,
                      grad_clip=cfg.grad_clip, amp=cfg.amp, select_metric="map", resume=cfg.resume,
                      max_steps_per_epoch=cfg.max_steps_per_epoch, progress=cfg.progress,
                      recipe=recipe_of(cfg) | _box_files(cfg))
    result = fit(model, task, loader, optimizer, loop, device, dist_info)
    card = (export_best(cfg, model_cfg, train.categories, result, task, val, init_scope, trained_on)
            if dist_info.is_main else None)
    leave(dist_info)  # under torchrun the rank ends here, on success only: see its docstring
    return result, card


def _init_from_card(model, model_cfg: DetectorConfig, card_path: Path) -> str:
    """Start from one of our own detectors: the whole network, heads included. Nothing can be
    downloaded here, so a detector trained on the generator's scenes is the pretraining that
    real photos fine-tune (hSDB pretrains on synthetic data too). Same builder config only,
    except the FPN width: a narrower FPN and head start from the card's backbone body alone
    (they are new layers); and the input size: no weight depends on it (anchors are made for
    each input), so a detector moves to another size as the classifier does (progressive
    resizing). Returns what was loaded: "all" or "backbone body"."""
    from models.io import load_weights

    state, card = load_weights(card_path, names=("detector",))
    per_run = ("score_thresh", "nms_thresh", "detections_per_img", "min_size", "max_size")
    theirs = {"fpn_channels": 256} | {k: v for k, v in card.config.items() if k not in per_run}
    ours = {k: v for k, v in model_cfg.as_dict().items() if k in theirs}
    if theirs == ours:
        model.load_state_dict(state)
        return "all"
    if theirs | {"fpn_channels": None} != ours | {"fpn_channels": None}:  # only the width may differ
        raise ValueError(f"{card_path} is a {theirs}, not a {ours}")
    prefix = "backbone.body."
    model.backbone.body.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return "backbone body"


def export_best(cfg: DetectorTrainConfig, model_cfg: DetectorConfig, categories: list[str], result: FitResult,
                task: DetectorTask, val: CocoDetection, init_scope: str | None = None,
                val_trained_on: int = 0) -> Path | None:
    """Best epoch -> detector.safetensors + detector.json, with a validation-chosen threshold."""
    if result.best_weights is None:
        return None
    from safetensors.torch import load_file

    model = build_detector(model_cfg)
    model.load_state_dict(load_file(str(result.best_weights)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preds = predict_dataset(model.to(device), val, device, cfg.batch_size)  # on the CPU beside a GPU's images: failed
    has_box = {a.image_id for a in val.coco.annotations}
    ids = [im.id for im in val.coco.images]
    top = np.array([float(preds[i]["scores"].max()) if len(preds[i]["scores"]) else 0.0 for i in ids])
    threshold, bacc = presence_threshold(np.array([i in has_box for i in ids]), top)
    chosen = "validation, max balanced accuracy"
    if math.isnan(bacc):  # nothing to tell apart; the card says so beside the threshold
        chosen = "default 0.5: no validation photo without a box"
        log.warning("the validation set has no photo without a box (or none with one): the score threshold is the "
                    "default 0.5, not chosen; add photos without a cervix to validation to choose it")
    card = ModelCard(
        name="detector", architecture=f"{model_cfg.arch}_{model_cfg.backbone}_fpn", config=model_cfg.as_dict(),
        input_size=[model_cfg.min_size, model_cfg.max_size],
        preprocessing={"scale": "RGB float in [0, 1]; the model normalises and resizes internally",
                       "decode_long_side": 2 * model_cfg.max_size},
        classes=categories, thresholds={"score": threshold},
        training={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "model"}
        | {"optimizer": "AdamW", "schedule": "linear warm-up + cosine", "best_epoch": result.best_epoch,
           # the path names a file that may change or vanish; the sha256 names the starting weights
           "init_from_sha256": load_card(cfg.init_from).sha256 if cfg.init_from is not None else None,
           "init_scope": init_scope},
        data={"train": str(cfg.train_coco), "val": str(cfg.val_coco),
              "extra": str(cfg.extra_coco) if cfg.extra_coco else None, "val_photos_trained_on": val_trained_on}
        | _box_files(cfg, digits=64),  # the paths name files that may change; these name their content
        metrics={"val": result.best_metrics, "val_presence_balanced_accuracy": bacc,
                 "score_threshold_from": chosen},
    )
    path = save_weights(model.state_dict(), Path(cfg.out_dir) / "detector", card)
    log.info("exported %s (%s)", path, json.dumps(result.best_metrics))
    return path


def _box_files(cfg: DetectorTrainConfig, digits: int = 16) -> dict[str, str]:
    """The box files by content, for the resume check (one edited at the same path was
    resumed unsaid: an audit) and, whole, on the card. The photos themselves are not hashed
    (minutes on an archive)."""
    files = {"train_coco": cfg.train_coco, "val_coco": cfg.val_coco, "extra_coco": cfg.extra_coco}
    return {f"{k}_sha256": sha256_file(p)[:digits] for k, p in files.items() if p is not None}
