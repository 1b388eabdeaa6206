"""Decoding image files for training and evaluation: EXIF orientation, RGB, and JPEG DCT
scaling (Pillow's draft mode) so a 12 MP photo is never fully decoded to feed a 512 px model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.engine.decode import exif_orientation, to_rgb, upright


def load_rgb(path: str | Path, min_long_side: int | None = None) -> tuple[torch.Tensor, float, float]:
    """(uint8 CHW tensor, sx, sy): scale factors from the displayed full-size image to it.

    With `min_long_side`, JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    the long side at least that big. A file that does not decode is a ValueError naming it: a
    truncated training photo was a 200-line traceback naming none, hours into a run when it
    came from the extra collection, drawn anew each epoch.
    """
    try:
        return _load_rgb(path, min_long_side)
    except _PIL_ERRORS as e:
        raise _unreadable(path, e) from None


_PIL_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)  # PIL's errors for bad files


def _unreadable(path: str | Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: cannot read it as an image ({type(e).__name__}: {e}); fix or replace the file, or "
                      "take it out of the manifest and boxes")


def stored_long_side(path: str | Path) -> int:
    """The long side as stored, from the header alone; a bad file is `load_rgb`'s ValueError
    (PIL's "cannot identify image file" reached a training command's user with no fix named)."""
    try:
        with Image.open(path) as im:
            return max(im.size)
    except _PIL_ERRORS as e:
        raise _unreadable(path, e) from None


def _load_rgb(path: str | Path, min_long_side: int | None) -> tuple[torch.Tensor, float, float]:
    with Image.open(path) as im:
        orientation = exif_orientation(im)
        full_w, full_h = _displayed(im, orientation)
        if min_long_side is not None and im.format in ("JPEG", "MPO"):  # MPO: phones' JPEGs with a second image
            f = min_long_side / max(im.size)
            if f < 1:
                im.draft("RGB", (max(1, int(im.size[0] * f)), max(1, int(im.size[1] * f))))
        # the engine's conversion: PIL's own turned a 16-bit PNG white and dropped alpha onto
        # whatever the transparent pixels held, so training saw other pixels than inference
        im = to_rgb(upright(im, orientation))
        arr = np.asarray(im)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return t, t.shape[2] / full_w, t.shape[1] / full_h


def _displayed(im: Image.Image, orientation: int) -> tuple[int, int]:
    """Width and height as displayed (EXIF orientations 5-8 turn the photo), from the header,
    by the engine's rule (a TIFF's size is reported turned already: turned again, its boxes
    were scaled 0.75 x 1.33, an audit)."""
    w, h = im.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def displayed_size(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return _displayed(im, exif_orientation(im))
