import pytest
import numpy as np
import torch

from models.detector import DetectorConfig, build_detector
from models.io import ModelCard, WeightsIntegrityError, load_weights, save_weights


def _batch():
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 80)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # no cervix
    return images, targets


@pytest.mark.parametrize("arch,backbone", [("retinanet", "resnet18"), ("fasterrcnn", "mobilenet_v3_large"),
                                           ("fcos", "resnet18"), ("retinanet", "mobilenet_v3_large")])
def test_every_architecture_returns_losses_in_training_and_boxes_in_eval(arch, backbone):
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(arch=arch, backbone=backbone, min_size=96, max_size=96))
    images, targets = _batch()
    losses = model(images, targets)  # an empty target is a valid sample
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) >= {"boxes", "scores", "labels"}


def test_random_backbones_train_with_batchnorm_and_pretrained_ones_freeze_it():
    from torchvision.ops.misc import FrozenBatchNorm2d

    scratch = build_detector(DetectorConfig(backbone="resnet18", min_size=64, max_size=64))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.backbone.body.modules())
    assert all(p.requires_grad for p in scratch.backbone.body.parameters())
    pre = build_detector(DetectorConfig(backbone="resnet18", min_size=64, max_size=64, pretrained_backbone=True),
                         backbone_state=scratch.backbone.body.state_dict())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in pre.backbone.body.modules())
    assert torch.equal(pre.backbone.body.conv1.weight, scratch.backbone.body.conv1.weight)


