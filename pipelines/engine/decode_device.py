"""JPEG decoding with `torchvision.io.decode_jpeg` on the engine's device (nvJPEG on CUDA).

Why a path of its own rather than one call: the batched call fails the whole list when one
JPEG is bad; nvJPEG knows nothing of our size limits, EXIF orientation or CMYK; and it
decodes at full size, where PIL can use DCT scaling. So every file first passes the same
header checks as the PIL path (`read_header`: limits, format, mode, orientation), only RGB or
grayscale JPEGs go to the device, a failed batch is retried one image at a time, and what
still fails is decoded by PIL, which either succeeds or gives the row its reason. The result
is the same `Decoded` as the PIL path, on the device, downscaled (antialiased) to the long
side the engine asked for.

On CPU this path works too (tests run it there) but is slower than PIL's DCT-scaled decode;
it is meant for CUDA, where decoding moves off the two host cores that otherwise limit the
engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.engine.decode import (DecodeError, Decoded, DecodeLimits, Header, as_result, decode, draft_factor,
                                     read_header)

DEVICE_MODES = ("RGB", "L")  # nvJPEG has no CMYK/YCCK; those go through PIL


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation 1-8 on a CHW tensor, as PIL's `ImageOps.exif_transpose` does it."""
    hw = (-2, -1)
    ops: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
        1: lambda t: t,
        2: lambda t: t.flip(-1),
        3: lambda t: t.flip(hw),
        4: lambda t: t.flip(-2),
        5: lambda t: t.transpose(-2, -1),
        6: lambda t: torch.rot90(t, -1, hw),
        7: lambda t: t.transpose(-2, -1).flip(hw),
        8: lambda t: torch.rot90(t, 1, hw),
    }
    return ops.get(orientation, ops[1])(image).contiguous()


def _finish(image: torch.Tensor, header: Header, min_long_side: int | None) -> Decoded:
    """Turned, and reduced to the size PIL's DCT-scaled decode gives the same JPEG
    (`draft_factor`; resized to exactly `min_long_side`, a photo's presence score moved by up
    to 0.46 and its blur finding by 0.2 between the two decoders) by averaging k x k blocks,
    as `Image.reduce` reduces every other format on the CPU. An antialiased bilinear resize
    was 0.88 grey levels from PIL's DCT-scaled decode on average, block averages are 0.24 (60
    real photos at 1600 px); under it a photo went no_cervix on one decoder and not the other,
    and another's box moved 130 px (an audit, 534 real photos at 1600 px)."""
    image = apply_orientation(image, header.orientation)
    full_w, full_h = header.display_size
    k = draft_factor(full_w, full_h, min_long_side)
    if k > 1:  # ceil_mode: the last, partial blocks are averaged over their own pixels, as reduce does
        image = F.avg_pool2d(image[None].float(), k, k, ceil_mode=True)[0].round_().to(torch.uint8)
    return Decoded(image, full_w, full_h, header.sha256)


def ends_whole(data: bytes | DecodeError) -> bool:
    """Whether a JPEG stream ends with its end-of-image marker. nvJPEG decodes a JPEG cut in
    half without an error (the missing rows grey; seen on an H200, torchvision 0.26), where PIL
    and libjpeg refuse it: a stream that does not end whole goes to PIL, which either reads it
    (a camera's bytes after the marker) or gives the row its reason."""
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[-2:]) == b"\xff\xd9"


def decodes_on(device: torch.device) -> bool:
    """Whether `decode_jpeg` decodes on `device` at all: a torchvision built without nvJPEG, or a
    device it cannot use, raises for every JPEG. Where the engine picks the device decoder
    itself (`jpeg_decoder` auto) it asks once, at start, and uses PIL if not: otherwise every
    photo would fail on the device, be retried alone and then go to PIL, on every batch, unsaid."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 110)).save(buf, "JPEG")
    try:
        image = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), device=device)
    except (RuntimeError, ValueError, AssertionError):  # no nvJPEG; no CUDA (torch's lazy init asserts)
        return False
    return tuple(image.shape) == (3, 16, 16)


def decode_on_device(datas: Sequence[bytes | DecodeError], device: torch.device, pool: Executor,
                     limits: DecodeLimits = DecodeLimits(), min_long_side: int | None = None
                     ) -> list[Decoded | DecodeError]:
    """Bytes (or an error already found while reading them) -> one `Decoded` or `DecodeError`
    per input, in order. Header checks and the PIL fallback run in `pool`."""

    header = as_result(lambda data: read_header(data, limits))
    pil = as_result(lambda data: decode(data, limits, min_long_side))

    headers = list(pool.map(lambda d: d if isinstance(d, DecodeError) else header(d), datas))
    out: list[Decoded | DecodeError | None] = [h if isinstance(h, DecodeError) else None for h in headers]
    on_device = [i for i, h in enumerate(headers)
                 if isinstance(h, Header) and h.format == "JPEG" and h.mode in DEVICE_MODES and ends_whole(datas[i])]
    if on_device:
        encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in on_device]  # type: ignore[arg-type]
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole batch: retry one by one
            images = []
            for e in encoded:
                try:
                    images.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
        for i, image in zip(on_device, images):
            if image is not None:
                out[i] = _finish(image, headers[i], min_long_side)  # type: ignore[arg-type]
    rest = [i for i, r in enumerate(out) if r is None]
    for i, r in zip(rest, pool.map(pil, [datas[i] for i in rest])):  # type: ignore[misc]
        out[i] = r
    return out  # type: ignore[return-value]
