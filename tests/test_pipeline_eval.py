"""The whole pipeline judged against labels (every policy from one run), the colour-histogram
baseline on the same split, and extra training-only crops for stage 2."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.data.manifest import load_manifest, write_manifest
from pipelines.data.splits import SplitFractions, patient_split
from pipelines.evaluation.pipeline_eval import score_group
from tests.qc_fixtures import tiny_weights

runner = CliRunner()


def test_group_scores_count_a_missed_cervix_as_not_flagged_and_name_each_rate():
    truth = pd.Series(["regular", "regular", "green", "iodine", "green", "no_cervix", "no_cervix"])
    labels = ["regular", "non_regular", "non_regular", "non_regular", "no_cervix", "no_cervix", "regular"]
    kinds = [None, "green", "green", "green", None, None, None]
    m = score_group(truth, labels, kinds)
    assert m["cervix_found"] == pytest.approx(4 / 5) and m["no_cervix_called"] == pytest.approx(1 / 2)
    assert m["sensitivity"] == pytest.approx(2 / 3)  # the green photo called no_cervix is a miss
    assert m["regular_flagged"] == pytest.approx(1 / 2) and m["precision"] == pytest.approx(2 / 3)
    assert m["kind_accuracy"] == pytest.approx(1 / 2)  # iodine called green
    assert m["confusion"] == [[1, 1], [1, 2]]


@pytest.fixture(scope="module")
def labelled(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("pe")
    df = load_manifest(tiny_dataset.manifest)
    df["split"] = patient_split(df, SplitFractions(0.5, 0.25, 0.25), seed=0)
    df["path"] = df["abspath"]
    write_manifest(df, out / "split.csv")
    return out / "split.csv"


def test_eval_pipeline_scores_every_policy_and_writes_the_default_policys_labels(labelled, tmp_path):
    # every crop: Deep SAD and colour (0.5 against 0.4) say non-regular, the classifier (at 0.99)
    # says regular, so the policies disagree and the written labels show which one wrote them
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0, colour_threshold=0.4, cls_threshold=0.99)
    r = runner.invoke(app, ["eval-pipeline", str(labelled), "--weights", str(weights), "--split", "val",
                            "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "ev" / "pipeline_metrics.json").read_text())
    assert set(report) == {"default_policy", "deep_sad", "resnest", "either", "both", "two_of_three", "models",
                           "thresholds", "split"}
    assert report["split"] == "val"  # a policy is chosen on a validation report alone
    assert report["models"]["detector"] == json.loads((weights / "detector.json").read_text())["sha256"]
    assert report["thresholds"]["classifier"] == {"probability": 0.99}
    rows = pd.read_csv(tmp_path / "ev" / "results.csv", keep_default_na=False)
    truth = load_manifest(labelled)
    truth = truth[(truth["split"] == "val") & (truth["kind"] != "")]
    assert len(rows) == len(truth) and list(rows["truth"]) == list(truth["kind"])
    overall = report[report["default_policy"]]["overall"]
    cervix = rows["truth"].isin(["regular", "green", "iodine"])
    assert overall["cervix_found"] == pytest.approx(rows.loc[cervix, "label"].isin(["regular", "non_regular"]).mean())
    flagged = (rows["label"] == "non_regular")[cervix]
    assert overall["regular_flagged"] == pytest.approx(flagged[rows["truth"][cervix] == "regular"].mean())
    assert report["default_policy"] == "resnest" and not flagged.any()  # the classifier's labels, not the run's
    assert (rows["kind"] == "").all()  # the run took every crop's kind; a regular's is not written
    either, both = report["either"]["overall"], report["both"]["overall"]
    assert either["regular_flagged"] == 1 and either["sensitivity"] == 1  # Deep SAD flags every crop
    assert both["regular_flagged"] == 0 and both["sensitivity"] == 0
    assert report["two_of_three"]["overall"] == either  # colour and Deep SAD: two votes on every crop
    assert set(report["deep_sad"]) >= {"overall", *truth["source"].unique()}



def test_eval_pipeline_results_are_safe_to_open_in_a_spreadsheet(labelled, tmp_path):
    """A name or source that starts a formula came out raw in its results.csv, while clean's
    results.csv escaped it (an audit)."""
    import shutil

    df = load_manifest(labelled)
    val = df.index[(df["split"] == "val") & (df["kind"] != "")]
    shutil.copy(df.at[val[0], "path"], tmp_path / "=HYPERLINK(1).jpg")
    df.loc[val[0], "path"] = "=HYPERLINK(1).jpg"
    df.loc[val, "source"] = "@site"
    write_manifest(df, tmp_path / "m.csv")
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    r = runner.invoke(app, ["eval-pipeline", str(tmp_path / "m.csv"), "--weights", str(weights), "--split", "val",
                            "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    rows = pd.read_csv(tmp_path / "ev" / "results.csv", keep_default_na=False)
    assert "'=HYPERLINK(1).jpg" in set(rows["path"]) and set(rows["source"]) == {"'@site"}


def test_eval_pipeline_on_train_rows_says_they_may_be_the_models_training_photos(labelled, tmp_path):
    """`--split train` was judged as plainly as test where the manifest or the cards could not
    tell the training's split (no sha256s), and `--split val` said nothing either way (an audit)."""
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    r = runner.invoke(app, ["eval-pipeline", str(labelled), "--weights", str(weights), "--split", "train",
                            "-o", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert "train rows may be (the manifest or the cards cannot tell: no sha256s) the photos" in r.output, r.output
    r = runner.invoke(app, ["eval-pipeline", str(labelled), "--weights", str(weights), "--split", "val",
                            "-o", str(tmp_path / "ev2")])
    assert r.exit_code == 0 and "train rows" not in r.output, r.output

def test_eval_pipeline_replaces_only_its_own_figures_and_writes_into_no_other_commands_folder(labelled, tmp_path):
    """It wrote its figures, exit 0, into a copy of a weights folder and a stage-2 eval's, and
    replaced an earlier run of other thresholds unsaid (an audit); a rerun of the same ones
    still replaces them."""
    import shutil

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    base = ["eval-pipeline", str(labelled), "--split", "val", "-o", str(tmp_path / "ev")]
    assert runner.invoke(app, [*base, "--weights", str(weights)]).exit_code == 0
    first = (tmp_path / "ev" / "pipeline_metrics.json").read_bytes()
    assert runner.invoke(app, [*base, "--weights", str(weights)]).exit_code == 0  # the same: a rerun
    moved = tmp_path / "moved"
    shutil.copytree(weights, moved)
    card = json.loads((moved / "deep_sad.json").read_text())
    card["thresholds"]["distance"] += 0.5
    (moved / "deep_sad.json").write_text(json.dumps(card))
    r = runner.invoke(app, [*base, "--weights", str(moved)])
    assert r.exit_code == 2 and "holds the figures of other thresholds (split val)" in r.output, r.output
    r = runner.invoke(app, [*base[:2], "--split", "test", "-o", str(tmp_path / "ev"), "--weights", str(weights)])
    assert r.exit_code == 2 and "holds the figures of other split (split val)" in r.output, r.output
    assert (tmp_path / "ev" / "pipeline_metrics.json").read_bytes() == first
    (tmp_path / "eval2").mkdir()
    (tmp_path / "eval2" / "deep_sad_val_scores.npz").write_bytes(b"a stage-2 eval's scores")
    for folder, named in ((moved, "classifier.safetensors"), (tmp_path / "eval2", "deep_sad_val_scores.npz")):
        r = runner.invoke(app, [*base[:4], "-o", str(folder), "--weights", str(weights)])
        assert r.exit_code == 2 and f"holds {named}" in r.output and not (folder / "results.csv").exists(), r.output


def test_colour_baseline_separates_green_and_iodine_photos_by_colour(tmp_path):
    from pipelines.data.synth import SizePolicy, SynthConfig, generate

    r = generate(SynthConfig(n_images=90, seed=4, ratio=1.5, no_cervix_fraction=0.0, size=SizePolicy(max_side=128)),
                 tmp_path / "d", workers=1)
    df = load_manifest(r.manifest)
    df["split"] = patient_split(df, SplitFractions(0.5, 0.25, 0.25), seed=1)
    write_manifest(df, tmp_path / "d" / "split.csv")
    out = runner.invoke(app, ["baseline-colour", str(tmp_path / "d" / "split.csv"), "-o", str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "b" / "baseline_metrics.json").read_text())
    assert report["test"]["overall"]["roc_auc"] > 0.8  # colour alone goes a long way: the bar to clear
    assert 0 < report["threshold"] < 1 and report["val"]["overall"]["n"] > 0
    from models.io import sha256_file

    assert report["manifest_sha256"] == sha256_file(tmp_path / "d" / "split.csv")
    photos = pd.read_csv(tmp_path / "b" / "baseline_scores.csv")  # each figure traceable to its photos
    for split in ("val", "test"):
        part = photos[photos["split"] == split]
        assert len(part) == report[split]["overall"]["n"]
        assert (part["flagged"] == (part["probability"] >= report["threshold"])).all()
        flagged_positive = (part["flagged"] & part["truth"].isin(["green", "iodine"])).sum()
        assert report[split]["overall"]["confusion"][1][1] == flagged_positive
    again = runner.invoke(app, ["baseline-colour", str(tmp_path / "d" / "split.csv"), "-o", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output  # -o is a folder: a rerun into it is no mistake
    (tmp_path / "f").write_text("a file")
    refused = runner.invoke(app, ["baseline-colour", str(tmp_path / "d" / "split.csv"), "-o", str(tmp_path / "f")])
    # "cannot write there (File exists)" before (an audit)
    assert refused.exit_code == 2 and f"{tmp_path / 'f'} is a file: name a folder" in refused.output, refused.output
    df.loc[df["split"] == "val", "split"] = "test"
    write_manifest(df, tmp_path / "d" / "no-val.csv")
    out = runner.invoke(app, ["baseline-colour", str(tmp_path / "d" / "no-val.csv")])
    assert out.exit_code == 2 and "no cervix photo in the val split" in out.output, out.output
    df = load_manifest(tmp_path / "d" / "split.csv")
    df = df[df["kind"].isin(["regular", "no_cervix"])]  # sklearn's "needs samples of at least 2 classes"
    write_manifest(df, tmp_path / "d" / "regular.csv")
    out = runner.invoke(app, ["baseline-colour", str(tmp_path / "d" / "regular.csv")])
    assert out.exit_code == 2 and "it has regular only" in out.output, out.output


def test_extra_crops_join_the_training_split_only(labelled, tiny_dataset, tmp_path):
    from pipelines.commands.stage2 import _with_extra
    from pipelines.data.crop_set import split_crops

    crops = split_crops(labelled, tiny_dataset.coco, 32, splits=("train", "val"))
    n_train, n_val = len(crops["train"]), len(crops["val"])
    assert n_train > 0 and n_val > 0  # absolute manifest paths meet the box file's relative names (were 0)
    both = _with_extra(crops, 32, tiny_dataset.manifest, tiny_dataset.coco)
    extra = int(np.isin(load_manifest(tiny_dataset.manifest)["kind"], ["regular", "green", "iodine"]).sum())
    assert len(both["train"]) == n_train + extra and len(both["val"]) == n_val



def test_an_evaluation_on_another_split_than_the_weights_were_trained_under_is_said(tmp_path, capsys):
    """The recipe's split, rebuilt with copies merged into one patient, put 53 of the shipped
    weights' training photos into its test rows, and eval-pipeline reported on them unsaid."""
    from pipelines.commands.evaluation import _check_split
    from pipelines.data.splits import split_fingerprint

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    rows = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "patient_id": ["p1", "p2", "p3"], "source": "s",
                         "device": "d", "kind": "regular", "sha256": ["1" * 64, "2" * 64, "3" * 64],
                         "split": ["train", "val", "test"]})
    write_manifest(rows, tmp_path / "trained.csv")
    card = json.loads((weights / "deep_sad.json").read_text())
    card["data"]["split_fingerprint"] = split_fingerprint(rows)
    (weights / "deep_sad.json").write_text(json.dumps(card))
    _check_split(tmp_path / "trained.csv", weights)
    assert "warning" not in capsys.readouterr().err
    write_manifest(rows.assign(split=["test", "val", "train"]), tmp_path / "other.csv")  # the same photos, moved
    _check_split(tmp_path / "other.csv", weights)
    assert "is not the split any of" in capsys.readouterr().err


def test_an_evaluation_names_the_models_trained_under_another_split_when_one_was_refitted_on_this_one(
        tmp_path, capsys):
    """The README's site adaptation refits the presence head on the site's split and evaluates
    there: the one card trained under it silenced the warning for the detector and stage 2,
    which were trained under the project's split (an audit of the README's walk)."""
    from pipelines.commands.evaluation import _check_split
    from pipelines.data.splits import split_fingerprint

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    rows = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "patient_id": ["p1", "p2", "p3"], "source": "s",
                         "device": "d", "kind": "regular", "sha256": ["1" * 64, "2" * 64, "3" * 64],
                         "split": ["train", "val", "test"]})
    write_manifest(rows, tmp_path / "site.csv")
    project = rows.assign(split=["test", "val", "train"])
    for name, under in (("deep_sad", project), ("detector", project), ("classifier", rows)):
        card = json.loads((weights / f"{name}.json").read_text())
        card["data"]["split_fingerprint"] = split_fingerprint(under)
        (weights / f"{name}.json").write_text(json.dumps(card))
    _check_split(tmp_path / "site.csv", weights, "test")
    err = capsys.readouterr().err
    assert f"is not the split {weights}'s detector, deep_sad were trained under; its classifier was" in err
    _check_split(tmp_path / "site.csv", weights, "train")  # its train rows hold the classifier's photos
    assert "train rows are the photos" in capsys.readouterr().err


