"""Per-image keys for duplicate finding: a perceptual hash of the whole photo, the same hash of
the cervix crop, and a short embedding of the crop from the classifier's pooled features.

Why three: a re-encoded or resized copy keeps the whole photo's hash; the crop's hash and
the embedding were meant for copies cropped at the edges or turned a few degrees. Measured
on the real photos (`pipelines.data.duplicates.DuplicateConfig`), neither separates such
copies from other photos of the same patient, so no threshold on them groups by default.
The whole photo's hash and the embedding do rank a cropped or turned copy among a photo's
closest few, and those few are checked with the pixels (`pipelines.data.copy_check`); the
crop's hash stays in the record (cheap: one 8x8 DCT of a crop the engine already has) for
grouping with other settings.

The hash is pHash (the 8x8 lowest frequencies of a 32x32 grey DCT, each bit above or below
their median); written here in a few lines of torch rather than taken from `imagehash`,
because it runs on the engine's batched 32 px crops (no PIL round trip per image) and the
bits must not depend on a library's resampling choices.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import torch

from pipelines.engine.crops import band_weights, box_weights, weigh_rows

HASH_SIDE = 32  # grey side the DCT sees
LOW = 8  # 8x8 lowest frequencies -> 64 bits
EMBEDDING_DIM = 64
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _dct_matrix(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.float()


_DCT = _dct_matrix(HASH_SIDE)


def grey(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] (any range) -> [N, H, W] luma (ITU-R 601 weights), as a weighted sum of
    the three planes into one new tensor. Measured on the 2-core CPU: torch.einsum over the
    channels (the first version) took 0.62 ms for 16 crops of 128 px, this 0.13 ms; for the
    whole-photo hash of the 300 real-mix photos, 0.62 vs 0.48 ms a photo (a plain sum, with
    a new tensor per operation, 0.67 ms). Same values to 3e-7."""
    r, g, b = rgb.float().unbind(1)
    return (r * float(_LUMA[0])).add_(g, alpha=float(_LUMA[1])).add_(b, alpha=float(_LUMA[2]))


FLAT = 1.0  # grey levels (of 255): the largest low-frequency coefficient of a picture with no structure


def phash(rgb32: torch.Tensor) -> list[str | None]:
    """[N, 3, 32, 32] crops (0..255) -> 64-bit pHash per image as 16 hex digits, or None for a
    flat picture (one colour): its bits would be rounding noise, and every blank frame of a
    collection would otherwise be a "duplicate" of every other."""
    return phash_grey(grey(rgb32.cpu()))


def phash_grey(g: torch.Tensor) -> list[str | None]:
    """`phash` of [N, 32, 32] grey pictures (0..255)."""
    g = g.cpu()
    coeffs = (_DCT @ g @ _DCT.T)[:, :LOW, :LOW].reshape(len(g), -1)
    bits = (coeffs > coeffs.median(dim=1, keepdim=True).values).numpy()
    packed = np.packbits(bits, axis=1)  # [N, 8] bytes, most significant bit first
    flat = (coeffs[:, 1:].abs().amax(1) < FLAT).tolist()
    return [None if f else row.tobytes().hex() for row, f in zip(packed, flat)]


def _bins(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """[C, H, W] `x` area-averaged to `size` equal bins along `dim` (-2 or -1; exact, as
    `band_weights` weighs them): a reshape and a mean where each bin is whole pixels, else
    the band's product (rows: `weigh_rows`, sparse on the CPU)."""
    n = x.shape[dim]
    if n % size == 0:
        return x.unflatten(dim, (size, n // size)).mean(dim)
    if dim == -2:
        return weigh_rows([band_weights(0, n, 0, n, size)], x)
    return x @ box_weights(0, n, 0, n, size).to(x.device).T


def whole_photo_hashes(images: list[torch.Tensor]) -> list[str | None]:
    """pHash of each whole photo (CHW: uint8 0..255 as decoded, or float 0..1 as the detector
    reads it, torchvision's convention) from its exact 32 px area average (`box_weights`, as
    `crop_boxes` weighs a box) and then grey: both are linear, so the order does not change
    the bits. Cheaper poolings were tried and dropped on the 106 val photos and their copies
    (`cervixqc eval-duplicates --split val`): adaptive average pooling (0.41 ms a photo)
    brought copies of one photo within 4 bits of another photo of the same patient, 37 false
    pairs where the exact average had 1.

    The axis whose length 32 divides is reduced first, by a reshape and a mean: one pass
    over the pixels, where the weight matrix's product does 32 multiply-adds a pixel. Most
    camera sizes have one such axis (640x480, 800x600, 1280x960, 512x512); measured on the
    300 real-mix photos side by side, 2-core CPU: 0.34 ms a photo, the grey photo's two
    matrix products (the version before) 0.56 ms; same bits. Where neither divides, the rows
    go first, through the sparse band product."""
    small = []
    for im in images:
        h, w = im.shape[-2:]
        first, second = (-1, -2) if w % HASH_SIDE == 0 and h % HASH_SIDE else (-2, -1)
        small.append(_bins(_bins(im.float(), first, HASH_SIDE), second, HASH_SIDE))
    if not small:
        return []
    g = grey(torch.stack(small))
    return phash_grey(g * 255 if images[0].is_floating_point() else g)


def hash_bits(hex_hashes: list[str]) -> np.ndarray:
    """16-hex-digit hashes -> uint8 [N, 8] (faiss's binary vector layout)."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hex_hashes), dtype=np.uint8).reshape(-1, 8)


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _projection(dim_in: int, dim_out: int = EMBEDDING_DIM) -> torch.Tensor:
    """A fixed random projection (seed 0): pooled features of any width -> EMBEDDING_DIM,
    cosine similarities kept up to a small distortion (Johnson-Lindenstrauss), so 10^6
    embeddings fit in 128 MB at float16 instead of 4 GB at the classifier's 2048 floats."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(dim_in, dim_out, generator=gen) / math.sqrt(dim_out)


_PROJECTIONS: dict[int, torch.Tensor] = {}


def embed(features: torch.Tensor) -> np.ndarray:
    """Pooled classifier features [N, D] -> unit-length float16 [N, EMBEDDING_DIM]."""
    d = features.shape[1]
    if d not in _PROJECTIONS:
        _PROJECTIONS[d] = _projection(d)
    z = features.float().cpu() @ _PROJECTIONS[d]
    return torch.nn.functional.normalize(z, dim=1).half().numpy()


def encode_embedding(vector: np.ndarray) -> str:
    """One float16 embedding as base64 (172 characters for 64 dims), for the result record."""
    return base64.b64encode(np.asarray(vector, dtype="<f2").tobytes()).decode("ascii")


def decode_embeddings(encoded: list[str]) -> np.ndarray:
    """Base64 embeddings -> float32 [N, EMBEDDING_DIM]."""
    raw = b"".join(base64.b64decode(e) for e in encoded)
    return np.frombuffer(raw, dtype="<f2").reshape(len(encoded), -1).astype(np.float32)
