import json

import pytest
from pycocotools.coco import COCO

from pipelines.data.coco import (
    CocoCategory,
    CocoDataset,
    CocoError,
    CocoImage,
    import_cvat,
    load_coco,
    make_annotation,
    save_coco,
)


def _dataset() -> CocoDataset:
    return CocoDataset(
        images=[CocoImage(id=1, file_name="a.jpg", width=640, height=480),
                CocoImage(id=2, file_name="b.jpg", width=300, height=200),
                CocoImage(id=3, file_name="empty.jpg", width=100, height=100)],
        annotations=[make_annotation(1, 1, 1, (10, 20, 110, 220)),
                     make_annotation(2, 1, 2, (0, 0, 640, 480)),
                     make_annotation(3, 2, 1, (5.5, 6.25, 50.5, 60.75))],
        categories=[CocoCategory(id=1, name="cervix"), CocoCategory(id=2, name="speculum")],
    )


def test_what_we_write_pycocotools_loads_with_the_same_boxes_and_categories(tmp_path):
    path = save_coco(_dataset(), tmp_path / "c.json")
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"cervix", "speculum"}
    assert coco.loadAnns(coco.getAnnIds(imgIds=[2]))[0]["bbox"] == [5.5, 6.25, 45.0, 54.5]
    assert coco.getAnnIds(imgIds=[3]) == []  # an image without boxes is kept
    assert load_coco(path) == _dataset()


def test_boxes_by_file_gives_xyxy_per_category_and_keeps_images_without_boxes():
    got = _dataset().boxes_by_file("cervix")
    assert got == {"a.jpg": [[10.0, 20.0, 110.0, 220.0]], "b.jpg": [[5.5, 6.25, 50.5, 60.75]], "empty.jpg": []}


def test_every_bad_box_is_reported_with_its_image(tmp_path):
    ds = _dataset()
    ds.annotations[0].bbox = [600, 10, 100, 10]  # past the right edge
    ds.annotations[1].bbox = [10, 10, 0, 5]  # no area
    ds.annotations[2].image_id = 99  # dangling
    raw = ds.model_dump(mode="json")
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(CocoError) as err:
        load_coco(tmp_path / "bad.json")
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "annotation 1 (image 1 'a.jpg'): box [x1=600, y1=10, x2=700, y2=20] is not inside the 640x480 image" in msg
    assert "annotation 2 (image 1 'a.jpg'): box [10.0, 10.0, 0.0, 5.0] has no area" in msg
    assert "annotation 3: unknown image_id 99" in msg
    with pytest.raises(CocoError):
        save_coco(ds, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


def _cvat_export(tmp_path, annotations):
    raw = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "url": "", "version": "", "year": ""},
        "categories": [{"id": 1, "name": "Cervix ", "supercategory": ""}],
        "images": [{"id": 1, "width": 200, "height": 100, "file_name": "x.jpg", "license": 0,
                    "flickr_url": "", "coco_url": "", "date_captured": 0}],
        "annotations": annotations,
    }
    p = tmp_path / "instances_default.json"
    p.write_text(json.dumps(raw))
    return p


def _ann(i, bbox, rotation=0.0):
    return {"id": i, "image_id": 1, "category_id": 1, "segmentation": [], "area": 0.0, "bbox": bbox,
            "iscrowd": 0, "attributes": {"occluded": False, "rotation": rotation}}


def test_cvat_import_normalises_names_clips_small_overshoots_and_unrotates(tmp_path):
    path = _cvat_export(tmp_path, [_ann(1, [-0.7, 10, 50, 20]), _ann(2, [80, 30, 40, 20], rotation=90)])
    ds, notes = import_cvat(path)
    assert ds.categories[0].name == "cervix"
    assert ds.annotations[0].bbox == pytest.approx([0, 10, 49.3, 20])
    assert ds.annotations[1].bbox == pytest.approx([90, 20, 20, 40])  # 40x20 turned upright
    assert ds.annotations[1].area == pytest.approx(800)
    assert any("clipped" in n for n in notes) and any("rotated" in n for n in notes)
    COCO(str(save_coco(ds, tmp_path / "out.json")))


def test_cvat_import_refuses_boxes_far_outside_the_image(tmp_path):
    path = _cvat_export(tmp_path, [_ann(1, [150, 10, 80, 20])])
    with pytest.raises(CocoError, match="not inside the 200x100 image"):
        import_cvat(path)


def test_a_file_that_is_not_coco_gets_a_clear_error(tmp_path):
    (tmp_path / "x.json").write_text('{"images": [{"id": "one"}]}')
    with pytest.raises(CocoError, match="not a COCO detection file: images.0.id: Input should be a valid integer"):
        load_coco(tmp_path / "x.json")
    # a CSV given for the boxes: pydantic's text, its first bytes and a link to its docs (an audit)
    (tmp_path / "m.csv").write_text("path,kind\na.jpg,regular\n")
    with pytest.raises(CocoError, match="not a COCO detection file: the file: Invalid JSON") as e:
        load_coco(tmp_path / "m.csv")
    assert "pydantic.dev" not in str(e.value) and "a.jpg" not in str(e.value)


def test_cvat_categories_that_differ_only_in_case_or_spaces_become_one_with_all_their_boxes(tmp_path):
    path = _cvat_export(tmp_path, [_ann(1, [10, 10, 50, 20]), {**_ann(2, [80, 30, 40, 20]), "category_id": 2}])
    raw = json.loads(path.read_text())
    raw["categories"].append({"id": 2, "name": "cervix", "supercategory": ""})
    path.write_text(json.dumps(raw))
    ds, notes = import_cvat(path)
    assert [(c.id, c.name) for c in ds.categories] == [(1, "cervix")]
    assert [a.category_id for a in ds.annotations] == [1, 1]
    assert any("merged into category 1" in n for n in notes)


def test_a_truncated_list_shaped_or_missing_export_and_a_bad_rotation_get_a_clear_error(tmp_path):
    path = _cvat_export(tmp_path, [_ann(1, [10, 10, 50, 20], rotation="abc")])
    with pytest.raises(CocoError, match="rotation 'abc' is not a number"):
        import_cvat(path)
    for name, text, message in (("cut.json", path.read_text()[:40], "not a COCO detection file"),
                                ("list.json", "[]", "top level is a JSON list"),
                                ("missing.json", None, "cannot read it")):
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(CocoError, match=message):
            import_cvat(tmp_path / name)
    with pytest.raises(CocoError, match="cannot read it"):
        load_coco(tmp_path / "missing.json")
