"""Running trained stage-2 models from their cards: Deep SAD distances and ResNeSt
probabilities (plus kind) for batches of cervix crops, and the optional crop-colour scorer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from models.classifier import ClassifierConfig, RegularityClassifier
from models.colour import CropColour, CropColourConfig
from models.deep_sad import DeepSAD
from models.exportable import exportable
from models.io import ModelCard, load_weights
from pipelines.engine.loading import loading
from pipelines.engine.presence import joint_histograms


def load_stage2(card_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    with loading(card_path):
        state, card = load_weights(card_path, names=("deep_sad", "classifier"))
        if card.name == "deep_sad":
            model: nn.Module = DeepSAD(**card.config)
        else:
            model = RegularityClassifier(ClassifierConfig(**card.config))
        model.load_state_dict(state)
    return model.to(device).eval(), card


def interpret(card: ModelCard, outputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage-2 model's raw outputs (its `models.exportable` view, torch or exported) ->
    {"score"} (larger means non-regular: Deep SAD distance or ResNeSt probability), plus
    "kind_probs" and "features" for ResNeSt."""
    if card.name == "deep_sad":
        return {"score": outputs[0].float().cpu()}
    logit, kind_logits, features = outputs
    return {"score": torch.sigmoid(logit.float()).cpu(), "kind_probs": torch.softmax(kind_logits.float(), 1).cpu(),
            "features": features.float().cpu()}


@torch.inference_mode()
def score_batch(model: nn.Module, card: ModelCard, crops: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float crops [N, 3, S, S] in [0, 1] at the card's input size -> `interpret`'s dict."""
    return interpret(card, exportable(model)(crops))


def threshold_of(card: ModelCard) -> float:
    return card.thresholds["distance" if card.name == "deep_sad" else "probability"]


def check_colour_config(config: dict) -> None:
    """The engine scores colour on the 32 px crops Deep SAD reads: a scorer of another crop
    size failed every photo (an audit). Asked by the loader and by the weights folder's check."""
    if config.get("crop_side", 32) != 32:
        raise ValueError(f"crop_side {config['crop_side']}: the engine scores colour on the 32 px crops Deep SAD reads")


def load_colour(card_path: str | Path) -> tuple[CropColour, ModelCard]:
    """The crop-colour scorer; it always runs on torch on the CPU (a 512-input dot product)."""
    state, card = load_weights(card_path, names=("colour",))
    check_colour_config(card.config)
    model = CropColour(CropColourConfig(**card.config))
    model.load_state_dict(state)
    return model.eval(), card


def crop_histograms(crops: torch.Tensor, cfg: CropColourConfig) -> torch.Tensor:
    """Crops [N, 3, S, S] in 0..255 (float or uint8) -> the colour model's histograms."""
    if crops.shape[-1] != cfg.crop_side or crops.shape[-2] != cfg.crop_side:
        raise ValueError(f"the colour model reads {cfg.crop_side} px crops, got {tuple(crops.shape[-2:])}")
    return joint_histograms(crops.float(), cfg.hist_bins)


@torch.inference_mode()
def colour_scores(model: CropColour, crops: torch.Tensor) -> torch.Tensor:
    """Crops [N, 3, S, S] in 0..255 -> P(non-regular) [N] from their colour alone."""
    return model(crop_histograms(crops, model.cfg))
