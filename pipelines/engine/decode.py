"""Turning untrusted bytes into an RGB tensor, or a clear reason why not.

Every failure is a `DecodeError` with a short reason that goes into the result row: nothing
here may crash a batch. Pixel counts are checked from the header before any decoding, so a
20000x20000 "decompression bomb" costs a header read, not 1.2 GB. JPEGs decode at the
smallest DCT scale (1/2, 1/4, 1/8) that still gives the stage what it needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipelines.data.opened import Allowed, NotRegular, open_regular

T = TypeVar("T")
R = TypeVar("R")
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit below, with a readable reason


class DecodeError(ValueError):
    """An input that cannot be used; `reason` is safe to show and to store."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def as_result(fn: Callable[[T], R]) -> Callable[[T], R | DecodeError]:
    """`fn` that returns its DecodeError instead of raising it (an unreadable file, OSError,
    becomes one too): what a batch needs so that one bad input is one row, not a crash."""

    def run(item: T) -> R | DecodeError:
        try:
            return fn(item)
        except DecodeError as e:
            return e
        except OSError as e:
            return unreadable(e)

    return run


def unreadable(e: OSError) -> DecodeError:
    """A file the OS could not read, as its row says it (a job retries the rows saying so)."""
    return DecodeError(f"cannot read file ({e.strerror or type(e).__name__})")


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 100_000_000  # 100 MP: larger than any clinic camera
    min_side: int = 16
    # long side over short side: no camera frames a cervix at 20:1, and past some 600:1 the
    # detector's resize leaves the short side 0 px and fails the whole batch
    max_aspect: float = 20.0


@dataclass
class Decoded:
    image: torch.Tensor  # uint8 CHW RGB at the decode scale
    width: int  # displayed full-resolution size (after EXIF orientation)
    height: int
    sha256: str

    @property
    def scale(self) -> tuple[float, float]:
        return self.image.shape[2] / self.width, self.image.shape[1] / self.height


