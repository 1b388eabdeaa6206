"""Weights stored in half precision (to keep weights/ under 120 MB) load back as float32,
keep their integer buffers, and still refuse a file that is not the card's."""

from pathlib import Path

import pytest
import torch

from models.classifier import ClassifierConfig, RegularityClassifier
from models.io import ModelCard, WeightsIntegrityError, load_weights, save_weights


def test_a_float16_file_is_half_the_size_and_loads_as_float32(tmp_path):
    model = RegularityClassifier(ClassifierConfig(arch="resnest14d", input_size=32))
    state = model.state_dict()
    card = ModelCard(name="classifier", architecture="resnest14d")
    save_weights(state, tmp_path / "f32", card)
    save_weights(state, tmp_path / "f16", card, dtype="float16")
    f32, f16 = (tmp_path / "f32.safetensors").stat().st_size, (tmp_path / "f16.safetensors").stat().st_size
    assert f16 < 0.55 * f32
    loaded, loaded_card = load_weights(tmp_path / "f16.json")
    assert loaded_card.storage_dtype == "float16"
    for key, value in state.items():
        if value.is_floating_point():
            assert loaded[key].dtype == torch.float32
            torch.testing.assert_close(loaded[key], value, rtol=1e-3, atol=1e-4)
        else:
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    RegularityClassifier(ClassifierConfig(arch="resnest14d", input_size=32)).load_state_dict(loaded)


def test_a_value_float16_cannot_hold_is_refused_and_a_swapped_file_too(tmp_path):
    card = ModelCard(name="x", architecture="x")
    with pytest.raises(ValueError, match="overflows"):
        save_weights({"w": torch.tensor([1e6])}, tmp_path / "big", card, dtype="float16")
    save_weights({"w": torch.ones(3)}, tmp_path / "a", card, dtype="float16")
    save_weights({"w": torch.zeros(3)}, tmp_path / "b", card, dtype="float16")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(WeightsIntegrityError):
        load_weights(tmp_path / "a.json")


def _damaged(folder, card: str, edit) -> None:
    import json

    path = folder / card
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_damaged_weights_folder_is_refused_naming_the_card_and_why(tmp_path):
    """Each of these was a bare TypeError, KeyError, IndexError, SafetensorError or pydantic
    error without the file's name (and "Application startup failed" in the service), or ran
    silently at a default threshold, or loaded weights from outside the folder."""
    import hashlib
    import json
    import shutil

    from pipelines.engine.qc import QCPipeline
    from tests.qc_fixtures import tiny_weights

    good = tiny_weights(tmp_path / "good", 0.0)

    def fresh(name):
        return Path(shutil.copytree(good, tmp_path / name))

    cases = {}
    w = fresh("config")
    _damaged(w, "detector.json", lambda d: d["config"].update(unknown_key=1))
    cases[w] = ("detector.json", "unexpected keyword argument")
    w = fresh("threshold")
    _damaged(w, "detector.json", lambda d: d.update(thresholds={"scor": 0.9}))
    cases[w] = ("detector.json", "KeyError: 'score'")
    w = fresh("size")
    _damaged(w, "classifier.json", lambda d: d.update(input_size=[]))
    cases[w] = ("classifier.json", "IndexError")
    w = fresh("outside")
    _damaged(w, "deep_sad.json", lambda d: d.update(weights_file="../good/deep_sad.safetensors"))
    cases[w] = ("deep_sad.json", "must be a file name in the card's folder")
    w = fresh("cut")
    (w / "classifier.json").write_text((w / "classifier.json").read_text()[:50])
    cases[w] = ("classifier.json", "not a readable model card")
    w = fresh("gone")
    (w / "deep_sad.json").unlink()
    cases[w] = ("deep_sad.json", "no such model card")
    w = fresh("pickle")
    torch.save({"x": torch.zeros(2)}, w / "deep_sad.safetensors")
    _damaged(w, "deep_sad.json", lambda d: d.update(sha256=hashlib.sha256((w / "deep_sad.safetensors").read_bytes())
                                                    .hexdigest()))
    cases[w] = ("deep_sad.safetensors", "not a safetensors file")
    for folder, (name, why) in cases.items():
        with pytest.raises(WeightsIntegrityError) as err:
            QCPipeline(folder)
        assert name in str(err.value) and why in str(err.value), (folder.name, str(err.value))
    assert json.loads((good / "detector.json").read_text())["thresholds"]  # the good copy loads
    QCPipeline(good)


