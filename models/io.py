"""Weights as safetensors (no pickle) with a JSON model card beside them.

The card carries what is needed to rebuild and use the network (builder config, input size,
preprocessing, thresholds, classes) and what a reader must know to trust it (training
recipe and data, metrics, sha256). Loading refuses weights whose sha256 is not the card's:
a half-copied or swapped file must not quietly run at a screening site.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file


class WeightsIntegrityError(RuntimeError):
    """The weights file is not the one its card describes."""


class ModelCard(BaseModel):
    name: str
    architecture: str
    config: dict[str, Any] = Field(default_factory=dict)  # builder arguments
    input_size: list[int] = Field(default_factory=list)  # [height, width] the model expects
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)  # recipe
    data: dict[str, Any] = Field(default_factory=dict)  # what it was trained and tested on
    metrics: dict[str, Any] = Field(default_factory=dict)
    weights_file: str = ""
    sha256: str = ""
    created: str = ""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(state: dict[str, torch.Tensor], stem: str | Path, card: ModelCard) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json`; returns the card path. Atomic per file."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, weights)
    card = card.model_copy(update={
        "weights_file": weights.name,
        "sha256": sha256_file(weights),
        "created": card.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    card_path = stem.with_suffix(".json")
    tmp = card_path.with_name(card_path.name + ".tmp")
    tmp.write_text(card.model_dump_json(indent=2))
    os.replace(tmp, card_path)
    return card_path


def load_card(card_path: str | Path) -> ModelCard:
    return ModelCard.model_validate_json(Path(card_path).read_text())


def load_weights(card_path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], ModelCard]:
    """The state dict and its card, after checking the file's sha256 against the card."""
    card_path = Path(card_path)
    card = load_card(card_path)
    weights = card_path.parent / card.weights_file
    if not weights.is_file():
        raise WeightsIntegrityError(f"{card_path}: weights file {weights.name!r} is missing")
    actual = sha256_file(weights)
    if actual != card.sha256:
        raise WeightsIntegrityError(
            f"{weights}: sha256 {actual[:16]}... does not match its card's {card.sha256[:16]}...; refusing to load"
        )
    return load_file(str(weights), device=str(device)), card
