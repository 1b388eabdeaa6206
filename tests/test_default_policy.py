"""With no policy given, the engine decides with the policy its stage-2 cards record as the
best whole-pipeline F1 on validation, while that record names the two models loaded; without
one, with the stage-2 model whose validation F1 is higher; an explicit policy always wins."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.io import ModelCard, load_card
from pipelines.engine.config import QCConfig
from pipelines.engine.qc import QCPipeline
from pipelines.engine.qc_result import POLICIES
from pipelines.engine.weights_folder import best_policy, decision_of
from pipelines.evaluation.pipeline_eval import choose_policy
from tests.qc_fixtures import tiny_weights

ROOT = Path(__file__).resolve().parents[1]


def _set_val_f1(card_path, f1):
    card = json.loads(card_path.read_text())
    card["metrics"] = {"val": {"f1": f1}}  # the card's JSON only: the sha256 covers the weights file
    card_path.write_text(json.dumps(card))


def _report(f1: dict[str, float], n_pos: int = 12) -> dict:
    """An eval-pipeline report's shape, overall figures only."""
    return {"default_policy": "deep_sad"} | {p: {"overall": {"f1": v, "n_non_regular": n_pos}} for p, v in f1.items()}


def _of(weights: Path, split: str | None = "val") -> dict:
    """What eval-pipeline writes beside the figures: the split and the folder's voting models."""
    cards = [load_card(p) for p in sorted(weights.glob("*.json")) if p.stem in ("deep_sad", "classifier", "colour")]
    recorded = decision_of("", cards)
    return {"split": split, "models": recorded["models"], "thresholds": recorded["thresholds"]}


def test_the_default_policy_is_the_model_with_the_better_validation_f1(tmp_path):
    weights = tiny_weights(tmp_path, detector_threshold=0.05)
    _set_val_f1(weights / "deep_sad.json", 0.98)
    _set_val_f1(weights / "classifier.json", 0.95)
    assert QCPipeline(weights).policy == "deep_sad"
    assert QCPipeline(weights, QCConfig(policy="both")).policy == "both"
    _set_val_f1(weights / "classifier.json", 0.99)
    assert QCPipeline(weights).policy == "resnest"
    # hand-edited metrics (null, text): an AttributeError traceback outside any card's name (an audit)
    from pipelines.engine.weights_folder import best_policy

    sad, cls = (ModelCard(name=n, architecture="x", metrics={"val": None, "policy_choice": "both"})
                for n in ("deep_sad", "classifier"))
    assert best_policy(sad, cls) == "resnest"


def test_the_policy_with_the_best_pipeline_f1_wins_and_a_tie_goes_to_the_simpler_decision():
    assert choose_policy(_report({"deep_sad": 0.917, "resnest": 0.917, "either": 0.88, "both": 0.957}))[0] == "both"
    assert choose_policy(_report({"deep_sad": 0.96, "resnest": 0.96, "either": 0.96, "both": 0.96}))[0] == "resnest"
    assert choose_policy(_report({"deep_sad": 0.96, "resnest": 0.9, "either": 0.9, "both": 0.96}))[0] == "deep_sad"
    assert choose_policy(_report({"deep_sad": 0.8, "resnest": 0.8, "either": 0.9, "both": 0.9}))[0] == "both"
    three = {"deep_sad": 0.923, "resnest": 0.917, "either": 0.889, "both": 0.957}
    assert choose_policy(_report(three | {"two_of_three": 1.0}))[0] == "two_of_three"
    assert choose_policy(_report(three | {"two_of_three": 0.957}))[0] == "both"  # the vote must do better


def test_a_validation_report_without_a_green_or_iodine_photo_chooses_nothing():
    with pytest.raises(ValueError, match="no green or iodine"):
        choose_policy(_report({p: 0.0 for p in POLICIES}, n_pos=0))


