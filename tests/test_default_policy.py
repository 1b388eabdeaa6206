"""With no policy given, the engine decides with the stage-2 model whose validation F1 is
higher, as its card records; an explicit policy always wins."""

import json

from pipelines.engine.qc import QCConfig, QCPipeline
from tests.qc_fixtures import tiny_weights


def _set_val_f1(card_path, f1):
    card = json.loads(card_path.read_text())
    card["metrics"] = {"val": {"f1": f1}}  # the card's JSON only: the sha256 covers the weights file
    card_path.write_text(json.dumps(card))


def test_the_default_policy_is_the_model_with_the_better_validation_f1(tmp_path):
    weights = tiny_weights(tmp_path, detector_threshold=0.05)
    _set_val_f1(weights / "deep_sad.json", 0.98)
    _set_val_f1(weights / "classifier.json", 0.95)
    assert QCPipeline(weights).policy == "deep_sad"
    assert QCPipeline(weights, QCConfig(policy="both")).policy == "both"
    _set_val_f1(weights / "classifier.json", 0.99)
    assert QCPipeline(weights).policy == "resnest"
