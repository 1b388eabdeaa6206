"""Presence command: train-presence (is there a cervix in the photo at all?)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands.common import _fail


def train_presence_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column: cervix photos and no_cervix photos.")],
    detector: Annotated[Path, typer.Option(help="The detector card whose features the head reads (ship them together).")],
    out: Annotated[Path, typer.Option("--out", "-o")],
    c_hist: Annotated[float, typer.Option(help="Inverse regularisation of the colour head.")] = 0.1,
    c_feat: Annotated[float, typer.Option(help="Inverse regularisation of the detector-feature head.")] = 0.01,
) -> None:
    """Fit the presence head (colour histogram + detector features) on the train split; the
    threshold from the validation split (balanced accuracy)."""
    import torch

    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.training.presence import PresenceTrainConfig, train_presence

    try:
        df = load_manifest(manifest)
        if "split" not in df.columns:
            _fail(f"{manifest} has no split column: run `cervixqc split` first")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        card = train_presence(PresenceTrainConfig(out_dir=out, c_hist=c_hist, c_feat=c_feat), detector,
                              df[df["split"] == "train"], df[df["split"] == "val"], device,
                              {"manifest": str(manifest)})
    except (ManifestError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"exported {card}")
