"""What the review pages compute, without a browser: the grid's order, filters and pages, the
decision log with undo, and the three exports (manifest, COCO, quarantine)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sqlite3
from pathlib import Path

import pytest

from pipelines.data.coco import load_coco, validate_coco
from pipelines.engine.qc_result import Label, QCResult
from service.jobs.reviews import JobGone, ReviewStore, Stale, class_of, final_of
from service.jobs.store import ItemSummary, JobStore
from service.ui.export import apply_to_quarantine, coco_of, manifest_lines
from service.ui.job_views import VIEW_ITEMS, JobViews
from service.ui.review_view import GridQuery, JobView, Thresholds, build_grid, neighbours, source_of, what_if_points
from tests.qc_fixtures import jpeg_bytes, textured_scene

T = Thresholds(deep_sad=1.0, resnest=0.5, detector=0.4, presence=None, policy="resnest")


def _summary(item: int, path: str, label: str, prob: float | None = None, kind: str | None = None,
             cervix: float | None = None, colour: float | None = None, sad: float = 1.0) -> ItemSummary:
    cropped = label in ("regular", "non_regular")
    return ItemSummary(item, path, label, kind, sad if cropped else None, prob, colour, cervix, None,
                       [1, 1, 9, 9] if cropped else None, 10, 10, None if label != "unreadable" else "not an image")


ITEMS = [_summary(1, "a/far.jpg", "regular", 0.05), _summary(2, "a/near.jpg", "non_regular", 0.52, "green"),
         _summary(3, "b/mid.jpg", "regular", 0.35), _summary(4, "b/none.jpg", "no_cervix", cervix=0.39),
         _summary(5, "top.jpg", "unreadable"), _summary(6, "b/iod.jpg", "non_regular", 0.9, "iodine")]


def test_the_grid_shows_the_images_closest_to_their_threshold_first():
    grid = build_grid(JobView.of(ITEMS, T), {}, T, GridQuery())
    assert [c.path for c in grid.cards] == ["b/none.jpg", "a/near.jpg", "b/mid.jpg", "b/iod.jpg", "a/far.jpg",
                                            "top.jpg"]
    assert grid.by_label == {"regular": 2, "non_regular": 2, "no_cervix": 1, "unreadable": 1}
    assert grid.by_source == {"(top)": {"unreadable": 1}, "a": {"regular": 1, "non_regular": 1},
                              "b": {"regular": 1, "no_cervix": 1, "non_regular": 1}}


def test_the_grid_pages_and_a_page_past_the_end_shows_the_last():
    grid = build_grid(JobView.of(ITEMS, T), {}, T, GridQuery(page=9), page_size=4)
    assert (grid.page, grid.pages, grid.matching, len(grid.cards)) == (2, 2, 6, 2)


def test_next_page_under_reviewed_no_starts_after_the_last_card_when_decisions_shrank_the_list():
    """Page 2 by offset skipped the items that moved up once page 1's were decided (an audit)."""
    from service.jobs.reviews import Reviewed

    items = [_summary(i, f"p{i:02d}.jpg", "regular", 0.5 - i / 100) for i in range(1, 11)]
    view, todo = JobView.of(items, T), GridQuery(reviewed=False)
    first = build_grid(view, {}, T, todo, page_size=4)
    assert [c.item for c in first.cards] == [1, 2, 3, 4] and first.more
    decided = {c.item: Reviewed(label="regular") for c in first.cards}
    after = build_grid(view, decided, T, GridQuery(reviewed=False, after=4), page_size=4)
    assert [c.item for c in after.cards] == [5, 6, 7, 8] and after.more and after.page == 1
    assert [c.item for c in build_grid(view, decided, T, GridQuery(reviewed=False, page=2), page_size=4).cards] == [
        9, 10]  # what the offset gave: 5-8 never shown
    last = build_grid(view, decided, T, GridQuery(reviewed=False, after=8), page_size=4)
    assert [c.item for c in last.cards] == [9, 10] and not last.more
    assert [c.item for c in build_grid(view, {}, T, GridQuery(after=10), page_size=4).cards] == [9, 10]  # none after