def test_the_recorded_choice_sets_the_default_until_a_model_is_retrained(tmp_path, caplog):
    weights = tiny_weights(tmp_path, detector_threshold=0.05)
    _set_val_f1(weights / "deep_sad.json", 0.98)  # the fallback rule alone says deep_sad
    _set_val_f1(weights / "classifier.json", 0.95)
    report = tmp_path / "pipeline_metrics.json"
    report.write_text(json.dumps(_report({"deep_sad": 0.917, "resnest": 0.917, "either": 0.88, "both": 0.957})
                                 | _of(weights)))
    done = subprocess.run([sys.executable, "weights/finalize.py", "policy", str(report), str(weights)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "default policy both" in done.stdout and "warning: F1 0.957 on 12 green" in done.stderr
    for stem in ("deep_sad", "classifier"):
        card = json.loads((weights / f"{stem}.json").read_text())
        assert card["metrics"]["policy_choice"]["policy"] == "both" and card["metrics"]["val"]["f1"]
    assert QCPipeline(weights).policy == "both"
    assert QCPipeline(weights, QCConfig(policy="deep_sad")).policy == "deep_sad"

    # a retrained classifier: the choice was measured with the other one, so it no longer applies
    for stem in ("deep_sad", "classifier"):
        card = json.loads((weights / f"{stem}.json").read_text())
        card["metrics"]["policy_choice"]["classifier_sha256"] = "0" * 64
        (weights / f"{stem}.json").write_text(json.dumps(card))
    with caplog.at_level("WARNING", logger="pipelines.engine.weights_folder"):
        assert QCPipeline(weights).policy == "deep_sad"
    # the default changed: said, not silent
    assert "the policy recorded on the stage-2 cards (both) was chosen for other models" in caplog.text
    sad, cls = (load_card(weights / f"{stem}.json") for stem in ("deep_sad", "classifier"))
    for card in (sad, cls):  # a retrained Deep SAD instead
        card.metrics["policy_choice"] |= {"classifier_sha256": cls.sha256, "deep_sad_sha256": "0" * 64}
    assert best_policy(sad, cls) == "deep_sad"
    for card in (sad, cls):
        card.metrics["policy_choice"]["deep_sad_sha256"] = sad.sha256
    assert best_policy(sad, cls) == "both"


def test_a_policy_is_chosen_only_on_a_validation_report_of_these_very_models_and_thresholds(tmp_path):
    """A test report, a report of every row, or one of other weights was taken, and the cards
    then said "chosen on validation"."""
    weights = tiny_weights(tmp_path / "w", detector_threshold=0.05)
    figures = _report({"deep_sad": 0.917, "resnest": 0.917, "either": 0.88, "both": 0.957})
    report = tmp_path / "pipeline_metrics.json"
    before = (weights / "deep_sad.json").read_text()
    other = _of(weights)
    other["thresholds"]["deep_sad"]["distance"] += 1  # a report made before calibrate-stage2
    for extra, said in ((_of(weights, "test"), "the report is of split 'test'"),
                        (_of(weights, None), "the report is of every row of its manifest"),
                        ({}, "written before reports named their split"),
                        (other, "other models or thresholds than these cards' (deep_sad)")):
        report.write_text(json.dumps(figures | extra))
        done = subprocess.run([sys.executable, "weights/finalize.py", "policy", str(report), str(weights)],
                              cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 1 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert (weights / "deep_sad.json").read_text() == before


def test_a_recorded_two_of_three_choice_holds_only_while_its_colour_model_is_loaded(tmp_path):
    weights = tiny_weights(tmp_path, detector_threshold=0.05, colour_threshold=0.6)
    _set_val_f1(weights / "deep_sad.json", 0.98)
    _set_val_f1(weights / "classifier.json", 0.95)
    report = tmp_path / "pipeline_metrics.json"
    report.write_text(json.dumps(_report({"deep_sad": 0.92, "resnest": 0.91, "either": 0.88, "both": 0.95,
                                          "two_of_three": 1.0}) | _of(weights)))
    done = subprocess.run([sys.executable, "weights/finalize.py", "policy", str(report), str(weights)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    colour = json.loads((weights / "colour.json").read_text())
    assert colour["metrics"]["policy_choice"]["colour_sha256"] == colour["sha256"]
    assert QCPipeline(weights).policy == "two_of_three"
    sad, cls, colour_card = (load_card(weights / f"{stem}.json") for stem in ("deep_sad", "classifier", "colour"))
    assert best_policy(sad, cls, colour_card) == "two_of_three"
    for card in (sad, cls):  # a retrained colour model
        card.metrics["policy_choice"]["colour_sha256"] = "0" * 64
    assert best_policy(sad, cls, colour_card) == "deep_sad"
    for name in ("colour.json", "colour.safetensors"):  # the folder without it: the fallback rule, no error
        (weights / name).unlink()
    assert QCPipeline(weights).policy == "deep_sad"


def test_the_recipes_table_shows_both_splits_under_the_policy_the_weights_ship_with(tmp_path):
    """The val run is evaluated before `policy` writes the choice, so its report names the
    fallback: the table's val row showed deep_sad's F1 beside the test row's two_of_three."""
    row = lambda f1: {"overall": {"cervix_found": 1.0, "n_cervix": 9, "no_cervix_called": None, "n_no_cervix": 0,
                                  "f1": f1, "n_non_regular": 3, "sensitivity": 1.0, "specificity": 1.0}}
    for split, named in (("val", "deep_sad"), ("test", "two_of_three")):
        (tmp_path / f"eval-pipeline-{split}").mkdir()
        report = {"default_policy": named, "deep_sad": row(0.111 if split == "val" else 0.222),
                  "two_of_three": row(0.333 if split == "val" else 0.444)}
        (tmp_path / f"eval-pipeline-{split}" / "pipeline_metrics.json").write_text(json.dumps(report))
    done = subprocess.run([sys.executable, "weights/finalize.py", "table", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "0.333 (3)" in done.stdout and "0.444 (3)" in done.stdout and "0.111" not in done.stdout
