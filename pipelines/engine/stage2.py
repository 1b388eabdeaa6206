"""Running trained stage-2 models from their cards: Deep SAD distances and ResNeSt
probabilities (plus kind) for batches of cervix crops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from models.classifier import ClassifierConfig, RegularityClassifier
from models.deep_sad import DeepSAD
from models.exportable import exportable
from models.io import ModelCard, load_weights


def load_stage2(card_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    state, card = load_weights(card_path)
    if card.name == "deep_sad":
        model: nn.Module = DeepSAD(**card.config)
    elif card.name == "classifier":
        model = RegularityClassifier(ClassifierConfig(**card.config))
    else:
        raise ValueError(f"{card_path}: not a stage-2 card (name {card.name!r})")
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