@pytest.mark.parametrize(("query", "paths"), [
    (GridQuery(label="non_regular"), {"a/near.jpg", "b/iod.jpg"}),
    (GridQuery(kind="iodine"), {"b/iod.jpg"}),
    (GridQuery(source="a"), {"a/far.jpg", "a/near.jpg"}),
    (GridQuery(score_min=0.3, score_max=0.6), {"a/near.jpg", "b/mid.jpg"}),
    (GridQuery(reviewed=True), {"b/mid.jpg"}),
    (GridQuery(reviewed=False, label="regular"), {"a/far.jpg"}),
])
def test_each_filter_keeps_only_its_images(query, paths):
    from service.jobs.reviews import Reviewed

    grid = build_grid(JobView.of(ITEMS, T), {3: Reviewed(label="green")}, T, query)
    assert {c.path for c in grid.cards} == paths


def test_next_and_previous_walk_the_grid_order_under_the_same_filter():
    assert neighbours(JobView.of(ITEMS, T), {}, T, GridQuery(label="regular"), 3) == (None, 1)
    assert neighbours(JobView.of(ITEMS, T), {}, T, GridQuery(label="regular"), 1) == (3, None)


def test_a_photo_just_decided_under_reviewed_no_keeps_its_neighbours_where_it_stood():
    """Deciding took the photo out of "Reviewed: no", and Next went back to the top of the list
    with Previous gone (an audit)."""
    from service.jobs.reviews import Reviewed

    view = JobView.of(ITEMS, T)  # grid order: 4, 2, 3, 6, 1, 5
    assert neighbours(view, {3: Reviewed(label="green")}, T, GridQuery(reviewed=False), 3) == (2, 6)
    assert neighbours(view, {4: Reviewed(label="regular")}, T, GridQuery(reviewed=False), 4) == (None, 2)


def test_the_what_if_points_are_the_stage2_scores_of_cropped_images_only():
    assert what_if_points(ITEMS) == [[1.0, 0.05, None], [1.0, 0.52, None], [1.0, 0.35, None], [1.0, 0.9, None]]


def test_under_the_vote_of_three_an_image_near_the_colour_threshold_comes_first():
    vote = Thresholds(deep_sad=1.0, resnest=0.5, detector=0.4, presence=None, policy="two_of_three", colour=0.6)
    items = [_summary(1, "far.jpg", "regular", 0.05, colour=0.1, sad=3.0),
             _summary(2, "near.jpg", "regular", 0.05, colour=0.59, sad=3.0)]
    assert [c.path for c in build_grid(JobView.of(items, vote), {}, vote, GridQuery()).cards] == ["near.jpg", "far.jpg"]
    assert [c.path for c in build_grid(JobView.of(items, T), {}, T, GridQuery()).cards] == ["far.jpg", "near.jpg"]  # tie: path order


