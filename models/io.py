"""Weights as safetensors (no pickle) with a JSON model card beside them.

The card carries what is needed to rebuild and use the network (builder config, input size,
preprocessing, thresholds, classes) and what a reader must know to trust it (training
recipe and data, metrics, sha256). Loading refuses weights whose sha256 is not the card's:
a half-copied or swapped file must not quietly run at a screening site.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel, Field
from safetensors import SafetensorError

from models.durable import flush_file, flush_folder


def unwritable(path: Path, e: Exception) -> OSError:
    """A writer's failure as the OSError it is: torch.save says "unexpected pos 37522816 vs
    37522708" and safetensors a SafetensorError for a full disk, and a training run on one
    ended in a 130-line traceback that never said "space" (the CLI prints an OSError in one
    line)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = free is not None and free < 64 * 2**20
    where = "" if free is None else f", {free / 2**20:.0f} MiB free there"
    why = "the disk is full" if full else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return OSError(errno.ENOSPC if full else errno.EIO, f"cannot write it ({why}{where})", str(path))


@contextmanager
def reading_weights(path: str | Path) -> Iterator[None]:
    """A pretrained file that is no weights (a photo, a cut or empty file) as one ValueError
    naming it: it was a 50-line UnpicklingError or SafetensorError traceback from the loader
    (an audit). A RuntimeError is a state dict that does not fit the network."""
    import pickle

    try:
        yield
    except (pickle.UnpicklingError, SafetensorError, EOFError, RuntimeError, OSError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(f"{path}: cannot load it as this network's weights ({type(e).__name__}: {reason})") from None


class WeightsIntegrityError(RuntimeError):
    """The weights file is not the one its card describes."""


class UnreadableCard(WeightsIntegrityError, ValueError):
    """A model card that is not one (truncated JSON, a missing field, a weights file named
    outside its folder): named with its path. A ValueError too, for callers that catch those."""


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
    storage_dtype: str = "float32"  # dtype of the floating tensors in the file; loading up-casts to float32
    sha256: str = ""
    created: str = ""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


if TYPE_CHECKING:
    import torch

# torch is imported where tensors are read or written, not with this module: every `cervixqc`
# command imports it for the error class and the card, and `cervixqc --version`, `-h` or
# `split` took 4.5-5.5 s on the 2-core machine, 3 s of it torch's import (now under 1 s)
_STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def _stored(v: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    import torch

    v = v.detach().contiguous().cpu()
    if dtype is None or not v.is_floating_point() or v.dtype == dtype:
        return v
    out = v.to(dtype)
    if not torch.isfinite(out).all() and torch.isfinite(v).all():
        raise ValueError(f"a tensor overflows {dtype}; store it in float32")
    return out


def save_weights(state: dict[str, torch.Tensor], stem: str | Path, card: ModelCard,
                 dtype: torch.dtype | str | None = None) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json`; returns the card path. Atomic per file.

    `dtype` ("float16", "bfloat16", "float32" or a torch dtype) stores the floating tensors in
    that dtype (halves the file for float16); integer buffers are kept. The card records it as
    `storage_dtype` and `load_weights` up-casts back to float32."""
    import torch
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(dtype, str):
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage dtype {dtype!r}: expected one of {sorted(_STORAGE_DTYPES)}")
        dtype = getattr(torch, dtype)
    weights = stem.with_suffix(".safetensors")
    tmp = weights.with_name(weights.name + ".tmp")
    try:
        save_file({k: _stored(v, dtype) for k, v in state.items()}, str(tmp))
    except SafetensorError as e:
        tmp.unlink(missing_ok=True)
        raise unwritable(weights, e) from e
    os.chmod(tmp, 0o644)  # safetensors writes 0600; a container's non-root user must read shipped weights
    flush_file(tmp)
    os.replace(tmp, weights)
    storage = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    card = card.model_copy(update={
        "weights_file": weights.name,
        "storage_dtype": storage,
        "sha256": sha256_file(weights),
        "created": card.created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    card_path = stem.with_suffix(".json")
    tmp = card_path.with_name(card_path.name + ".tmp")
    tmp.write_text(card.model_dump_json(indent=2))
    flush_file(tmp)
    os.replace(tmp, card_path)
    flush_folder(card_path.parent)
    return card_path



def load_card(card_path: str | Path) -> ModelCard:
    try:
        card = ModelCard.model_validate_json(Path(card_path).read_text())
    except FileNotFoundError:
        raise UnreadableCard(f"{card_path}: no such model card") from None
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        reason = "; ".join(line.strip()[:200] for line in str(e).splitlines()[:3])
        raise UnreadableCard(f"{card_path}: not a readable model card ({reason})") from None
    if not card.weights_file or Path(card.weights_file).name != card.weights_file:
        # a card names its file beside it: `../../elsewhere.safetensors` loaded weights from anywhere
        raise UnreadableCard(f"{card_path}: weights_file {card.weights_file!r} must be a file name in the card's folder")
    not_numbers = sorted(k for k, v in card.thresholds.items() if v != v)
    if not_numbers:  # a hand-written NaN: every detector box confident, or every photo no_cervix (an audit)
        raise UnreadableCard(f"{card_path}: threshold {', '.join(not_numbers)} is not a number")
    return card


def verified_card(card_path: str | Path, names: Sequence[str] = ()) -> ModelCard:
    """The card, once it is of one of `names` (any, when empty) and its weights file is there
    and has the card's sha256: what an engine that runs an export of the weights (not the
    weights) still checks, so a tampered or truncated file is refused whichever runtime reads
    it. Another model's card read as this one's config was a TypeError traceback, or ran as
    the wrong model."""
    with _verified_weights(card_path, names) as (card, _):
        return card


def opened_path(opened: BinaryIO, name: str | Path) -> str:
    """A path that reads the open file itself, whatever is renamed over its name since: its
    /proc/self/fd link on Linux, else its name (the window between a check and a read by name
    left open there)."""
    link = f"/proc/self/fd/{opened.fileno()}"
    return link if os.path.exists(link) else str(name)


@contextmanager
def _verified_weights(card_path: str | Path, names: Sequence[str]) -> Iterator[tuple[ModelCard, str]]:
    """The card and a path that reads the very file that was hashed, while it stays open. The
    file was hashed by name and then loaded by name: one replaced between the two was loaded
    unverified. On Linux the path is the open file's /proc/self/fd link (the same file,
    whatever is renamed over its name since; `opened_path`).
    Reading the file once into memory instead would cost its size again at start, on an
    engine with little margin under its 1.2 GB target."""
    card_path = Path(card_path)
    card = load_card(card_path)
    if names and card.name not in names:
        raise UnreadableCard(f"{card_path}: the card of a {card.name!r} model, not of a {' or '.join(names)}")
    weights = card_path.parent / card.weights_file
    if not weights.is_file():
        raise WeightsIntegrityError(f"{card_path}: weights file {weights.name!r} is missing")
    if not card.sha256:  # a card written by hand or cut short: nothing would say the file is the one trained
        raise WeightsIntegrityError(f"{card_path}: the card has no sha256 for {weights.name!r}; refusing to load")
    try:
        opened = open(weights, "rb")
    except FileNotFoundError:
        raise WeightsIntegrityError(f"{card_path}: weights file {weights.name!r} is missing") from None
    with opened:
        readable = opened_path(opened, weights)
        actual = sha256_file(readable)
        if actual != card.sha256:
            raise WeightsIntegrityError(
                f"{weights}: sha256 {actual[:16]}... does not match its card's {card.sha256[:16]}...; refusing to load"
            )
        yield card, readable


def load_weights(card_path: str | Path, device: str | torch.device = "cpu", names: Sequence[str] = ()
                 ) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """The state dict and its `verified_card`. Tensors stored in half precision
    (float16/bfloat16) come back as float32."""
    import torch
    from safetensors.torch import load_file

    with _verified_weights(card_path, names) as (card, readable):
        weights = Path(card_path).parent / card.weights_file
        try:
            state = load_file(readable, device=str(device))
        except SafetensorError as e:  # a pickle or a cut file renamed .safetensors, its sha256 put on the card
            raise WeightsIntegrityError(f"{weights}: not a safetensors file ({e})") from None
    state = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in state.items()}
    return state, card
