"""The stage-2 report's tables, from hand-made runs (no model): what each row claims to be."""

import numpy as np

from pipelines.evaluation.report import table6


def _run(split: str, y: list[int], score: list[float]) -> dict:
    return {"model": "classifier", "input_size": 32, "split": split, "y": np.array(y), "score": np.array(score),
            "threshold": 0.5}


def test_a_validation_run_beside_a_test_run_is_named_as_such():
    """`eval` writes val and test runs of one model into one folder; both rows read
    "ResNeSt, 32x32", so a validation figure could pass for a test one."""
    page = table6([_run("test", [1, 0], [0.9, 0.1]), _run("val", [0, 0], [0.1, 0.2])])
    assert "ResNeSt, 32x32, test" in page and "ResNeSt, 32x32, val" in page
    assert "n/a" in page and "nan" not in page  # the val run has no positive: no sensitivity
    # which split chose the thresholds, and at what threshold each row is (an audit: neither was said);
    # a scores file from before `eval` recorded the rows' role is named by its split, and says so
    assert "<td>held out (by the split&#x27;s name)</td>" in page
    assert "<td>thresholds chosen here: optimistic (by the split&#x27;s name)</td>" in page
    assert "<th>Threshold (the card's)</th>" in page and "<td>0.5</td>" in page
    assert "<th>Average precision</th>" in page and "PR-AUC" not in page  # average_precision_score, not the area


def test_a_rows_role_is_the_one_eval_read_from_the_card_not_its_splits_name():
    """Test rows that `calibrate-stage2 --split all` chose the threshold on read "held out",
    and any manifest's val rows "optimistic" (an audit)."""
    page = table6([_run("test", [1, 0], [0.9, 0.1]) | {"role": "threshold chosen on these rows (calibrate-stage2): "
                                                                 "optimistic"},
                   _run("val", [1, 0], [0.9, 0.1]) | {"role": "not the training's split"}])
    assert "<td>threshold chosen on these rows (calibrate-stage2): optimistic</td>" in page
    assert "<td>not the training&#x27;s split</td>" in page and "held out" not in page


def test_the_report_lists_validation_runs_apart_from_test_runs_and_captions_crops_with_their_prediction(tmp_path):
    """Rows of val and test were interleaved by model, and a misclassified crop's caption gave
    its truth and a score rounded to "1", leaving the prediction to the reader (an audit)."""
    from pipelines.evaluation.report import crop_caption, galleries, load_runs

    for name, split in (("a_test", "test"), ("b_val", "val"), ("c_test", "test")):
        model = "deep_sad" if name == "c_test" else "classifier"
        np.savez(tmp_path / f"{name}_scores.npz", model=model, input_size=32, split=split, y=np.array([1, 0]),
                 score=np.array([0.4, 0.9999993]), threshold=0.5, paths=np.array(["p.jpg", "r.jpg"]),
                 kinds=np.array([1, 0]))
    assert [str(r["split"]) for r in load_runs(tmp_path)] == ["val", "test", "test"]
    assert "misclassified (2)" in galleries(load_runs(tmp_path)[0], {})
    assert crop_caption("regular", True, 0.9999993) == "regular \u2192 non-reg.\n1.0000"
    assert crop_caption("green", False, 0.4) == "green \u2192 regular\n0.4000"


def test_table6_says_how_many_photos_had_no_box_and_which_weights_each_row_is():
    """With a detector's box file its misses are in no figure: the table showed sensitivity
    1.000 where 6 of 11 positives had no box, and nowhere said so."""
    run = _run("test", [1, 0], [0.9, 0.1]) | {"left_out_kinds": np.array(["green", "iodine"]),
                                              "left_out_counts": np.array([4, 2]), "model_sha256": "ab" * 32}
    page = table6([run, _run("val", [1, 0], [0.9, 0.1])])
    assert "<td>2</td><td>6</td></tr>" in page and "<td>2</td><td>?</td></tr>" in page  # crops scored, left out
    assert "6 photos had no box (4 green, 2 iodine) and are in none of its figures" in page
    assert "ResNeSt, 32x32, test, weights abababababab" in page


def test_table6_gives_each_sources_row_under_a_pooled_one():
    """Every positive and every false flag was one source's: pooled specificity 0.970 hid that
    source's 0.833 (an audit of the report on the real test split)."""
    run = _run("test", [1, 0, 0, 0, 0], [0.9, 0.8, 0.1, 0.1, 0.1]) | {
        "sources": np.array(["atlas", "atlas", "annocerv", "annocerv", "annocerv"])}
    rows = table6([run]).split("</tr>")
    pooled, annocerv, atlas = rows[1], rows[2], rows[3]
    assert "<td>0.750</td>" in pooled and "<td>5</td>" in pooled  # specificity 3 of 4
    assert "annocerv" in annocerv and "<td>1.000</td>" in annocerv and "<td>3</td>" in annocerv
    assert "atlas" in atlas and "<td>0.000</td>" in atlas and "<td>2</td>" in atlas  # its one regular flagged
    assert "\u2003" not in table6([_run("test", [1, 0], [0.9, 0.1]) | {"sources": np.array(["a", "a"])}])
    # each source's row with its own photos left out for want of a box (the cell was empty: an audit)
    left = {"left_out_kinds": np.array(["green", "iodine"]), "left_out_counts": np.array([1, 3]),
            "left_out_sources": np.array(["atlas", "atlas"]), "left_out_source_kinds": np.array(["green", "iodine"]),
            "left_out_source_counts": np.array([1, 3])}
    page = table6([run | left])
    pooled, annocerv, atlas = page.split("</tr>")[1:4]
    assert pooled.endswith("<td>5</td><td>4</td>") and annocerv.endswith("<td>3</td><td>0</td>")
    assert atlas.endswith("<td>2</td><td>4</td>")
    assert "4 photos had no box (1 green, 3 iodine; atlas: 1 green, 3 iodine)" in page


def test_a_run_of_a_few_crops_leaves_its_t_sne_out_rather_than_failing_the_report():
    """scikit-learn refuses a perplexity >= the points: a site's val split of 2 crops failed the
    whole report, exit 2 (an audit)."""
    from pipelines.evaluation.report import tsne

    run = _run("val", [1, 0], [0.9, 0.1]) | {"features": np.random.default_rng(0).normal(size=(2, 8)),
                                             "kinds": np.array([1, 0])}
    assert "too few to map" in tsne(run)
    many = run | {"features": np.random.default_rng(0).normal(size=(12, 8)), "kinds": np.arange(12) % 3}
    assert "data:image/png;base64," in tsne(many)


def test_a_run_of_one_class_gets_a_sentence_instead_of_empty_curves():
    """A site's validation split without green or iodine photos has no ROC: the page drew two
    empty axes under the heading and said nothing of why."""
    from pipelines.evaluation.report import curves

    page = curves([_run("val", [0, 0], [0.1, 0.2])])
    assert "data:image/png" not in page and "its crops are all regular" in page
    both = curves([_run("val", [0, 0], [0.1, 0.2]), _run("test", [1, 0], [0.9, 0.1])])
    assert both.count("data:image/png") == 1 and "ResNeSt, 32x32, val: no ROC" in both
    assert "no ROC or precision-recall curve, no crops" in curves([_run("val", [], [])])