def test_backbone_weights_from_a_classification_network_load_without_its_head_and_others_are_refused():
    import torchvision

    classifier = torchvision.models.resnet18(weights=None).state_dict()  # with fc.weight, fc.bias
    cfg = DetectorConfig(backbone="resnet18", min_size=64, max_size=64, pretrained_backbone=True)
    model = build_detector(cfg, backbone_state=classifier)
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, classifier["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match=r"do not fit resnet18: unexpected \['layer1.0.conv9.weight'\]"):
        build_detector(cfg, backbone_state=classifier | {"layer1.0.conv9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"do not fit resnet18: unexpected \['features'\]"):
        build_detector(cfg, backbone_state={"features.0.weight": torch.zeros(1)})  # another network's file


def test_config_refuses_unknown_names_and_a_class_count_without_background():
    with pytest.raises(ValueError, match="unknown detector"):
        DetectorConfig(arch="yolo")
    with pytest.raises(ValueError, match="background"):
        DetectorConfig(num_classes=1)


def test_weights_whose_sha256_differs_from_the_card_are_refused(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    card_path = save_weights(state, tmp_path / "m", ModelCard(name="m", architecture="toy"))
    loaded, card = load_weights(card_path)
    assert torch.equal(loaded["w"], state["w"]) and len(card.sha256) == 64
    weights = tmp_path / "m.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="does not match"):
        load_weights(card_path)


def test_the_engines_resize_first_transform_gives_torchvisions_batch():
    """The exported path resizes before it normalizes; torchvision normalizes first. Both
    steps are linear per channel, so the padded batch and the sizes must agree to rounding."""
    from pipelines.engine.detector import resized_then_normalized

    model = build_detector(DetectorConfig(min_size=96, max_size=128)).eval()
    images = [torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    images.append(torch.rand(3, 90, 333, generator=torch.Generator().manual_seed(2)))
    expected, _ = model.transform(images)
    got = resized_then_normalized(model.transform, images)
    assert got.image_sizes == expected.image_sizes
    assert got.tensors.shape == expected.tensors.shape
    assert torch.allclose(got.tensors, expected.tensors, atol=1e-5)


def test_the_engines_best_detection_is_torchvisions_first_bit_for_bit():
    """The engine decodes only each photo's best box. Ties at the best score (whose order
    torchvision's top-k decides), a NaN logit, photos with nothing above the threshold and
    boxes reaching past the image must all come out as torchvision's first detection."""
    from models.exportable import exportable
    from pipelines.engine.detector import best_detections, resized_then_normalized

    model = build_detector(DetectorConfig(min_size=96, max_size=128)).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 300, 200, generator=g) for _ in range(3)] + [torch.rand(3, 90, 333, generator=g) for _ in range(4)]
    batch = resized_then_normalized(model.transform, images)
    with torch.inference_mode():
        cls, reg, *maps = exportable(model)(batch.tensors)
    anchors = model.anchor_generator(batch, maps)
    per_level = [m.shape[-2] * m.shape[-1] * (cls.shape[1] // sum(m.shape[-2] * m.shape[-1] for m in maps)) for m in maps]
    cls = torch.randn(cls.shape, generator=g) * 2 - 3  # a few dozen candidates over 0.05 per photo
    reg = torch.randn(reg.shape, generator=g) * 2  # wide boxes: some leave the image and are clipped
    cls[1] = -10.0  # nothing above the threshold
    cls[2, 5, 1] = cls[2, per_level[0] + 7, 0] = 9.0  # a tie across two levels
    cls[3, 1, 0] = cls[3, 2, 1] = 9.0  # a tie within one level (here the top-k puts the later one first)
    cls[4, 3, 0] = float("nan")
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    head = {"cls_logits": list(cls.split(per_level, 1)), "bbox_regression": list(reg.split(per_level, 1))}
    want = model.postprocess_detections(head, [list(a.split(per_level)) for a in anchors], batch.image_sizes)
    want = model.transform.postprocess(want, batch.image_sizes, original_sizes)
    got = best_detections(model, cls, reg, anchors, per_level, batch.image_sizes, original_sizes)
    assert len(want[1]["scores"]) == 0 and len(want[0]["scores"]) > 1
    assert any((w["boxes"][:1] == torch.tensor([0.0, 0.0, s[1], s[0]])).any() for w, s in zip(want, original_sizes))
    for w, b in zip(want, got):
        for key in ("boxes", "scores", "labels"):
            assert w[key][:1].dtype == b[key].dtype and torch.equal(w[key][:1], b[key]), key
    assert best_detections(model, cls[:0], reg[:0], [], per_level, [], []) == []


def test_eval_detections_of_an_image_do_not_depend_on_the_other_images_of_its_batch(tmp_path):
    """`predict_dataset` (eval-detector, the training's mAP) used to pad a batch to its largest
    image, so a portrait photo among landscape ones got other boxes than alone, and the mAP
    was one draw of batch neighbours. Its detections must equal those of a batch of one."""
    from PIL import Image

    from pipelines.data.coco import CocoCategory, CocoDataset, CocoImage, make_annotation
    from pipelines.data.detection import CocoDetection
    from pipelines.data.presets import detection_eval
    from pipelines.engine.detector import predict_dataset

    g = np.random.default_rng(0)
    images, anns = [], []
    for k, (w, h) in enumerate([(200, 150), (150, 200), (200, 150)], start=1):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        images.append(CocoImage(id=k, file_name=f"{k}.png", width=w, height=h))
        anns.append(make_annotation(k, k, 1, [10, 10, w / 2, h / 2]))
    ds = CocoDetection(CocoDataset(images=images, annotations=anns, categories=[CocoCategory(id=1, name="cervix")]),
                       tmp_path, detection_eval())
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(backbone="resnet18", min_size=96, max_size=128, score_thresh=0.0)).eval()
    batched = predict_dataset(model, ds, torch.device("cpu"), batch_size=3)
    alone = predict_dataset(model, ds, torch.device("cpu"), batch_size=1)
    assert sorted(batched) == sorted(alone) == [1, 2, 3]
    for k in alone:
        assert len(alone[k]["boxes"]) > 0
        torch.testing.assert_close(batched[k]["boxes"], alone[k]["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(batched[k]["scores"], alone[k]["scores"], atol=1e-5, rtol=0)


def test_eval_detector_gives_negatives_no_ap_scores_the_boxed_photos_apart_and_writes_json_others_read(tmp_path):
    """A source without one box (photos of other organs) read mAP 0.000, as if the detector
    failed there, and the metrics file held the bare word NaN, which no JSON reader but
    Python's accepts."""
    import json

    import pandas as pd
    from PIL import Image
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.data.coco import CocoCategory, CocoDataset, CocoImage, make_annotation, save_coco
    from tests.qc_fixtures import tiny_weights

    weights = tiny_weights(tmp_path / "w", 0.5)
    g = np.random.default_rng(1)
    images, anns, rows = [], [], []
    for k, source in enumerate(["site", "site", "gut", "gut"], start=1):
        Image.fromarray(g.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        images.append(CocoImage(id=k, file_name=f"{k}.png", width=120, height=90))
        if source == "site":
            anns.append(make_annotation(k, k, 1, [20, 15, 60, 50]))
        rows.append({"path": f"{k}.png", "patient_id": f"p{k}", "source": source, "device": "d",
                     "kind": "regular" if source == "site" else "no_cervix"})
    save_coco(CocoDataset(images=images, annotations=anns, categories=[CocoCategory(id=1, name="cervix")]),
              tmp_path / "boxes.json")
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    r = CliRunner().invoke(app, ["eval-detector", str(weights / "detector.json"), str(tmp_path / "boxes.json"),
                                 "-o", str(tmp_path / "out"), "--manifest", str(tmp_path / "m.csv")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "out" / "detector_metrics.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    gut, site = report["gut"], report["site"]
    assert gut["map"] is None and gut["ap50"] is None and gut["cervix_found"] is None and gut["n_no_cervix"] == 2
    assert isinstance(site["map"], float) and site["no_cervix_called"] is None and site["n_cervix"] == 2
    # AP against the checked boxes alone: the photos without a cervix are not in it
    boxed = report["cervix photos"]
    assert boxed["n_cervix"] == 2 and boxed["n_no_cervix"] == 0 and boxed["map"] == site["map"]
    assert "mAP -  AP50 -" in r.output and "nan" not in r.output


def test_the_detectors_jitter_swaps_colour_channels_unless_told_not_to_and_moves_boxes_alike():
    """torchvision's RandomPhotometricDistort permutes channels with its p: a red photo came out
    green or blue about two times in three, which `--no-permute-channels` turns off."""
    from torchvision import tv_tensors

    from pipelines.data.presets import detection_train

    red = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    red[0] = 200
    box = tv_tensors.BoundingBoxes([[8, 8, 40, 40]], format="XYXY", canvas_size=(64, 64))

    def reddest(permute: bool, seed: int) -> bool:
        torch.manual_seed(seed)
        augment = detection_train(hard=False, permute_channels=permute)
        img, target = augment(red, {"boxes": box, "labels": torch.tensor([1])})
        return int(img.mean(dim=(1, 2)).argmax()) == 0 and len(target["boxes"]) <= 1

    assert all(reddest(False, s) for s in range(30))
    assert sum(not reddest(True, s) for s in range(30)) >= 10


def test_quarter_turns_turn_photos_with_and_without_a_cervix_and_move_their_boxes_exactly():
    """`--quarter-turns` turns by exactly 90 degrees (torch.rot90's pixels). torchvision left an
    empty box list's canvas unturned, and the IoU crop after it refused every turned photo
    without a cervix ("Found multiple HxW dimensions"), which stopped the first real run."""
    from torchvision import tv_tensors

    from pipelines.data.presets import QuarterTurn, detection_train

    photo = tv_tensors.Image(torch.zeros(3, 48, 64, dtype=torch.uint8))
    photo[:, 5:15, 40:60] = 255  # the cervix: rows 5-14, columns 40-59
    boxed = tv_tensors.BoundingBoxes([[40, 5, 60, 15]], format="XYXY", canvas_size=(48, 64))
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(48, 64))

    turned, target = QuarterTurn()(photo, {"boxes": boxed, "labels": torch.tensor([1])})
    assert torch.equal(turned, torch.rot90(photo, 1, (1, 2)))
    assert target["boxes"].tolist() == [[5, 4, 15, 24]] and target["boxes"].canvas_size == (64, 48)
    _, target = QuarterTurn()(photo, {"boxes": empty, "labels": torch.zeros(0, dtype=torch.int64)})
    assert target["boxes"].canvas_size == (64, 48)

    shapes = set()
    for seed in range(40):
        for boxes in (boxed, empty):
            torch.manual_seed(seed)
            img, target = detection_train(hard=False, quarter_turns=True)(
                photo, {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)})
            assert tuple(target["boxes"].canvas_size) == tuple(img.shape[1:])
            shapes.add(img.shape[1] > img.shape[2])
    assert shapes == {True, False}  # some came out upright (taller than wide), some not