def test_a_kept_view_is_rebuilt_once_the_job_has_more_items_and_the_oldest_goes_past_the_bound(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create("src", None, "resnest", tmp_path)
    other = store.create("src", None, "resnest", tmp_path)
    row = lambda path, prob: QCResult(path=path, label=Label.REGULAR, resnest_prob=prob, deep_sad_score=0.5,
                                      cervix_box=[1.0, 1.0, 9.0, 9.0], width=10, height=10)
    store.add_items(job.id, [row("far.jpg", 0.05)])
    views = JobViews(store, max_items=2 + 2 * VIEW_ITEMS)  # two views of at most 2 items
    first = views.get(job.id, T)
    assert views.get(job.id, T) is first  # nothing new: the same view, not a second read
    store.add_items(job.id, [row("near.jpg", 0.45)])  # a running job's next batch
    assert [s.path for s in views.get(job.id, T).items] == ["near.jpg", "far.jpg"]
    kept = views.get(job.id, T)
    store.add_items(other.id, [row("a.jpg", 0.3)])
    views.get(other.id, T)  # 3 items kept > 2: the least recently read job's view goes
    assert views.get(other.id, T) is views.get(other.id, T)
    assert views.get(job.id, T) is not kept
    # views of jobs without items cost their keep too: they were never let go
    empty = [store.create("src", None, "resnest", tmp_path).id for _ in range(3)]
    kept_empty = views.get(empty[0], T)
    for job_id in empty[1:]:
        views.get(job_id, T)
    assert views.get(empty[0], T) is not kept_empty


def test_the_scores_json_is_what_the_what_if_line_reads():
    body = json.loads(JobView.of(ITEMS, T).what_if_json)
    assert sorted(body["points"]) == sorted(what_if_points(ITEMS))
    assert (body["policy"], body["score"], body["thresholds"]) == ("resnest", "resnest",
                                                                  {"deep_sad": 1.0, "resnest": 0.5, "colour": None})


def test_the_source_is_the_first_folder():
    assert [source_of(p) for p in ("clinic/2019/x.jpg", "x.jpg", "/abs/y.jpg")] == ["clinic", "(top)", "abs"]
    assert source_of("bad\\xff\\xfename.jpg") == "(top)"  # a name escaped as not UTF-8, not a folder "bad"


def _reviews(tmp_path) -> tuple[ReviewStore, str]:
    """The review store of a job store holding one finished job, and that job's id."""
    jobs = JobStore(tmp_path / "jobs.sqlite")
    job = jobs.create("src", None, "resnest", tmp_path)
    jobs.transition(job.id, "running")  # done ends a running job only
    jobs.transition(job.id, "done")
    return ReviewStore(jobs.path), job.id


def test_a_decision_for_a_deleted_job_is_refused_and_leaves_no_row(tmp_path):
    """A decision sent while its job was being deleted (the route had already found the job)
    was stored after the purge: a row that no job owned, for good."""
    store, j = _reviews(tmp_path)
    store.decide(j, 1, "a.jpg", "key-1", "label", "regular", "green")
    assert JobStore(store.path).delete(j)
    with pytest.raises(JobGone):
        store.decide(j, 1, "a.jpg", "key-1", "label", "green", "iodine")
    with pytest.raises(JobGone):
        store.decide("never-a-job", 1, "a.jpg", "key-1", "label", "regular", "green")
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM decisions").fetchone()[0] == 0


def test_a_decision_keeps_who_and_old_to_new_and_undo_restores_the_one_before(tmp_path):
    store, j = _reviews(tmp_path)
    store.decide(j, 7, "a.jpg", "key-1", "label", "regular", "green")
    store.decide(j, 7, "a.jpg", "key-2", "label", "green", "no_cervix")
    store.decide(j, 7, "a.jpg", "key-2", "box", [0, 0, 5, 5], [1, 1, 4, 4])
    assert store.reviewed(j)[7].label == "no_cervix" and store.reviewed(j)[7].box == [1, 1, 4, 4]
    store.undo(j, 7, "key-1")
    store.undo(j, 7, "key-1")
    live = store.reviewed(j)[7]
    assert (live.label, live.box, live.who) == ("green", None, "key-1")
    history = store.history(j, 7)
    assert [(d.who, d.old, d.new, d.undone_at is not None) for d in history] == [
        ("key-1", "regular", "green", False), ("key-2", "green", "no_cervix", True),
        ("key-2", "[0, 0, 5, 5]", "[1, 1, 4, 4]", True)]
    store.undo(j, 7, "key-1")
    assert store.reviewed(j) == {} and store.undo(j, 7, "key-1") is None
    with pytest.raises(ValueError, match="label must be one of"):
        store.decide(j, 7, "a.jpg", "key-1", "label", "regular", "purple")


def _record(path: str, label: Label, kind: str | None = None, box=None, sha256: str | None = "ab" * 32) -> QCResult:
    return QCResult(path=path, label=label, kind=kind, cervix_box=box, width=100, height=80, sha256=sha256)


def _judged(root: Path, path: str, label: Label, kind: str | None = None) -> QCResult:
    """The record of a photo on disk as the job read it: its bytes' sha256."""
    return _record(path, label, kind, sha256=hashlib.sha256((root / path).read_bytes()).hexdigest())


def _reviewed(tmp_path):
    store, j = _reviews(tmp_path)
    rows = [(1, _record("a/reg.jpg", Label.REGULAR, box=[10, 10, 50, 50])),
            (2, _record("a/green.jpg", Label.NON_REGULAR, "green", [20, 20, 60, 60])),
            (3, _record("b/none.jpg", Label.NO_CERVIX).model_copy(
                update={"duplicate_group": 4, "duplicate_of": "a/reg.jpg", "duplicate_kind": "near"})),
            (4, QCResult(path="b/bad.jpg", label=Label.UNREADABLE, error="not an image"))]
    store.decide(j, 1, "a/reg.jpg", "key-1", "label", "regular", "iodine")
    store.decide(j, 1, "a/reg.jpg", "key-1", "box", [10, 10, 50, 50], [12, 8, 48, 52])
    store.decide(j, 2, "a/green.jpg", "key-1", "label", "green", "regular")
    store.decide(j, 3, "b/none.jpg", "key-1", "label", "no_cervix", "regular")
    return rows, store.reviewed(j)


def test_the_manifest_has_model_reviewed_and_final_labels_on_every_row(tmp_path):
    rows, reviews = _reviewed(tmp_path)
    out = list(csv.DictReader(io.StringIO("".join(manifest_lines(rows, reviews)))))
    assert [(r["model_label"], r["reviewed_class"], r["final_label"], r["final_kind"]) for r in out] == [
        ("regular", "iodine", "non_regular", "iodine"), ("non_regular", "regular", "regular", ""),
        ("no_cervix", "regular", "regular", ""), ("unreadable", "", "unreadable", "")]
    assert json.loads(out[0]["final_box"]) == [12, 8, 48, 52] and json.loads(out[1]["final_box"]) == [20, 20, 60, 60]
    assert out[2]["final_box"] == ""  # reviewed as regular but nobody drew its box: none to export
    assert (out[2]["duplicate_group"], out[2]["duplicate_of"], out[2]["duplicate_kind"]) == ("4", "a/reg.jpg", "near")


def test_the_manifest_export_goes_back_into_training_through_import_labels(tmp_path):
    """No column held the final class in one word (final_label said non_regular, final_kind
    green) and import-labels took `'+02.jpg`, the name written spreadsheet-safe, as a missing
    file: reviewed labels had no way back into training (an audit)."""
    from pipelines.data.labelled_import import SKIP, LabelColumns, import_labelled

    rows, reviews = _reviewed(tmp_path)
    rows = [(i, r.model_copy(update={"path": "+02.jpg"}) if i == 2 else r) for i, r in rows]
    for _, r in rows:
        (tmp_path / "job" / r.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "job" / r.path).write_bytes(jpeg_bytes(textured_scene(1)))
    (tmp_path / "job" / "reviewed.csv").write_text("".join(manifest_lines(rows, reviews)))
    out = list(csv.DictReader(io.StringIO((tmp_path / "job" / "reviewed.csv").read_text())))
    assert [r["final_class"] for r in out] == ["iodine", "regular", "regular", "unreadable"]
    assert out[1]["path"] == "'+02.jpg"  # as a spreadsheet must see it
    cols = LabelColumns(path="path", kind="final_class", patient="item", source_value="site",
                        kind_map={"unreadable": SKIP})
    result = import_labelled(tmp_path / "job" / "reviewed.csv", tmp_path / "job", tmp_path / "job" / "m.csv", cols)
    assert list(zip(result.manifest["path"], result.manifest["kind"])) == [
        ("a/reg.jpg", "iodine"), ("+02.jpg", "regular"), ("b/none.jpg", "regular")]


def test_csv_exports_never_hand_a_spreadsheet_a_formula_from_a_file_name():
    """A photo named `=HYPERLINK(...).jpg` ran as a formula where a data team opened the export."""
    from service.routes.jobs import _csv_lines

    names = ['=HYPERLINK("http://x","y").jpg', "+1+1.jpg", "-2+3.jpg", "@SUM(1).jpg", "plain-name.jpg",
             # a lone carriage return is not quoted by the CSV writers: the row split there, and
             # the piece after it started a formula of its own (an audit)
             "x\r@SUM(1+1).jpg", "\r=cr.jpg",
             # a spreadsheet set to European regional settings splits a comma CSV at each `;`,
             # quotes or not: the piece after one started a formula (an audit)
             "a,b;@SUM(1+1);c.jpg", "t\t=1.jpg"]
    records = [QCResult(path=n, label=Label.UNREADABLE, error="=1+1", duplicate_of="@x") for n in names]
    # the review manifest has no error column; the results CSV has (a default for a missing
    # column here checked nothing of the one that lacks it: an audit)
    for text, columns in (("".join(manifest_lines(list(enumerate(records, 1)), {})), ("path", "duplicate_of")),
                          ("".join(_csv_lines(iter(records))), ("path", "duplicate_of", "error"))):
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert [r["path"] for r in rows] == ["'" + n for n in names[:4]] + ["plain-name.jpg", "x\\x0d@SUM(1+1).jpg",
                                                                             "\\x0d=cr.jpg", "a,b;'@SUM(1+1);c.jpg",
                                                                             "t\t'=1.jpg"]
        for line in text.splitlines():
            assert not any(piece.startswith(("=", "+", "-", "@")) for piece in re.split("[;\t]", line)[1:]), line
        import pandas as pd

        assert len(pd.read_csv(io.StringIO(text), keep_default_na=False)) == len(names)
        assert {r["duplicate_of"] for r in rows} == {"'@x"}
        assert ("error" in rows[0]) == ("error" in columns)
        assert all(r["error"] == "'=1+1" for r in rows if "error" in columns)


def test_the_coco_export_holds_corrected_boxes_and_negatives_and_leaves_out_a_cervix_without_a_box(tmp_path):
    """b/none.jpg, found no cervix in by the model and relabelled regular without a box, was
    exported as a photo without a cervix: a detector trained on the export learned the miss
    that review corrected (an audit)."""
    rows, reviews = _reviewed(tmp_path)
    rows = [*rows, (5, _record("c/empty.jpg", Label.NO_CERVIX))]
    path = tmp_path / "boxes.json"
    path.write_text(coco_of(rows, reviews).model_dump_json())
    ds = load_coco(path)
    assert validate_coco(ds) == []
    boxes = ds.boxes_by_file("cervix")
    assert boxes == {"a/reg.jpg": [[12, 8, 48, 52]], "a/green.jpg": [[20, 20, 60, 60]], "c/empty.jpg": []}
    assert ds.info["left_out_cervix_without_box"] == 1


def test_a_final_class_without_a_cervix_has_no_box():
    r = _record("x.jpg", Label.REGULAR, box=[1, 2, 3, 4])
    assert final_of(r, None) == ("regular", [1, 2, 3, 4])
    from service.jobs.reviews import Reviewed

    assert final_of(r, Reviewed(label="no_cervix")) == ("no_cervix", None)
    assert class_of("non_regular", None) == "non_regular"


def _two_photos_one_quarantine_name(tmp_path):
    """A job's store, a source root holding `../x.jpg` (photo A) and `__/x.jpg` (photo B), whose
    quarantine copies share one name (`..` is mirrored as `__`), and the quarantine's folder."""
    store, j = _reviews(tmp_path)
    root, q = tmp_path / "data" / "m", tmp_path / "q"
    (root / "__").mkdir(parents=True)
    (root.parent / "x.jpg").write_bytes(b"photo A")
    (root / "__" / "x.jpg").write_bytes(b"photo B")
    return store, j, root, q


def test_applying_review_leaves_another_photos_copy_that_holds_the_rows_name(tmp_path):
    """Two rows, one quarantine name (here `..` mirrored as `__`; `A.JPG` and `a.jpg` on a
    quarantine that ignores case): relabelling one moved the other photo's copy into its new
    label folder under its name, and that photo's own bytes were never quarantined (an audit)."""
    store, j, root, q = _two_photos_one_quarantine_name(tmp_path)
    rows = [(1, _judged(root, "../x.jpg", Label.NON_REGULAR, "green")),
            (2, _judged(root, "__/x.jpg", Label.NON_REGULAR, "green"))]
    (q / "non_regular" / "__").mkdir(parents=True)
    (q / "non_regular" / "__" / "x.jpg").write_bytes(b"photo A")  # the first row's copy took the name
    store.decide(j, 2, "__/x.jpg", "key-1", "label", "green", "no_cervix")
    done = apply_to_quarantine(root, q, rows, store.reviewed(j), [tmp_path.resolve()])
    assert (done.added, done.removed, done.others) == (1, 0, 1)
    assert (q / "non_regular" / "__" / "x.jpg").read_bytes() == b"photo A"
    assert (q / "no_cervix" / "__" / "x.jpg").read_bytes() == b"photo B"


def test_applying_review_into_a_label_folder_whose_copy_is_another_photos_keeps_this_photos_copy(tmp_path):
    """The other way round: the final label's folder holds another photo's copy under this
    row's name. Taken as this photo's copy, its own copy in the label it left was removed, and
    the photo was quarantined nowhere (a mutation no test caught)."""
    store, j, root, q = _two_photos_one_quarantine_name(tmp_path)
    rows = [(1, _judged(root, "../x.jpg", Label.NON_REGULAR, "green")),
            (2, _judged(root, "__/x.jpg", Label.NO_CERVIX, None))]
    for label, data in (("non_regular", b"photo A"), ("no_cervix", b"photo B")):
        (q / label / "__").mkdir(parents=True)
        (q / label / "__" / "x.jpg").write_bytes(data)  # each row's own copy; one name between them
    store.decide(j, 1, "../x.jpg", "key-1", "label", "green", "no_cervix")
    done = apply_to_quarantine(root, q, rows, store.reviewed(j), [tmp_path.resolve()])
    assert (done.added, done.removed, done.others) == (0, 0, 1)
    assert (q / "non_regular" / "__" / "x.jpg").read_bytes() == b"photo A"  # kept: its only copy
    assert (q / "no_cervix" / "__" / "x.jpg").read_bytes() == b"photo B"


def test_applying_review_into_a_label_folder_that_already_holds_this_photos_copy_drops_the_old_one(tmp_path):
    """The final label's folder already holds this very photo's copy (a second job over the
    source made it): taken as another photo's, the copy in the label it left stayed, and the
    photo sat in two label folders (a mutation no test caught)."""
    store, j = _reviews(tmp_path)
    root, q = tmp_path / "data", tmp_path / "q"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"photo A")
    rows = [(1, _judged(root, "a.jpg", Label.NON_REGULAR, "green"))]
    for label in ("non_regular", "no_cervix"):
        (q / label).mkdir(parents=True)
        (q / label / "a.jpg").write_bytes(b"photo A")
    store.decide(j, 1, "a.jpg", "key-1", "label", "green", "no_cervix")
    done = apply_to_quarantine(root, q, rows, store.reviewed(j), [tmp_path.resolve()])
    assert (done.others, done.removed) == (0, 1)
    assert not (q / "non_regular" / "a.jpg").exists() and (q / "no_cervix" / "a.jpg").read_bytes() == b"photo A"


