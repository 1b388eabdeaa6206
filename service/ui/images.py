"""The pictures the review pages show: a job item's file, re-encoded as a JPEG at a bounded
size, made once and cached under STATE_DIR/thumbs/<job>/.

Only items of known jobs are served, named by their row id, never by a path from the
client; the file is checked against the data roots again (it may have become a link that
leaves them since the job ran). The picture is EXIF-oriented like the engine's decode, so the
stored box (in displayed pixels) lines up; browsers cannot show TIFF or 16-bit PNG, hence the
re-encode rather than the original bytes.
"""

from __future__ import annotations

import errno
import io
from pathlib import Path

from PIL import Image

from pipelines.data.opened import Allowed
from pipelines.engine.decode import DecodeError, DecodeLimits, decode, read_file
from pipelines.outputs import write_atomically

SIZES = {"thumb": 320, "full": 1600}
UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # full, read-only, not ours


class NotShown(Exception):
    """The item has no picture to show (gone, outside the roots, or not an image)."""


def render(original: Path, long_side: int, limits: DecodeLimits, allowed: Allowed | None = None) -> bytes:
    """The engine's own decode (same limits, EXIF orientation, 16-bit and alpha handling; JPEGs
    DCT-scaled to about `long_side`), then a JPEG at most `long_side` px on its long side.
    `allowed`: the data roots, checked on the file opened (NotAllowed)."""
    try:
        decoded = decode(read_file(original, limits, allowed), limits, min_long_side=long_side)
    except DecodeError as e:
        raise NotShown(f"not an image the pages can show: {e}") from None
    rgb = Image.fromarray(decoded.image.permute(1, 2, 0).numpy())
    rgb.thumbnail((long_side, long_side))
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=85)
    return out.getvalue()


def cached(cache_dir: Path, job_id: str, item: int, size: str, original: Path, limits: DecodeLimits,
           allowed: Allowed | None = None) -> Path | bytes:
    """The cached picture's file, or the picture itself where the cache cannot take it (a full
    or read-only state folder answered every new thumbnail with a 500). `allowed`: as `render`."""
    target = cache_dir / job_id / f"{item}-{size}.jpg"
    if not original.is_file():  # checked first: a deleted photo's cached picture was still served
        raise NotShown("the file is no longer there")
    if target.is_file():
        return target
    data = render(original, SIZES[size], limits, allowed)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file of this request's own (named by the process alone, two requests in the
        # route's thread pool wrote one, and one served the other's half-written picture or a 500)
        return write_atomically(target, lambda tmp: tmp.write_bytes(data), durable=False)  # drawn again if lost
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise  # its folder removed under it, say: the job was deleted (the route answers 404)
        return data
