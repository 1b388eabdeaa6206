"""`cervixqc calibrate-stage2`: a site's own labelled photos choose the stage-2 thresholds again,
the networks kept, and the engine labels by the cards it writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from pipelines.cli import app
from tests.qc_fixtures import tiny_weights

REPO = Path(__file__).resolve().parents[1]


def _synthetic_site(folder: Path) -> Path:
    """Photos of a generator source the bundled networks never trained on, every row in `val`."""
    made = CliRunner().invoke(app, ["synth", str(folder), "-n", "48", "--ratio", "2", "--no-cervix-fraction", "0.1",
                                    "--max-side", "320", "--seed", "11", "--sources", "teaching", "--workers", "1"])
    assert made.exit_code == 0, made.output
    manifest = pd.read_csv(folder / "manifest.csv").assign(split="val")
    manifest.to_csv(folder / "split.csv", index=False)
    return folder / "split.csv"


def test_a_threshold_that_flags_every_regular_is_chosen_again_and_the_engine_labels_by_the_new_cards(tmp_path):
    """Deep SAD's distance threshold set to 0 flags every crop; chosen again on the site's photos,
    Deep SAD alone separates them as the bundled network does, and an engine on a copy of the
    folder with the written cards gives the labels the command reported."""
    split = _synthetic_site(tmp_path / "site")
    broken = tmp_path / "broken"
    shutil.copytree(REPO / "weights", broken, ignore=shutil.ignore_patterns("data", "*.py", "*.sh", "*.md"))
    card = json.loads((broken / "deep_sad.json").read_text())
    card["thresholds"]["distance"] = 0.0
    (broken / "deep_sad.json").write_text(json.dumps(card))

    run = CliRunner().invoke(app, ["calibrate-stage2", str(split), "--weights", str(broken), "-o", str(tmp_path / "cal")])
    assert run.exit_code == 0, run.output
    assert "deep_sad: distance 0 -> " in run.output and "5 no_cervix photos left out" in run.output
    figures = json.loads((tmp_path / "cal" / "stage2_calibration.json").read_text())
    alone = figures["models_alone"]["deep_sad"]
    assert alone["before"]["overall"]["specificity"] == 0.0  # every regular flagged
    assert alone["after"]["overall"]["f1"] >= 0.9 and alone["after"]["overall"]["specificity"] >= 0.95, alone
    written = json.loads((tmp_path / "cal" / "deep_sad.json").read_text())
    assert written["thresholds"]["distance"] == figures["thresholds"]["deep_sad"]["after"] > 0
    assert written["sha256"] == card["sha256"] and written["metrics"]["site_calibration"]["threshold_before"] == 0.0
    assert written["metrics"]["policy_choice"] == card["metrics"]["policy_choice"]  # the policy is kept
    scores = pd.read_csv(tmp_path / "cal" / "stage2_scores.csv")
    assert len(scores) == figures["record"]["photos_scored"] and set(scores["y"]) == {0, 1}

    site = tmp_path / "site-weights"
    shutil.copytree(broken, site)
    for name in ("deep_sad", "classifier", "colour"):
        shutil.copy(tmp_path / "cal" / f"{name}.json", site)
    judged = CliRunner().invoke(app, ["eval-pipeline", str(split), "--weights", str(site), "-o", str(tmp_path / "ev")])
    assert judged.exit_code == 0, judged.output
    # the rows that chose the thresholds are no held-out figure, and the evaluation says so (an audit)
    assert "were chosen on this manifest (deep_sad on its val rows" in judged.output
    report = json.loads((tmp_path / "ev" / "pipeline_metrics.json").read_text())
    for policy in ("deep_sad", "resnest", report["default_policy"]):
        assert report[policy]["overall"]["confusion"] == figures["pipeline"]["after"][policy]["overall"]["confusion"]
    assert (report["deep_sad"]["overall"]["confusion"]
            != figures["pipeline"]["before"]["deep_sad"]["overall"]["confusion"])
    assert report["thresholds"]["deep_sad"]["distance"] == written["thresholds"]["distance"]  # the report says whose

    # again into the same folder with weights that have no crop-colour scorer: the earlier
    # colour card would have been copied in beside the new ones
    plain = tmp_path / "no-colour"
    shutil.copytree(broken, plain, ignore=shutil.ignore_patterns("colour.*"))
    again = CliRunner().invoke(app, ["calibrate-stage2", str(split), "--weights", str(plain), "-o", str(tmp_path / "cal")])
    assert again.exit_code == 0, again.output
    assert "holds an earlier calibration: this run replaces its files" in again.output
    assert not (tmp_path / "cal" / "colour.json").exists() and (tmp_path / "cal" / "deep_sad.json").exists()


def test_cards_under_which_the_kept_policy_reads_worse_on_their_own_photos_are_not_written(tmp_path):
    """Each threshold is its own model's best alone: on a site's split the kept policy read a
    lower F1 on the very photos that chose them, and the command said to copy the cards in."""
    split = _synthetic_site(tmp_path / "site")
    weights = tmp_path / "w"
    shutil.copytree(REPO / "weights", weights, ignore=shutil.ignore_patterns("data", "*.py", "*.sh", "*.md"))
    run = CliRunner().invoke(app, ["calibrate-stage2", str(split), "--weights", str(weights), "-o", str(tmp_path / "cal"),
                                   "--target-sensitivity", "0.2"])
    assert run.exit_code == 1 and "not written: under the new thresholds the kept policy" in run.output, run.output
    assert "sensitivity" in run.output and not (tmp_path / "cal").exists()


def test_calibrate_stage2_refuses_before_the_engine_what_cannot_choose_a_threshold(tmp_path):
    weights = tiny_weights(tmp_path / "w", 0.0)
    rows = pd.DataFrame([{"path": f"p{i}.jpg", "patient_id": f"p{i}", "source": "s", "device": "", "kind": "regular",
                          "split": "val"} for i in range(4)])
    for name in rows["path"]:
        (tmp_path / name).write_bytes(b"")
    rows.to_csv(tmp_path / "regular.csv", index=False)
    rows.drop(columns="split").to_csv(tmp_path / "no-split.csv", index=False)
    out = tmp_path / "cal"

    def refused(manifest: str, *more: str, weights: Path = weights) -> str:
        r = CliRunner().invoke(app, ["calibrate-stage2", str(tmp_path / manifest), "--weights", str(weights),
                                     "-o", str(out), *more])
        assert r.exit_code == 2 and not out.exists(), r.output
        return r.output

    assert "4 cervix photos in split val, 0 of them green or iodine" in refused("regular.csv")
    # a threshold chosen on a handful of photos is noise: 1 green photo of 3 took the colour
    # threshold from 0.736 to 0.076 (an audit)
    few = pd.DataFrame([{"path": f"f{i}.jpg", "patient_id": f"f{i}", "source": "s", "device": "",
                         "kind": "green" if i < 4 else "regular", "split": "val"} for i in range(16)])
    for name in few["path"]:
        (tmp_path / name).write_bytes(b"")
    few.to_csv(tmp_path / "few.csv", index=False)
    said = refused("few.csv")
    assert "16 cervix photos in split val, 4 of them green or iodine: choosing a threshold needs at least 10" in said
    assert "give validation a larger share (`cervixqc split --fractions" in said  # what to do (an audit)
    # every row chooses with --split all, the test rows too: said, since judging on them afterwards is no test
    few.assign(split=["test"] * 8 + ["val"] * 8).to_csv(tmp_path / "few-test.csv", index=False)
    assert "--split all takes this manifest's 8 test rows too" in refused("few-test.csv", "--split", "all")
    assert "takes this manifest's" not in refused("few-test.csv")
    assert "the folder does not exist" in refused("regular.csv", weights=tmp_path / "none")
    assert "no row in split 'train' (its splits: val)" in refused("regular.csv", "--split", "train")
    assert "--split test: rows that choose the thresholds are no test afterwards" in \
        refused("regular.csv", "--split", "test")
    # the networks' own split: its training rows would choose
    from pipelines.data.manifest import load_manifest
    from pipelines.data.splits import split_fingerprint

    rows.assign(sha256=[f"{i:064x}" for i in range(len(rows))]).to_csv(tmp_path / "own.csv", index=False)
    card = json.loads((weights / "deep_sad.json").read_text())
    card["data"] = dict(card.get("data") or {}) | {
        "split_fingerprint": split_fingerprint(load_manifest(tmp_path / "own.csv", check_files=False))}
    (weights / "deep_sad.json").write_text(json.dumps(card))  # the card's JSON: the sha256 covers the weights
    assert "is the split these networks were trained under: its all rows" in refused("own.csv", "--split", "all")
    assert "trained under" not in refused("own.csv")  # val rows: no training photo among them
    assert "pass --split all to choose on every row" in refused("no-split.csv")
    # into the weights folder itself: its cards would be replaced, and the figures on them with them
    into_weights = CliRunner().invoke(app, ["calibrate-stage2", str(tmp_path / "regular.csv"), "--weights",
                                            str(weights), "-o", str(weights)])
    assert into_weights.exit_code == 2 and "is a weights folder" in into_weights.output, into_weights.output


def test_an_evaluation_on_the_rows_that_chose_the_stage2_thresholds_says_it_is_not_held_out(tmp_path, capsys):
    """A site chose with `--split all` on its split and then judged `--split test` on the same
    file: F1 1.000, read as a held-out figure, with no word (an audit of the README's route)."""
    from models.io import sha256_file
    from pipelines.commands.evaluation import _check_chosen_here

    weights = tiny_weights(tmp_path / "w", 0.0)
    manifest = tmp_path / "split.csv"
    manifest.write_text("path,kind,split\na.jpg,regular,val\nb.jpg,green,test\n")
    elsewhere = tmp_path / "other.csv"
    elsewhere.write_text("path,kind,split\nc.jpg,regular,test\n")

    def chosen_on(split: str) -> None:
        card = json.loads((weights / "deep_sad.json").read_text())
        card["metrics"]["site_calibration"] = {"manifest_sha256": sha256_file(manifest), "split": split}
        (weights / "deep_sad.json").write_text(json.dumps(card))  # the card's JSON: the sha256 covers the weights

    def warned(path: Path, split: str | None) -> bool:
        _check_chosen_here(path, weights, split)
        return "were chosen on this manifest (deep_sad on its" in capsys.readouterr().err

    chosen_on("val")
    assert warned(manifest, "val") and warned(manifest, None)
    assert not warned(manifest, "test") and not warned(elsewhere, None)  # held out: other rows, another file
    chosen_on("all")
    assert warned(manifest, "test")