def test_applying_review_moves_quarantine_copies_and_never_touches_originals(tmp_path):
    rows, reviews = _reviewed(tmp_path)
    root, q = tmp_path / "data", tmp_path / "q"
    for _, r in rows:
        (root / r.path).parent.mkdir(parents=True, exist_ok=True)
        (root / r.path).write_bytes(r.path.encode())
    rows = [(i, r.model_copy(update={"sha256": hashlib.sha256(r.path.encode()).hexdigest()})) for i, r in rows]
    for folder, rel in (("non_regular", "a/green.jpg"), ("no_cervix", "b/none.jpg"), ("unreadable", "b/bad.jpg")):
        (q / folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (q / folder / rel).write_bytes(rel.encode())
    done = apply_to_quarantine(root, q, rows, reviews, [root.resolve()])
    assert (done.added, done.removed, done.outside) == (1, 2, 0)
    assert sorted(str(p.relative_to(q)) for p in q.rglob("*.jpg")) == ["non_regular/a/reg.jpg",
                                                                      "unreadable/b/bad.jpg"]
    assert sorted(p.read_bytes() for p in root.rglob("*.jpg")) == sorted(r.path.encode() for _, r in rows)
    assert not (q / "non_regular/a/reg.jpg").samefile(root / "a/reg.jpg")  # a copy, not a link


def test_applying_review_copies_nothing_from_outside_the_data_roots(tmp_path):
    """A reviewer relabels rows whose files lie outside the roots (a manifest's absolute path,
    a link out): their rows change, no copy of the outside file reaches the quarantine."""
    root, q, outside = tmp_path / "data", tmp_path / "q", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the quarantine")
    (root / "link.jpg").symlink_to(outside / "secret.txt")
    (root / "ok.jpg").write_bytes(b"inside")
    rows = [(1, _record("link.jpg", Label.REGULAR)), (2, _record(str(outside / "secret.txt"), Label.REGULAR)),
            (3, _judged(root, "ok.jpg", Label.REGULAR))]
    store, j = _reviews(tmp_path)
    for item, r in rows:
        store.decide(j, item, r.path, "key-1", "label", "regular", "no_cervix")
    done = apply_to_quarantine(root, q, rows, store.reviewed(j), [root.resolve()])
    assert (done.added, done.outside) == (1, 2)
    assert [p.relative_to(q).as_posix() for p in q.rglob("*") if p.is_file()] == ["no_cervix/ok.jpg"]


def test_each_apply_leaves_a_reviewed_photo_in_its_final_labels_folder_only(tmp_path):
    """Only the model's own folder lost its copy: a second Apply after another change of mind
    left the first Apply's copy behind, and a photo turned back to the model's label got none."""
    root, q = tmp_path / "data", tmp_path / "q"
    root.mkdir()
    (root / "p.jpg").write_bytes(b"photo")
    rows = [(1, _judged(root, "p.jpg", Label.NON_REGULAR, "green"))]
    (q / "non_regular").mkdir(parents=True)
    (q / "non_regular" / "p.jpg").write_bytes(b"photo")  # the job's copy
    store, j = _reviews(tmp_path)

    def decide_and_apply(old: str, new: str) -> list[str]:
        store.decide(j, 1, "p.jpg", "key-1", "label", old, new)
        apply_to_quarantine(root, q, rows, store.reviewed(j), [root.resolve()])
        return sorted(p.relative_to(q).as_posix() for p in q.rglob("*.jpg"))

    assert decide_and_apply("green", "unreadable") == ["unreadable/p.jpg"]
    assert decide_and_apply("unreadable", "no_cervix") == ["no_cervix/p.jpg"]
    assert decide_and_apply("no_cervix", "regular") == []
    assert decide_and_apply("regular", "green") == ["non_regular/p.jpg"]
    assert (root / "p.jpg").read_bytes() == b"photo"


def test_apply_after_an_undo_puts_the_photo_back_where_its_live_label_says(tmp_path):
    """Apply passed by a photo whose every decision was undone: relabelled and applied, then
    undone, it stayed in the undone label's folder, or in none (an audit)."""
    root, q = tmp_path / "data", tmp_path / "q"
    root.mkdir()
    for name in ("nc.jpg", "reg.jpg"):
        (root / name).write_bytes(name.encode())
    rows = [(1, _judged(root, "nc.jpg", Label.NO_CERVIX)), (2, _judged(root, "reg.jpg", Label.REGULAR))]
    (q / "no_cervix").mkdir(parents=True)
    (q / "no_cervix" / "nc.jpg").write_bytes(b"nc.jpg")  # the job's copy
    store, j = _reviews(tmp_path)

    def apply() -> list[str]:
        apply_to_quarantine(root, q, rows, store.reviewed(j, undone_too=True), [root.resolve()])
        return sorted(p.relative_to(q).as_posix() for p in q.rglob("*.jpg"))

    store.decide(j, 1, "nc.jpg", "key-1", "label", "no_cervix", "regular")
    store.decide(j, 2, "reg.jpg", "key-1", "label", "regular", "green")
    assert apply() == ["non_regular/reg.jpg"]
    for item in (1, 2):
        store.undo(j, item, "key-2")
    assert 1 not in store.reviewed(j) and apply() == ["no_cervix/nc.jpg"]  # as the model had them


def test_a_photo_replaced_on_disk_since_the_job_is_not_copied_under_the_judged_photos_label(tmp_path):
    """Apply copied whatever bytes the path held by then into the quarantine, under the label a
    reviewer gave the photo the job had judged (an audit)."""
    root, q = tmp_path / "data", tmp_path / "q"
    root.mkdir()
    (root / "p.jpg").write_bytes(b"the judged photo")
    rows = [(1, _judged(root, "p.jpg", Label.REGULAR))]
    (root / "p.jpg").write_bytes(b"another photo, same name")
    store, j = _reviews(tmp_path)
    store.decide(j, 1, "p.jpg", "key-1", "label", "regular", "iodine")
    done = apply_to_quarantine(root, q, rows, store.reviewed(j), [root.resolve()])
    assert (done.added, done.changed) == (0, 1) and not any(q.rglob("*.jpg"))


def test_a_relabelled_photo_whose_original_is_gone_keeps_its_copy_moved_and_the_rest_are_counted(tmp_path):
    """The copy in the old label's folder went first and the original was asked for after: a
    collection moved or restored elsewhere lost every relabelled photo's only copy (an audit:
    76 of 80), and Apply said only "0 added, 70 removed"."""
    root, q = tmp_path / "data", tmp_path / "q"
    root.mkdir()
    copied = hashlib.sha256(b"the job's copy").hexdigest()  # the photo the job judged and copied
    rows = [(1, _record("green.jpg", Label.NON_REGULAR, "green", sha256=copied)),
            (2, _record("reg.jpg", Label.REGULAR))]
    (q / "non_regular").mkdir(parents=True)
    (q / "non_regular" / "green.jpg").write_bytes(b"the job's copy")  # its original is gone, as is reg.jpg's
    store, j = _reviews(tmp_path)
    store.decide(j, 1, "green.jpg", "key-1", "label", "green", "no_cervix")
    store.decide(j, 2, "reg.jpg", "key-1", "label", "regular", "iodine")
    done = apply_to_quarantine(root, q, rows, store.reviewed(j), [root.resolve()])
    assert (done.added, done.removed, done.missing) == (1, 1, 1)
    assert [(p.relative_to(q).as_posix(), p.read_bytes()) for p in q.rglob("*.jpg")] == [
        ("no_cervix/green.jpg", b"the job's copy")]


def test_a_page_that_is_no_longer_current_can_neither_decide_nor_undo(tmp_path):
    """A page still showing the model's regular confirmed it over another reviewer's iodine,
    unsaid, and an undo took back a decision its reviewer never saw (an audit)."""
    store, j = _reviews(tmp_path)
    shown = store.version(j, 1)
    store.decide(j, 1, "a.jpg", "key-b", "label", "regular", "iodine", seen=shown)
    with pytest.raises(Stale) as e:
        store.decide(j, 1, "a.jpg", "key-a", "label", "regular", "regular", seen=shown)
    assert e.value.who == "key-b"
    with pytest.raises(Stale):
        store.undo(j, 1, "key-a", seen=shown)
    fresh = store.version(j, 1)
    assert store.undo(j, 1, "key-a", seen=fresh).undone_by == "key-a"
    with pytest.raises(Stale) as e:  # an undo is a change too
        store.decide(j, 1, "a.jpg", "key-b", "label", "regular", "green", seen=fresh)
    assert e.value.who == "key-a" and store.version(j, 1) == fresh + 1
    assert [(d.who, d.new, d.undone_by) for d in store.history(j, 1)] == [("key-b", "iodine", "key-a")]
    with pytest.raises(Stale) as e:  # a version no page was given, on a photo nobody touched: no one to name
        store.decide(j, 2, "b.jpg", "key-a", "label", "regular", "green", seen=7)
    assert e.value.who is None


def test_reviewers_at_once_each_undo_their_own_decision_and_each_old_is_the_value_before(tmp_path):
    """Two undos at once both answered for one row (an audit: 40 answers, 23 rows undone), and
    concurrent decisions stored an `old` read before another's write."""
    from concurrent.futures import ThreadPoolExecutor

    store, j = _reviews(tmp_path)
    labels = ["green", "iodine", "regular", "no_cervix"]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: store.decide(j, 1, "a.jpg", f"key-{k % 2}", "label", "regular", labels[k % 4]),
                      range(80)))
    history = store.history(j, 1)
    assert [d.old for d in history] == ["regular"] + [d.new for d in history[:-1]]
    with ThreadPoolExecutor(4) as pool:
        undone = list(pool.map(lambda k: store.undo(j, 1, f"key-{k % 2}").id, range(40)))
    assert len(set(undone)) == 40 and sum(d.undone_at is not None for d in store.history(j, 1)) == 40