def _grey8(im: Image.Image) -> Image.Image:
    """16-bit (or 12-bit in 16) grey down to 8 bits, shifted by the image's own brightest pixel.
    16-bit modes are shifted in place in one uint16 copy: as uint32 with a copy per step, a
    100 MP 16-bit TIFF took 1.3 GB more to decode (two in the decode pool: 4.6 GB peak RSS)."""
    if im.mode.startswith("I;16"):
        arr = np.array(im)  # a writable uint16 copy
        shift = max(0, max(int(arr.max()), 1).bit_length() - 8)
        np.right_shift(arr, shift, out=arr)
        np.minimum(arr, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8), "L")
    arr = np.asarray(im, dtype=np.uint32)  # "I": 32-bit integers, rare; as before
    top = max(int(arr.max()), 1)
    shift = max(0, top.bit_length() - 8)
    return Image.fromarray((arr >> shift).clip(0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB as the engine reads it (training decodes through it too)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _grey8(im).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6) * 255
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def draft_factor(width: int, height: int, min_long_side: int | None) -> int:
    """The whole factor (1, 2, 4 or 8) a JPEG is decoded smaller by for `min_long_side`: the
    scale Pillow's `draft` picks for the size `decode` asks it for (JpegImagePlugin.draft). Every
    other format and the device decoder reduce by the same factor, so that one photo's pixels
    reach the models at one size whatever its file format: a PNG was reduced by
    long // min_long_side (2500 px to 833, its JPEG to 1250), and the same pixels as PNG got
    another box crop, scores and, near the detector's threshold, another label."""
    if min_long_side is None or max(width, height) <= min_long_side:
        return 1
    f = min_long_side / max(width, height)
    scale = min(width // max(1, int(width * f)), height // max(1, int(height * f)))
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _reducible(im: Image.Image) -> Image.Image:
    """`im` in a mode `Image.reduce` takes (it refuses palette, 1-bit and 16-bit ones), as
    `to_rgb` would read it."""
    if im.mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode == "PA":  # reduced as raw palette indices it came out black: no_cervix (an audit)
        return im.convert("RGBA")
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I;16"):  # shifted at full size, as before the reduction: its brightness unchanged
        return _grey8(im)
    return im


@dataclass(frozen=True)
class Header:
    """What the header says, read before any pixel is decoded."""

    format: str | None
    mode: str
    stored_width: int  # as stored, before EXIF orientation
    stored_height: int
    orientation: int  # EXIF 1-8
    sha256: str

    @property
    def display_size(self) -> tuple[int, int]:
        w, h = self.stored_width, self.stored_height
        return (h, w) if self.orientation in (5, 6, 7, 8) else (w, h)


ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG, from its segments before the first scan; None
    for anything else."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 < len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # not DHT, JPG, DAC
            return marker, data[i + 4] if i + 4 < len(data) else 0
        if marker == 0xDA:  # the scan: no frame header before it
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _arithmetic(data: bytes, header: Header, min_long_side: int | None) -> Decoded:
    """An arithmetic-coded JPEG through libjpeg-turbo (torchvision's CPU decoder): Pillow's
    reader fails on any larger than its buffer ("broken data stream"), and the row said
    "truncated or corrupt" of a file every other viewer shows."""
    from torchvision.io import ImageReadMode, decode_jpeg

    chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    # reduced and turned with PIL as every other photo here, not with torch's resize: a decode
    # pool thread that runs a parallel torch operation slows the engine's own thread (below)
    im = Image.fromarray(chw.permute(1, 2, 0).numpy())
    k = draft_factor(im.width, im.height, min_long_side)
    if k > 1:
        im = im.reduce(k)
    full_w, full_h = header.display_size
    return Decoded(torch.from_numpy(np.array(upright(im, header.orientation)).transpose(2, 0, 1).copy()), full_w, full_h,
                   header.sha256)


def _open(data: bytes, limits: DecodeLimits) -> tuple[Image.Image, Header]:
    """Open and check against `limits` from the header alone; the caller closes the image."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if len(data) > limits.max_bytes:
        raise DecodeError(f"file too large ({len(data)} bytes > {limits.max_bytes})")
    digest = hashlib.sha256(data).hexdigest()
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1",
                                                   b"msf1"):
            # iPhones' default: said "unrecognised format", as if the file were damaged
            raise DecodeError("HEIC/HEIF photo: not supported, convert it to JPEG") from None
        if data[128:132] == b"DICM":  # a colposcope's export to a PACS
            raise DecodeError("DICOM file: not supported, export the image as JPEG") from None
        sof = jpeg_frame(data)
        if sof is not None and sof[1] == 12:  # Pillow: "cannot handle 12-bit layers"
            raise DecodeError("12-bit JPEG: not supported, export it as an 8-bit JPEG") from None
        raise DecodeError("not an image (unrecognised format)") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, not our crash
        raise DecodeError(f"unreadable image header ({type(e).__name__})") from None
    if im.format == "EPS":  # Pillow names it, then needs Ghostscript to draw it: "truncated or corrupt" before
        im.close()
        raise DecodeError("EPS (PostScript) file: not supported, export the image as JPEG or PNG")
    w, h = im.size
    try:
        check_size(w, h, limits)
    except DecodeError:
        im.close()
        raise
    return im, Header(im.format, im.mode, w, h, exif_orientation(im), digest)


def exif_orientation(im: Image.Image) -> int:
    """The turn (EXIF 1-8) still to apply to an opened file's pixels, from its header: the
    engine and the training and box tools (`pipelines.data.images`) read it here, once.
    Pillow's TIFF reader (13, the lock's) reports the turned size and turns the pixels as it
    loads: turned again, a TIFF's width and height were swapped and its box scaled by
    (4/3, 3/4).
    A value that is not a whole number (a text "6") is no turn, as `ImageOps.exif_transpose`
    has it. Every decoder turns the pixels by this reading (`upright`, and the device
    decoder's `apply_orientation`), not by reading the header again: with `exif_transpose`, a
    text "6" turned the reported size but not the pixels (a box scaled 1.33 x 0.75) while the
    device decoder turned both (another box and score; an audit)."""
    if im.format == "TIFF":
        return 1
    try:
        if im.format == "PNG" and "exif" not in im.info:
            after_pixels = _png_exif_after_pixels(im.fp)
            if after_pixels is None:  # PngImageFile.getexif would decode the pixels to look for one
                exif = Image.Image.getexif(im)  # the text chunks' EXIF and XMP, read before the pixels
            else:
                im.info["exif"] = after_pixels
                exif = im.getexif()
        else:
            exif = im.getexif()
        orientation = exif.get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth losing the image for
        return 1
    return orientation if type(orientation) is int and 1 <= orientation <= 8 else 1


def _png_exif_after_pixels(fp) -> bytes | None:
    """A PNG's eXIf chunk, found by walking the chunk headers from the file's start. Pillow
    reaches an eXIf behind the pixel data only by decoding the
    whole image: `read_header` of a 100 MP PNG took 1.7-2.9 s, as long as a full decode, and
    `decode` decoded it before taking its costly-decode turn, so two such PNGs decoded at once
    (+830 MiB where one at a time takes +470; an audit). The walk reads 8 bytes a chunk."""
    pos = fp.tell()
    try:
        fp.seek(8)
        while len(head := fp.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return fp.read(length)
            if kind == b"IEND":
                return None
            fp.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
        return None
    finally:
        fp.seek(pos)


# ImageOps.exif_transpose's table: EXIF orientation -> the transpose that makes it upright
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


def upright(im: Image.Image, orientation: int) -> Image.Image:
    """`im` turned by `orientation` as `exif_orientation` read it from the file (see there why
    not `ImageOps.exif_transpose`); `im` itself where there is no turn."""
    turn = _TURNS.get(orientation)
    return im if turn is None else im.transpose(turn)


def as_displayed(im: Image.Image) -> Image.Image:
    """An opened file's pixels turned as it is displayed: `upright` by its own header's turn."""
    return upright(im, exif_orientation(im))


def check_size(w: int, h: int, limits: DecodeLimits) -> None:
    """A DecodeError for a size the engine cannot judge, from a file's header or an array's
    shape (an array skipped it: a 1x1000 sliver failed its whole batch, an empty one divided
    by zero; an audit)."""
    if w * h > limits.max_pixels:
        # in whole pixels: rounded to MP, 10001x10000 read "100 MP > 100 MP" (an audit)
        raise DecodeError(f"too many pixels ({w}x{h} = {w * h:,} > {limits.max_pixels:,})")
    if min(w, h) < limits.min_side:
        raise DecodeError(f"image too small ({w}x{h})")
    if max(w, h) > limits.max_aspect * min(w, h):
        raise DecodeError(f"aspect ratio too extreme ({w}x{h}: more than {limits.max_aspect:g}:1)")


def read_header(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Header:
    """The header checks of `decode` without decoding (for decoders other than PIL)."""
    im, header = _open(data, limits)
    im.close()
    return header


def read_file(path: str | Path, limits: DecodeLimits = DecodeLimits(),
              allowed: Allowed | None = None) -> bytes:
    """A file's bytes, refused before they are read where `decode` would refuse them anyway:
    a FIFO or a device in a cleaned folder blocked the reader forever, and a 3 GB file was read
    whole (and held, a batch at a time) before its size was checked. `allowed`: as in
    `pipelines.data.opened.open_regular` (NotAllowed)."""
    try:
        f, st = open_regular(path, allowed)
    except NotRegular as e:
        raise DecodeError(str(e)) from None
    with f:
        if st.st_size > limits.max_bytes:
            raise DecodeError(f"file too large ({st.st_size} bytes > {limits.max_bytes})")
        data = f.read(limits.max_bytes + 1)  # it may have grown since the stat
    if len(data) > limits.max_bytes:
        raise DecodeError(f"file too large (more than {limits.max_bytes} bytes)")
    return data


# Photos over this many pixels that are decoded at full size (every format but a baseline
# JPEG, which libjpeg decodes reduced) take the process's one costly-decode turn: the engine
# decodes two photos at a time, and two 100 MP PNGs or 16-bit TIFFs together added their
# full-size copies (a service under 32 clients peaked at 4.6 GB). Nothing clinical is that large.
COSTLY_PIXELS = 24_000_000
_costly_turn = threading.Lock()


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl and macOS
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _give_back_freed_memory() -> None:
    """After a costly decode, the freed full-size copies back to the system: glibc keeps freed
    heap for the process, so a service stayed at its peak (1.5-2.3 GB idle after big uploads)
    and a small PC's other programs had it no more. Two 100 MP PNGs and two 100 MP 16-bit TIFFs
    decoded in two threads: VmRSS 601-622 MiB after them, 953-981 without the trim (556 before
    them). A few ms each."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def decode(data: bytes, limits: DecodeLimits = DecodeLimits(), min_long_side: int | None = None) -> Decoded:
    """Decode at the smallest scale whose long side is >= `min_long_side` (None: full size)."""
    im, header = _open(data, limits)
    with im:
        w, h = im.size
        full_w, full_h = header.display_size
        # MPO: a phone's JPEG with a second (depth or preview) image, which Pillow names so;
        # its first image is a JPEG like any other (it was decoded at 16x the pixels)
        jpeg = im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L", "CMYK", "YCbCr")
        costly = w * h > COSTLY_PIXELS and not (jpeg and not im.info.get("progressive"))
        with _costly_turn if costly else contextlib.nullcontext():
            rgb = _pixels(im, data, header, jpeg, min_long_side)
    if costly:  # the image core first: leaving `with`, Pillow closes the file, not the pixels
        im.close()
        _give_back_freed_memory()
    if isinstance(rgb, Decoded):  # an arithmetic-coded JPEG, decoded by libjpeg-turbo
        return rgb
    # CHW in numpy, not torch: decode runs in the engine's pool threads, and a thread that
    # has run one of torch's parallel operations keeps its own OpenMP team alive; while such a
    # pool lived, every torch operation of the engine's own thread ran at about half speed
    # (the whole-photo hash of the 300 real-mix photos: 0.10 s before any decode, 0.20-0.22 s
    # after; with this copy in numpy, 0.09-0.10 s).
    t = torch.from_numpy(np.array(rgb).transpose(2, 0, 1).copy())
    return Decoded(t, full_w, full_h, header.sha256)


def _pixels(im: Image.Image, data: bytes, header: Header, jpeg: bool,
            min_long_side: int | None) -> Image.Image | Decoded:
    """`im`'s first frame as 8-bit RGB, upright, reduced for `min_long_side`."""
    w, h = im.size
    try:
        if min_long_side is not None and jpeg:
            f = min_long_side / max(w, h)
            if f < 1:
                im.draft(im.mode, (max(1, int(w * f)), max(1, int(h * f))))
        im.seek(0)  # multi-frame files (TIFF pages, GIF frames): the first frame
        im.load()
        small: Image.Image = im
        factor = 1 if jpeg else draft_factor(w, h, min_long_side)
        if factor > 1:
            # other formats have no DCT scaling: reduced here (box filter) by the factor a JPEG
            # of this size is drafted by, so the engine's float copies are of this size; a
            # 10000x10000 PNG under the pixel limit took 3.5 GB of RSS at full size. Reduced
            # before it is turned and made RGB: each of those is a full-size copy, and a 100 MP
            # RGBA PNG (418 KB) took 2.3 GB more to decode, 4 of them in a batch 5.4 GB
            small = _reducible(im).reduce(factor)
        rgb = to_rgb(upright(small, header.orientation))
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        frame = jpeg_frame(data) if jpeg else None
        if frame is not None and frame[0] in ARITHMETIC_SOF:
            try:
                return _arithmetic(data, header, min_long_side)
            except Exception:  # noqa: BLE001 - a damaged one: the reason below
                pass
        raise DecodeError(f"truncated or corrupt image data ({type(e).__name__})") from None
    return rgb
