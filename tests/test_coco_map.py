"""The detector metrics are pycocotools' own; these hand-made cases pin that we feed it right."""

import math

import pytest
import torch

from pipelines.data.coco import CocoCategory, CocoDataset, CocoImage, make_annotation
from pipelines.evaluation.coco_map import evaluate_detections, top1_recall


def _gt() -> CocoDataset:
    return CocoDataset(
        images=[CocoImage(id=i, file_name=f"{i}.jpg", width=200, height=200) for i in (1, 2, 3)],
        annotations=[make_annotation(1, 1, 1, (20, 20, 120, 120)), make_annotation(2, 2, 1, (50, 40, 150, 160)),
                     make_annotation(3, 2, 2, (0, 0, 30, 30))],
        categories=[CocoCategory(id=1, name="cervix"), CocoCategory(id=2, name="swab")],
    )


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_perfect_predictions_score_one_everywhere():
    gt = _gt()
    pred = {1: _det([[20, 20, 120, 120]], [0.9], [1]),
            2: _det([[50, 40, 150, 160], [0, 0, 30, 30]], [0.8, 0.7], [1, 2])}
    m = evaluate_detections(gt, pred)
    assert m.map == pytest.approx(1.0) and m.ap50 == pytest.approx(1.0) and m.ap75 == pytest.approx(1.0)
    assert m.per_class_ap == {"cervix": pytest.approx(1.0), "swab": pytest.approx(1.0)}
    assert m.top1_recall50 == 1.0


def test_a_shifted_box_scores_what_its_iou_allows():
    # One image, one box shifted by 20 px in x: IoU = 80*100 / (120*100) = 2/3, so it counts
    # as a hit at thresholds 0.50..0.65 (4 of 10) and a miss above: mAP = 0.4 exactly.
    gt = CocoDataset(images=[CocoImage(id=1, file_name="a.jpg", width=200, height=200)],
                     annotations=[make_annotation(1, 1, 1, (20, 20, 120, 120))],
                     categories=[CocoCategory(id=1, name="cervix")])
    m = evaluate_detections(gt, {1: _det([[40, 20, 140, 120]], [0.9], [1])})
    assert m.ap50 == pytest.approx(1.0)
    assert m.ap75 == pytest.approx(0.0)
    assert m.map == pytest.approx(0.4)


def test_no_detections_at_all_is_map_zero_not_a_crash():
    m = evaluate_detections(_gt(), {})
    assert m.map == 0.0 and m.top1_recall50 == 0.0


def test_no_detections_leave_a_size_range_without_a_true_box_undefined_as_one_useless_box_does():
    """The set has large and small boxes, no medium one: all six read 0.0 when nothing was found."""
    nothing = evaluate_detections(_gt(), {}).as_dict()
    useless = evaluate_detections(_gt(), {1: _det([[190, 190, 199, 199]], [0.1], [1])}).as_dict()
    assert math.isnan(nothing["ap_medium"]) and nothing["ap_small"] == nothing["ap_large"] == 0.0
    assert nothing["per_class_ap"] == useless["per_class_ap"] == {"cervix": 0.0, "swab": 0.0}
    for name in ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"):
        assert nothing[name] == useless[name] or math.isnan(nothing[name]) and math.isnan(useless[name]), name


def test_top1_recall_uses_only_the_highest_scoring_box():
    gt = _gt()
    good_but_second = {1: _det([[150, 150, 190, 190], [20, 20, 120, 120]], [0.9, 0.5], [1, 1])}
    assert top1_recall(gt, good_but_second, category="cervix") == 0.0
    best_first = {1: _det([[20, 20, 120, 120], [150, 150, 190, 190]], [0.9, 0.5], [1, 1]),
                  2: _det([[50, 40, 150, 160]], [0.3], [1])}
    assert top1_recall(gt, best_first, category="cervix") == 1.0
    assert math.isnan(top1_recall(CocoDataset(categories=[CocoCategory(id=1, name="cervix")]), {}))


def test_a_set_without_one_box_has_no_ap_rather_than_zero():
    negatives = CocoDataset(images=[CocoImage(id=1, file_name="a.jpg", width=200, height=200)],
                            categories=[CocoCategory(id=1, name="cervix")])
    m = evaluate_detections(negatives, {1: _det([[40, 20, 140, 120]], [0.9], [1])})
    assert all(math.isnan(getattr(m, f)) for f in ("map", "ap50", "ap75", "top1_recall50")) and m.n_images == 1


def test_a_size_range_without_a_true_box_has_no_ap_rather_than_zero():
    """pycocotools says -1 for an empty range; clamped to 0.0, the card read as a detector that
    failed on every small and medium cervix, in sets that had none."""
    gt = CocoDataset(images=[CocoImage(id=1, file_name="a.jpg", width=200, height=200)],
                     annotations=[make_annotation(1, 1, 1, (20, 20, 120, 120))],  # 100 x 100: "large"
                     categories=[CocoCategory(id=1, name="cervix")])
    m = evaluate_detections(gt, {1: _det([[20, 20, 120, 120]], [0.9], [1])})
    assert math.isnan(m.ap_small) and math.isnan(m.ap_medium) and m.ap_large == pytest.approx(1.0)


def test_a_coco_file_without_areas_gets_each_boxs_own(tmp_path):
    """Without `area` every box was area 0, so "small": AP by size was wrong for any file
    written by another tool that leaves it out (COCO's area is the mask's; boxes have none)."""
    import json

    from pipelines.data.coco import load_coco

    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 200}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 100, 50]},
                                                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                                                 "area": 42.0}],
                                "categories": [{"id": 1, "name": "cervix"}]}))
    assert [a.area for a in load_coco(path).annotations] == [5000.0, 42.0]