def test_an_evaluation_engine_gives_every_crop_its_kind_so_a_crop_flagged_only_when_relabelled_has_one(
        tiny_dataset, tmp_path):
    """Evaluation relabels one run's scores under other thresholds (calibrate-stage2's "after"):
    a crop the run's own thresholds left regular had no kind and counted as a wrong one."""
    from pipelines.engine.config import QCConfig
    from pipelines.engine.qc import QCPipeline
    from pipelines.evaluation.pipeline_eval import evaluate_pipeline, run_rows

    weights = tiny_weights(tmp_path / "w", 0.0, sad_threshold=100.0)  # Deep SAD flags nothing
    df = load_manifest(tiny_dataset.manifest)
    df = df[df["kind"].isin(["green", "iodine"])].head(4).reset_index(drop=True)
    served = QCPipeline(weights, QCConfig(device="cpu", policy="deep_sad"))
    judged = QCPipeline(weights, QCConfig(device="cpu", policy="deep_sad", kind_of_every_crop=True))
    a, b = served.run(list(df["abspath"])), judged.run(list(df["abspath"]))
    assert [r.label.value for r in a] == [r.label.value for r in b] == ["regular"] * 4
    assert [r.kind for r in a] == [None] * 4 and all(r.kind in ("green", "iodine") for r in b)
    with pytest.raises(ValueError, match="kind_of_every_crop"):
        run_rows(served, df)
    results = run_rows(judged, df)
    judged.sad_card = judged.sad_card.model_copy(update={"thresholds": {**judged.sad_card.thresholds, "distance": 0.0}})
    after = evaluate_pipeline(judged, df, results)["deep_sad"]["overall"]  # every crop flagged now
    assert after["sensitivity"] == 1.0
    assert after["kind_accuracy"] == np.mean([r.kind == k for r, k in zip(b, df["kind"])])
    served.close(), judged.close()


