"""Weights stored in half precision (to keep weights/ under 120 MB) load back as float32,
keep their integer buffers, and still refuse a file that is not the card's."""

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