def test_a_card_without_a_sha256_is_refused(tmp_path):
    card_path = save_weights({"w": torch.ones(3)}, tmp_path / "m", ModelCard(name="x", architecture="x"))
    card_path.write_text(card_path.read_text().replace(ModelCard.model_validate_json(card_path.read_text()).sha256, ""))
    with pytest.raises(WeightsIntegrityError, match="no sha256"):
        load_weights(card_path)


def test_a_card_whose_threshold_is_not_a_number_is_refused(tmp_path):
    """A hand-written NaN passed: every detector box counted as confident, or every photo as
    no_cervix (an audit). A NaN written by code is null, which no card reads."""
    card_path = save_weights({"w": torch.ones(3)}, tmp_path / "m", ModelCard(name="x", architecture="x",
                                                                            thresholds={"score": 0.25}))
    card_path.write_text(card_path.read_text().replace('"score": 0.25', '"score": NaN'))
    with pytest.raises(WeightsIntegrityError, match="threshold score is not a number"):
        load_weights(card_path)


def test_each_loader_refuses_another_models_card_before_reading_its_weights(tmp_path):
    """The colour, presence and stage-2 loaders checked the card's name after reading the
    weights, each its own way (a training start from a detector card did not check at all)."""
    from pipelines.engine.detector import load_detector
    from pipelines.engine.presence import load_presence
    from pipelines.engine.stage2 import load_colour, load_stage2

    save_weights({"w": torch.ones(3)}, tmp_path / "x", ModelCard(name="deep_sad", architecture="lenet"))
    (tmp_path / "x.safetensors").write_bytes(b"not read")  # read, this would be an integrity error
    calls = {"a colour": lambda: load_colour(tmp_path / "x.json"),
             "a detector": lambda: load_detector(tmp_path / "x.json"),
             "a presence": lambda: load_presence(tmp_path / "x.json", ModelCard(name="detector", architecture="r")),
             "a classifier": lambda: load_weights(tmp_path / "x.json", names=("classifier",))}
    for words, call in calls.items():
        with pytest.raises(ValueError, match=f"x.json: the card of a 'deep_sad' model, not of {words}"):
            call()
    with pytest.raises(WeightsIntegrityError, match="x.safetensors"):  # its own name: read, and refused
        load_stage2(tmp_path / "x.json")


def test_weights_replaced_between_their_check_and_their_load_are_not_the_ones_loaded(tmp_path, monkeypatch):
    """The sha256 was taken by name and the file then opened by name again: another file renamed
    over it in between was loaded as if checked. The hash below is the real one; it renames the
    other weights over the checked file the moment it has hashed it."""
    import os

    import models.io

    card = ModelCard(name="x", architecture="x")
    save_weights({"w": torch.ones(3)}, tmp_path / "a", card)
    save_weights({"w": torch.zeros(3)}, tmp_path / "b", card)
    real_hash = models.io.sha256_file

    def hash_then_swap(path):
        digest = real_hash(path)
        os.replace(tmp_path / "b.safetensors", tmp_path / "a.safetensors")
        return digest

    monkeypatch.setattr(models.io, "sha256_file", hash_then_swap)
    state, _ = load_weights(tmp_path / "a.json")
    assert torch.equal(state["w"], torch.ones(3))
    monkeypatch.setattr(models.io, "sha256_file", real_hash)
    with pytest.raises(WeightsIntegrityError, match="does not match"):  # and the next load sees the swap
        load_weights(tmp_path / "a.json")