def test_group_rates_leave_unreadable_photos_out_and_count_them():
    """Kept in, a corrupt file was a missed cervix: one among 40 read as a model regression."""
    truth = pd.Series(["regular", "green", "green", "no_cervix"])
    m = score_group(truth, ["regular", "non_regular", "unreadable", "unreadable"], [None, "green", None, None])
    assert m["unreadable"] == 2 and m["n"] == 4 and m["n_cervix"] == 2 and m["n_no_cervix"] == 0
    assert m["cervix_found"] == 1 and m["sensitivity"] == 1 and m["no_cervix_called"] is None


def test_eval_pipeline_says_how_many_photos_it_could_not_read_and_fails_when_none(tmp_path):
    from tests.qc_fixtures import jpeg_bytes, textured_scene

    weights = tiny_weights(tmp_path / "w", detector_threshold=0.0)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    (tmp_path / "good.jpg").write_bytes(jpeg_bytes(textured_scene(1)))
    rows = pd.DataFrame({"path": ["bad.jpg", "good.jpg"], "patient_id": ["p1", "p2"], "source": "s",
                         "device": "d", "kind": "regular", "split": "test"})
    rows.to_csv(tmp_path / "m.csv", index=False)
    r = runner.invoke(app, ["eval-pipeline", str(tmp_path / "m.csv"), "--weights", str(weights), "-o",
                            str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    assert "1 unreadable photos left out of every rate" in r.output and "(n=1)" in r.output
    rows.iloc[:1].to_csv(tmp_path / "m.csv", index=False)
    r = runner.invoke(app, ["eval-pipeline", str(tmp_path / "m.csv"), "--weights", str(weights), "-o",
                            str(tmp_path / "ev2")])
    assert r.exit_code == 1 and "error: not one of the 1 photos could be read" in r.output, r.output
    assert not (tmp_path / "ev2").exists()
