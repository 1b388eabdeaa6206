"""Presence command: train-presence (is there a cervix in the photo at all?)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.commands.common import _fail, _split_manifest, trained_on, training_output


def train_presence_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest with a split column: cervix photos and no_cervix photos.")],
    detector: Annotated[Path, typer.Option(help="The detector card whose features the head reads (ship them together).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the model and its card.")],
    c_hist: Annotated[float, typer.Option(help="Inverse regularisation of the colour head.")] = 0.1,
    c_feat: Annotated[float, typer.Option(help="Inverse regularisation of the detector-feature head.")] = 0.01,
    extra_manifest: Annotated[Optional[Path], typer.Option(
        help="A second split manifest (e.g. synthetic scenes) whose train rows join the training photos; "
             "never its validation rows: the threshold comes from MANIFEST's validation split alone.")] = None,
    extra_weight: Annotated[float, typer.Option(
        help="Weight of each extra photo against a main one (measured choice: see PresenceTrainConfig).")] = 0.05,
    colour_weight: Annotated[Optional[float], typer.Option(
        help="The colour head's share of the score, the feature head's being 1 (default: the measured "
             "choice in PresenceTrainConfig).")] = None,
    zoom_copies: Annotated[Optional[int], typer.Option(
        help="Zoomed copies (35-100% of the area) of each training photo, for the close-ups and framings "
             "of a new site; 0: none (default: the measured choice in PresenceTrainConfig).")] = None,
    zoom_weight: Annotated[Optional[float], typer.Option(
        help="Weight of each zoomed copy against its photo (default: the measured choice).")] = None,
    turn_copies: Annotated[Optional[int], typer.Option(
        min=0, max=2, help="Quarter-turned copies of each training photo (1: 90 degrees, 2: 90 and 270), "
                           "for photos stored turned; 0: none (default: the measured choice in "
                           "PresenceTrainConfig).")] = None,
    turn_weight: Annotated[Optional[float], typer.Option(
        help="Weight of each turned copy against its photo (default: the measured choice).")] = None,
) -> None:
    """Fit the presence head (colour histogram + detector features) on the train split; the
    threshold from the validation split (balanced accuracy)."""
    from pipelines.commands.common import number_in

    # nan and inf were refused by scikit-learn after the whole fit (an audit)
    number_in("--extra-weight", extra_weight, 0.0, above=True)
    number_in("--colour-weight", colour_weight, 0.0)
    number_in("--zoom-weight", zoom_weight, 0.0, above=True)
    number_in("--turn-weight", turn_weight, 0.0, above=True)
    if zoom_copies is not None and zoom_copies < 0:
        _fail("--zoom-copies must be >= 0")
    for option, value in (("--c-hist", c_hist), ("--c-feat", c_feat)):  # scikit-learn's words, after the data loaded
        if not 0 < value < float("inf"):
            _fail(f"{option} must be > 0 (an inverse regularisation strength), not {value:g}")
    # after the options: "fitting again replaces it" was said, then the option refused (an audit)
    training_output(out, "presence.json", one_shot=True)
    from models.io import WeightsIntegrityError, verified_card

    try:  # a damaged or missing detector failed after the photos' features began, exit 1 (an audit)
        verified_card(detector, names=("detector",))
    except (WeightsIntegrityError, OSError, ValueError) as e:
        _fail(f"--detector: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    import torch

    from pipelines.data.manifest import ManifestError, load_manifest
    from pipelines.training.presence import PresenceTrainConfig, train_presence

    try:
        df = _split_manifest(manifest)
        for name in ("train", "val"):  # a blank split column was blamed on missing no_cervix photos (an audit)
            if not (df["split"] == name).any():
                _fail(f"{manifest}: no row in the {name} split (the head trains on train and takes its threshold on "
                      "val); run `cervixqc split` first")
        note, extra = trained_on(manifest), None
        if extra_manifest is not None:
            extra = load_manifest(extra_manifest)
            if "split" not in extra.columns:
                _fail(f"{extra_manifest} has no split column: run `cervixqc split` first")
            extra = extra[extra["split"] == "train"]
            note["extra_manifest"] = f"{extra_manifest} (train rows only, weight {extra_weight})"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        chosen = {"colour_weight": colour_weight, "zoom_copies": zoom_copies, "zoom_weight": zoom_weight,
                  "turn_copies": turn_copies, "turn_weight": turn_weight}
        cfg = PresenceTrainConfig(out_dir=out, c_hist=c_hist, c_feat=c_feat, extra_weight=extra_weight,
                                  **{k: v for k, v in chosen.items() if v is not None})
        card = train_presence(cfg, detector, df[df["split"] == "train"], df[df["split"] == "val"], device, note,
                              extra)
    except WeightsIntegrityError as e:  # what the header check before cannot see: a file torch cannot load
        _fail(f"--detector: {e}")
    except (ManifestError, ValueError) as e:
        _fail(str(e))
    from models.io import load_card

    metrics = load_card(card).metrics  # what the fit is worth, said where it ends
    val, left_out = metrics["val"], [k for k in metrics["new_source"] if not k.startswith("pooled_")]
    typer.echo(f"exported {card}\nvalidation: cervix found {val['cervix_found']:.3f} of {val['n_cervix']}, "
               f"no_cervix called {val['no_cervix_called']:.3f} of {val['n_no_cervix']}, "
               f"ROC AUC {val['roc_auc']:.3f}\n"
               + (f"each source left out once: metrics.new_source on the card ({len(left_out)} sources)" if left_out
                  else "no source could be left out (one needs others with both classes to stand in for it): "
                       "the card's metrics.new_source is empty, so nothing says how the head fares at a new site"))