def test_a_picture_the_full_thumbnail_cache_cannot_take_is_served_from_memory(tmp_path):
    """A full state folder answered every picture not yet cached with a 500 (an audit)."""
    from pipelines.engine.decode import DecodeLimits
    from service.ui.images import cached
    from tests.qc_fixtures import fuzz_set
    from tests.small_disk import small_tmpfs

    with small_tmpfs(tmp_path / "thumbs", "64k") as cache:
        (cache / "filler").write_bytes(b"\0" * 60_000)
        (cache / "j1").mkdir()
        with open(cache / "j1" / "more", "wb") as f:  # up to the last byte
            with pytest.raises(OSError):
                f.write(b"\0" * 200_000)
                f.flush()
        original = tmp_path / "p.jpg"
        original.write_bytes(fuzz_set()["ok.jpg"][0])
        picture = cached(cache, "j1", 1, "full", original, DecodeLimits())
        assert isinstance(picture, bytes) and picture[:2] == b"\xff\xd8"
        assert not [p for p in (cache / "j1").iterdir() if p.name != "more"]  # no half-written file left


def test_the_export_credits_the_label_and_the_box_each_to_its_own_reviewer(tmp_path):
    """One who for both: a label set by one reviewer was credited to whoever moved the box later."""
    store, j = _reviews(tmp_path)
    store.decide(j, 1, "a.jpg", "key-a", "label", "regular", "green")
    store.decide(j, 1, "a.jpg", "key-b", "box", [0, 0, 5, 5], [1, 1, 4, 4])
    store.decide(j, 2, "b.jpg", "key-b", "box", [0, 0, 5, 5], [1, 1, 4, 4])  # the box alone
    rows = [(1, _record("a.jpg", Label.REGULAR, box=[0, 0, 5, 5])), (2, _record("b.jpg", Label.REGULAR))]
    out, box_only = csv.DictReader(io.StringIO("".join(manifest_lines(rows, store.reviewed(j)))))
    assert (out["reviewed_class"], out["reviewed_by"], out["box_reviewed_by"]) == ("green", "key-a", "key-b")
    assert out["reviewed_at"] <= out["box_reviewed_at"] and out["reviewed_at"].endswith("+00:00")
    assert (box_only["reviewed_class"], box_only["reviewed_by"]) == ("", "key-b")  # reviewed, as before
    # added last, each after the one before: scripts read by position
    assert list(out)[-3:] == ["box_reviewed_by", "box_reviewed_at", "final_class"]
