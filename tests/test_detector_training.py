"""A tiny detector really trains: loss falls, mAP > 0, resume continues, export loads,
and two gloo processes under torchrun train together."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from models.detector import DetectorConfig
from models.io import load_card
from pipelines.data.detection import MixedEpochSampler
from pipelines.data.synth import SizePolicy, SynthConfig, generate
from pipelines.engine.detector import load_detector
from pipelines.training.detector import DetectorTrainConfig, presence_threshold, train_detector
from tests.uvicorn_process import free_port


@pytest.fixture(scope="module")
def boxes_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det")
    cfg = SynthConfig(n_images=24, seed=3, ratio=5.0, no_cervix_fraction=0.1, size=SizePolicy(max_side=128))
    return generate(cfg, out, workers=1).coco


def _cfg(coco: Path, out: Path, **kw) -> DetectorTrainConfig:
    # FPN width 128, not torchvision's 256: RetinaNet's head scales with its square (the loss-falls test took
    # 52 s alone at 256, 25 s at 128) and its mAP after 4 epochs is 0.034 at 128, 0.011 at 256, 0.006 at 64
    base = dict(train_coco=coco, val_coco=coco, out_dir=out, workers=0, batch_size=4, lr=1e-3, warmup_iters=5,
                model=DetectorConfig(backbone="resnet18", min_size=128, max_size=128, fpn_channels=128), progress=False)
    return DetectorTrainConfig(**{**base, **kw})


def test_tiny_detector_loss_falls_and_map_becomes_positive_then_resume_continues(boxes_set, tmp_path):
    torch.manual_seed(0)
    result, card = train_detector(_cfg(boxes_set, tmp_path, epochs=4))
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]
    assert result.best_metrics["map"] > 0
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]

    model, mcard = load_detector(card)
    assert mcard.classes == ["cervix"] and 0 <= mcard.thresholds["score"] <= 1
    assert mcard.metrics["val"]["map"] == pytest.approx(result.best_metrics["map"])
    from models.io import sha256_file

    assert mcard.data["train_coco_sha256"] == sha256_file(boxes_set)  # the boxes by content, not by path
    chosen = mcard.metrics["val_presence_balanced_accuracy"] is not None  # null where there is nothing to choose on
    assert mcard.metrics["score_threshold_from"] == (
        "validation, max balanced accuracy" if chosen else "default 0.5: no validation photo without a box")

    resumed, _ = train_detector(_cfg(boxes_set, tmp_path, epochs=5, resume=True))
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3, 4]  # picked up at epoch 4
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3, 4]


def test_mixed_sampler_adds_the_extra_share_and_shards_without_overlap():
    one = MixedEpochSampler(100, 40, extra_ratio=0.5, seed=1)
    idx = list(one)
    assert len(idx) == 150 and sorted(i for i in idx if i < 100) == list(range(100))
    assert sum(i >= 100 for i in idx) == 50
    shards = [list(MixedEpochSampler(100, 40, 0.5, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 75
    assert sorted(shards[0] + shards[1]) == sorted(idx)
    one.set_epoch(1)
    assert list(one) != idx


def test_presence_threshold_separates_images_with_and_without_boxes():
    has = np.array([True, True, True, False, False])
    t, bacc = presence_threshold(has, np.array([0.9, 0.8, 0.6, 0.3, 0.5]))
    assert 0.5 < t <= 0.6 and bacc == 1.0


@pytest.mark.slow
def test_two_gloo_processes_train_together_under_torchrun(boxes_set, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pipelines.cli", "train-detector", str(boxes_set), str(boxes_set), "-o", str(tmp_path),
           "--backbone", "resnet18", "--size", "96", "--epochs", "1", "--batch-size", "2", "--workers", "0",
           "--max-steps", "3", "--warmup", "2"]
    output = tmp_path / "torchrun.log"
    with output.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(240)
        except subprocess.TimeoutExpired:
            # Each process's threads (name, kernel wait), then SIGABRT one at a time so that
            # faulthandler's Python stacks reach the log unmixed, torchrun's first; then all go,
            # ranks included (killing torchrun alone once left a rank running for good).
            # torchrun starts each rank in a session of its own, out of reach of a signal to its group
            pids = [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
            threads = "\n".join(f"{pid}: {_threads(pid)}" for pid in pids)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
                time.sleep(2)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"torchrun still running after 240 s; threads:\n{threads}\n"
                        f"its output and stacks:\n{output.read_text()[-12000:]}")
    assert returncode == 0, output.read_text()[-3000:]
    assert "exported" in output.read_text()  # rank 0 logged its card before the ranks left
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])  # written once, by rank 0
    assert log[0]["world_size"] == 2  # the loss averaged over both ranks (a collective both joined)
    assert (tmp_path / "detector.json").is_file() and (tmp_path / "checkpoint.pt").is_file()


def _threads(pid: int) -> str:
    """'name/wait' per thread of a process, from /proc (a hang's native side, which faulthandler
    does not show)."""
    names = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            names.append(f"{(task / 'comm').read_text().strip()}/{(task / 'wchan').read_text().strip() or '-'}")
    return " ".join(names)


def test_bench_reports_inference_per_batch_size_and_training_rates(boxes_set):
    from pipelines.evaluation.detector_bench import bench_detector

    cfg = DetectorConfig(backbone="resnet18", min_size=96, max_size=96)
    r = bench_detector(cfg, boxes_set, n_images=8, batch_sizes=(1, 4), train_batch=4, rounds=1)
    assert r["infer_b1_images_per_s"] > 0 and r["infer_b4_images_per_s"] > 0 and r["train_images_per_s"] > 0
    assert r["infer_b4_vs_b1"] == pytest.approx(r["infer_b4_images_per_s"] / r["infer_b1_images_per_s"])


def test_detect_writes_detector_boxes_as_coco_that_stage2_can_crop(boxes_set, tmp_path):
    import pandas as pd

    from pipelines.data.coco import load_coco, save_coco
    from pipelines.data.crop_set import extract_crops
    from pipelines.engine.detector import detect_to_coco, load_detector

    torch.manual_seed(0)
    untrained_ok = DetectorConfig(backbone="resnet18", min_size=128, max_size=128, score_thresh=0.0)
    _, card = train_detector(_cfg(boxes_set, tmp_path, epochs=1, max_steps_per_epoch=2, model=untrained_ok))
    manifest = pd.read_csv(boxes_set.parent / "manifest.csv", dtype=str)
    model, mcard = load_detector(card)
    ds, unreadable = detect_to_coco(model, mcard, [boxes_set.parent / p for p in manifest["path"]],
                                    list(manifest["path"]), min_score=0.0)
    assert unreadable == []
    path = save_coco(ds, tmp_path / "det.json")  # valid COCO: boxes inside their images
    back = load_coco(path)
    assert len(back.images) == len(manifest) and len(back.annotations) > 0
    truth = {im.file_name: (im.width, im.height) for im in load_coco(boxes_set).images}
    assert all(truth[im.file_name] == (im.width, im.height) for im in back.images)
    manifest["abspath"] = [str(boxes_set.parent / p) for p in manifest["path"]]
    crops = extract_crops(manifest, back.boxes_by_file(), 32, allow_unboxed=True)  # a detector's: misses allowed
    assert len(crops) > 0 and crops.images.dtype == torch.uint8


def test_training_can_start_from_our_own_detector_at_any_input_size_and_refuses_another_architecture(
        boxes_set, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    _, first = train_detector(_cfg(boxes_set, tmp_path / "a", epochs=1, max_steps_per_epoch=2))
    start, _ = load_detector(first)
    # lr 0: the run changes nothing, so its export must equal its starting point exactly
    _, second = train_detector(_cfg(boxes_set, tmp_path / "b", epochs=1, max_steps_per_epoch=1, lr=0.0,
                                    init_from=first))
    exported = load_file(str(second.with_suffix(".safetensors")))
    conv = "backbone.body.conv1.weight"
    assert torch.equal(exported[conv], start.state_dict()[conv])
    assert load_card(second).training["init_from_sha256"] == load_card(first).sha256  # the start, by content
    assert load_card(second).training["init_scope"] == "all"
    # another input size is the same network (anchors are made per input): every weight loads
    smaller = DetectorConfig(backbone="resnet18", min_size=96, max_size=96, fpn_channels=128)
    _, resized = train_detector(_cfg(boxes_set, tmp_path / "d", epochs=1, max_steps_per_epoch=1, lr=0.0,
                                     init_from=first, model=smaller))
    head = "head.classification_head.conv.0.0.weight"
    assert torch.equal(load_file(str(resized.with_suffix(".safetensors")))[head], start.state_dict()[head])
    assert load_card(resized).training["init_scope"] == "all" and load_card(resized).config["max_size"] == 96
    other = _cfg(boxes_set, tmp_path / "c", epochs=1, max_steps_per_epoch=1, init_from=first,
                 model=DetectorConfig(backbone="resnet34", min_size=128, max_size=128))
    with pytest.raises(ValueError, match="not a"):
        train_detector(other)


def test_a_narrower_fpn_starts_from_our_detectors_backbone_alone_and_loads_at_its_width(boxes_set, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    wide = DetectorConfig(backbone="resnet18", min_size=128, max_size=128, fpn_channels=256)  # as a legacy card
    _, first = train_detector(_cfg(boxes_set, tmp_path / "a", epochs=1, max_steps_per_epoch=2, model=wide))
    start, _ = load_detector(first)
    narrow = DetectorConfig(backbone="resnet18", min_size=128, max_size=128, fpn_channels=64)
    _, second = train_detector(_cfg(boxes_set, tmp_path / "b", epochs=1, max_steps_per_epoch=1, lr=0.0,
                                    init_from=first, model=narrow))
    exported = load_file(str(second.with_suffix(".safetensors")))
    conv = "backbone.body.conv1.weight"
    assert torch.equal(exported[conv], start.state_dict()[conv])  # the body came from the first detector
    assert exported["backbone.fpn.layer_blocks.0.0.weight"].shape[0] == 64  # the FPN is new, at its width
    assert exported["head.classification_head.conv.0.0.weight"].shape[:2] == (64, 64)
    model, card = load_detector(second)
    assert card.config["fpn_channels"] == 64 and model.backbone.out_channels == 64
    assert card.training["init_scope"] == "backbone body"
    # a card written before the width was a setting reads as torchvision's 256
    legacy = json.loads(first.read_text())
    legacy["config"].pop("fpn_channels")
    first.write_text(json.dumps(legacy))
    assert load_detector(first)[0].backbone.out_channels == 256


def test_missing_validation_photos_or_a_set_without_boxes_are_refused_before_training(boxes_set, tmp_path):
    """A missing validation photo crashed at the end of the first epoch with nothing saved; a
    training set without boxes trained and exported a card with a NaN mAP."""
    from pipelines.data.coco import CocoImage, load_coco, save_coco

    coco = load_coco(boxes_set)
    gone = coco.model_copy(deep=True)
    gone.images.append(CocoImage(id=9999, file_name="images/gone.jpg", width=10, height=10))
    save_coco(gone, tmp_path / "val.json")
    with pytest.raises(ValueError, match="1 validation images missing"):
        train_detector(_cfg(boxes_set, tmp_path / "a", val_coco=tmp_path / "val.json", val_images=boxes_set.parent))
    empty = coco.model_copy(deep=True)
    empty.annotations = []
    save_coco(empty, tmp_path / "train.json")
    with pytest.raises(ValueError, match="the training boxes hold no box"):
        train_detector(_cfg(tmp_path / "train.json", tmp_path / "b", train_images=boxes_set.parent,
                            val_images=boxes_set.parent))
    with pytest.raises(ValueError, match="the validation boxes hold no box"):  # best epoch by an mAP of nothing
        train_detector(_cfg(boxes_set, tmp_path / "c", val_coco=tmp_path / "train.json", val_images=boxes_set.parent))
    assert not any((tmp_path / run).exists() for run in "abc")


def test_validation_photos_that_are_training_photos_are_warned_of_and_counted_on_the_card(boxes_set, tmp_path, caplog):
    """The training box file given as validation too trained, chose its epoch and threshold on
    photos trained on, and exported a card whose validation figures were training figures,
    unsaid (an audit). A photo is the same by its file or by the sha256 a box file records."""
    import shutil

    from pipelines.data.coco import CocoImage, load_coco, save_coco

    coco = load_coco(boxes_set)
    images = sorted(coco.images, key=lambda im: im.id)
    train_ids = {im.id for im in images[:16]}
    shutil.copy(boxes_set.parent / images[1].file_name, boxes_set.parent / "copied.jpg")
    sha = "ab" * 32
    train = coco.model_copy(deep=True, update={
        "images": [CocoImage(**im.model_dump(), **({"sha256": sha} if im.id == images[1].id else {}))
                   for im in images[:16]],
        "annotations": [a for a in coco.annotations if a.image_id in train_ids]})
    apart = coco.model_copy(deep=True, update={
        "images": images[16:], "annotations": [a for a in coco.annotations if a.image_id not in train_ids]})
    shared = apart.model_copy(deep=True, update={
        "images": [*apart.images, images[0],  # the same file
                   CocoImage(**images[1].model_dump(exclude={"id", "file_name"}), id=9999, file_name="copied.jpg",
                             sha256=sha)],  # another file of the same sha256
        "annotations": [*apart.annotations, *(a for a in coco.annotations if a.image_id == images[0].id)]})
    for name, data in (("train", train), ("apart", apart), ("shared", shared)):
        save_coco(data, boxes_set.parent / f"{name}.json")
    cards = {}
    for name in ("apart", "shared"):
        with caplog.at_level("WARNING", logger="pipelines.training.detector"):
            caplog.clear()
            _, card = train_detector(_cfg(boxes_set.parent / "train.json", tmp_path / name, epochs=1,
                                          max_steps_per_epoch=1, val_coco=boxes_set.parent / f"{name}.json"))
        cards[name] = (load_card(card).data["val_photos_trained_on"], "training photos too" in caplog.text)
    assert cards == {"apart": (0, False), "shared": (2, True)}


def test_train_detector_from_a_card_takes_its_width_unless_told_another(boxes_set, tmp_path, caplog):
    """The README's site command named no --fpn-channels: at the default 256 it kept only the
    bundled 128-wide detector's backbone, said at INFO, and 2 epochs read mAP 0.000 against
    0.963 with the card's width (an audit)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    base = ["train-detector", str(boxes_set), str(boxes_set), "--backbone", "resnet18", "--size", "96", "--epochs",
            "1", "--batch-size", "4", "--workers", "0", "--max-steps", "1", "--warmup", "1"]
    first = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "a"), "--fpn-channels", "64"])
    assert first.exit_code == 0, first.output
    card = tmp_path / "a" / "detector.json"
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "b"), "--init-from", str(card)])
    assert r.exit_code == 0, r.output
    made = load_card(tmp_path / "b" / "detector.json")
    assert made.config["fpn_channels"] == 64 and made.training["init_scope"] == "all"
    with caplog.at_level("WARNING", logger="pipelines.training.detector"):
        r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "c"), "--init-from", str(card), "--fpn-channels",
                                     "32"])
    assert r.exit_code == 0 and load_card(tmp_path / "c" / "detector.json").training["init_scope"] == "backbone body"
    assert "its backbone body only, the FPN and head from random" in caplog.text


def test_train_detector_quarter_turns_is_off_unless_asked_and_the_card_says_which(boxes_set, tmp_path):
    """The card's training record is how a reader tells a detector trained with quarter turns
    from one trained with flips alone (weights/README, "Quarter turns in the detector")."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    base = ["train-detector", str(boxes_set), str(boxes_set), "--backbone", "resnet18", "--size", "96", "--epochs",
            "1", "--batch-size", "4", "--workers", "0", "--max-steps", "2", "--warmup", "1", "--fpn-channels", "32"]
    turned = {}
    for name, flag in (("plain", []), ("turned", ["--quarter-turns"])):
        r = CliRunner().invoke(app, [*base, *flag, "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        turned[name] = load_card(tmp_path / name / "detector.json").training["quarter_turns"]
    assert turned == {"plain": False, "turned": True}
