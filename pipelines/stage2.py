"""Running trained stage-2 models from their cards: Deep SAD distances and ResNeSt
probabilities (plus kind) for batches of cervix crops."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.classifier import ClassifierConfig, RegularityClassifier
from models.deep_sad import DeepSAD
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


@torch.inference_mode()
def score_batch(model: nn.Module, card: ModelCard, crops: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float crops [N, 3, S, S] in [0, 1] at the card's input size -> {"score"} (larger means
    non-regular; Deep SAD distance or ResNeSt probability), plus "kind_probs" for ResNeSt."""
    if card.name == "deep_sad":
        return {"score": model.score(crops).float().cpu()}
    out = model(crops)
    return {"score": torch.sigmoid(out["logit"]).float().cpu(),
            "kind_probs": torch.softmax(out["kind_logits"].float(), 1).cpu(),
            "features": out["features"].float().cpu()}


def threshold_of(card: ModelCard) -> float:
    return card.thresholds["distance" if card.name == "deep_sad" else "probability"]
