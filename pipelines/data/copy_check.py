"""Is photo B a copy of photo A (cropped, resized, turned, re-encoded), or another photo?

Why local features and not another global key: a 10% crop moves the whole photo's hash as
far as another patient's photo (`DuplicateConfig`), and no global key we can train here
tells such a copy from other photos. A copy, though, is the same pixels moved by one
similarity transform. So a pair proposed by the global keys is checked the way a person
would: ORB keypoints matched (OpenCV), a rotation + scale + shift fitted with RANSAC, B warped
onto A, and the two compared where they overlap.

Why the comparison after alignment and not the inlier count alone: two photos of one
patient minutes apart (saline, then acetic acid, colposcope not moved) share hundreds of
keypoints (up to 426 of 500 inliers on the real val photos), as many as a copy does. What
tells them apart is the tissue itself: aligned, a copy differs from its original by JPEG
noise (~1 grey level), a later photo by whitening, moved highlights and stain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import faiss
import numpy as np


@dataclass(frozen=True)
class CopyCheckConfig:
    """Thresholds chosen on the real photos' val split (`cervixqc eval-duplicates --split val
    --sweep`), reported on test; the measured margins are in `pipelines.data.duplicates`."""

    side: int = 384  # long side (px) the keypoints are found at
    features: int = 500  # ORB keypoints per photo
    thumb: int = 160  # long side (px) of the colour thumbnail the aligned photos are compared at
    blur: float = 1.5  # Gaussian sigma (thumbnail px) before the comparison: resampling noise out
    ratio: float = 0.8  # Lowe's ratio test on the two nearest descriptors
    min_inliers: int = 40  # RANSAC inliers of the fitted similarity
    min_overlap: float = 0.5  # share of A that B covers once aligned (a 10% crop a side keeps 0.64)
    max_difference: float = 3.0  # mean abs difference (grey levels of 255) of the aligned, blurred thumbnails
    scale: tuple[float, float] = (0.2, 5.0)  # B's size next to A's
    cache: int = 1024  # photos whose features are kept (~80 KB each for a 4:3 photo)

    def __post_init__(self) -> None:
        if self.side < 64 or self.thumb < 16 or self.features < 16 or self.cache < 2:
            raise ValueError("side >= 64, thumb >= 16, features >= 16 and cache >= 2 are needed to match anything")
        if not 0 < self.ratio <= 1 or not 0 < self.min_overlap <= 1 or self.max_difference < 0:
            raise ValueError("ratio and min_overlap must be in (0, 1], max_difference >= 0")


@dataclass(frozen=True)
class PhotoFeatures:
    points: np.ndarray  # float32 [K, 2] keypoint positions, at `side`
    descriptors: np.ndarray  # uint8 [K, 32] ORB
    thumb: np.ndarray  # uint8 [h, w, 3] blurred colour thumbnail (uint8: 4x more photos in the cache)
    side_scale: float  # thumb px per `side` px


@dataclass(frozen=True)
class Verdict:
    copy: bool
    inliers: int = 0
    overlap: float = 0.0
    difference: float | None = None  # None: never aligned
    reason: str = ""


def _decode(data: bytes, side: int) -> np.ndarray | None:
    """BGR, long side `side`; the JPEG decoder's own 1/2-1/8 scaling first (cv2's reduced
    reads), so a 12 MP photo is not decoded at full size for a 384 px look. EXIF orientation
    is applied, as the engine applies it."""
    buf = np.frombuffer(data, np.uint8)
    img = None
    for flag, factor in ((cv2.IMREAD_REDUCED_COLOR_8, 8), (cv2.IMREAD_REDUCED_COLOR_4, 4),
                         (cv2.IMREAD_REDUCED_COLOR_2, 2), (cv2.IMREAD_COLOR, 1)):
        if factor > 1:
            shape = _jpeg_size(data)
            if shape is None or max(shape) // factor < side:
                continue
        img = cv2.imdecode(buf, flag)
        break
    if img is None or img.ndim != 3 or min(img.shape[:2]) < 8:
        return None
    h, w = img.shape[:2]
    s = side / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header; None for anything else (decoded at full
    size then)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + length
    return None


_ORB: dict[int, cv2.ORB] = {}


def features(data: bytes, cfg: CopyCheckConfig = CopyCheckConfig()) -> PhotoFeatures | None:
    """Keypoints and a thumbnail of one encoded photo; None when it cannot be decoded."""
    img = _decode(data, cfg.side)
    if img is None:
        return None
    orb = _ORB.setdefault(cfg.features, cv2.ORB_create(nfeatures=cfg.features, fastThreshold=10))
    kp, des = orb.detectAndCompute(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), None)
    h, w = img.shape[:2]
    t = min(1.0, cfg.thumb / max(h, w))
    small = cv2.resize(img, (max(1, round(w * t)), max(1, round(h * t))), interpolation=cv2.INTER_AREA)
    points = np.float32([k.pt for k in kp]).reshape(-1, 2)
    return PhotoFeatures(points, des if des is not None else np.zeros((0, 32), np.uint8),
                         cv2.GaussianBlur(small, (0, 0), cfg.blur), t)


def compare(a: PhotoFeatures, b: PhotoFeatures, cfg: CopyCheckConfig = CopyCheckConfig()) -> Verdict:
    """Whether B is a copy of A: matched keypoints, one similarity transform, then the
    aligned thumbnails compared. Cheap rejections first (most proposed pairs are two
    different photos with a handful of chance matches)."""
    if len(a.descriptors) < 8 or len(b.descriptors) < 8:
        return Verdict(False, reason="too few keypoints")
    src, dst = _matches(a, b, cfg.ratio)
    if len(src) < cfg.min_inliers:
        return Verdict(False, inliers=len(src), reason="too few matches")
    m, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0, maxIters=2000)
    inliers = int(mask.sum()) if mask is not None else 0
    if m is None or inliers < cfg.min_inliers:
        return Verdict(False, inliers=inliers, reason="no transform")
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if not cfg.scale[0] <= scale <= cfg.scale[1]:
        return Verdict(False, inliers=inliers, reason="implausible scale")
    overlap, difference = _aligned_difference(a, b, m)
    copy = overlap >= cfg.min_overlap and difference <= cfg.max_difference
    return Verdict(copy, inliers, overlap, difference, "" if copy else "differs once aligned")


def _matches(a: PhotoFeatures, b: PhotoFeatures, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """B's keypoints whose nearest descriptor in A passes Lowe's ratio test, and those
    nearest: (B points, A points). faiss's flat binary search rather than OpenCV's BFMatcher,
    because this is most of the check's time: 0.35 ms against 1.08 ms a pair of 500
    descriptors (60 real photos, 1,000 pairs, one thread)."""
    index = faiss.IndexBinaryFlat(a.descriptors.shape[1] * 8)
    index.add(a.descriptors)
    dist, ids = index.search(b.descriptors, 2)
    good = (ids[:, 1] >= 0) & (dist[:, 0] < ratio * dist[:, 1])
    return b.points[good], a.points[ids[good, 0]]


def _aligned_difference(a: PhotoFeatures, b: PhotoFeatures, m: np.ndarray) -> tuple[float, float]:
    """B's thumbnail warped onto A's by `m` (fitted between keypoints at `side`): the share of
    A covered, and the mean absolute difference there. The overlap is eroded by 2 px so
    interpolated borders (a turned copy's black corners) do not count. The finer thumbnail is
    warped onto the coarser one, never the other way: blown up, a thumbnail is blurrier than
    the one it is compared with (a cropped copy's thumbnail sees a smaller field at the same
    160 px), which read 3.8 grey levels on a copy that reads 2.1 the right way round."""
    t = m.astype(np.float64).copy()
    t[:, :2] *= a.side_scale / b.side_scale  # B's thumb px -> B's side px -> A's side px -> A's thumb px
    t[:, 2] *= a.side_scale
    if abs(np.linalg.det(t[:, :2])) > 1.0:
        t, a, b = cv2.invertAffineTransform(t), b, a
    h, w = a.thumb.shape[:2]
    warped = cv2.warpAffine(b.thumb.astype(np.float32), t, (w, h), flags=cv2.INTER_LINEAR)
    ones = np.full(b.thumb.shape[:2], 255, np.uint8)
    cover = cv2.warpAffine(ones, t, (w, h), flags=cv2.INTER_NEAREST)
    cover = cv2.erode(cover, np.ones((5, 5), np.uint8)) > 0
    overlap = float(cover.mean())
    if not cover.any():
        return overlap, float("inf")
    return overlap, float(np.abs(warped[cover] - a.thumb[cover].astype(np.float32)).mean())


class CopyChecker:
    """Verdicts for pairs of a collection's photos, read through `read(path) -> bytes`.
    Features are kept for the last `cfg.cache` photos: the pairs come sorted by their first
    photo, so that one is decoded once; the second is decoded again when it has left the
    cache, which in a collection much larger than the cache is most pairs. A photo that cannot be read is no copy of
    anything (the engine has already reported it)."""

    def __init__(self, read: Callable[[str], bytes], cfg: CopyCheckConfig = CopyCheckConfig()):
        self.read, self.cfg = read, cfg
        self._features: OrderedDict[str, PhotoFeatures | None] = OrderedDict()
        self.photos_read = 0  # decodes, cache misses included: the check's main cost

    def _get(self, path: str) -> PhotoFeatures | None:
        if path in self._features:
            self._features.move_to_end(path)
            return self._features[path]
        self.photos_read += 1
        try:
            f = features(self.read(path), self.cfg)
        except (OSError, ValueError):
            f = None
        self._features[path] = f
        if len(self._features) > self.cfg.cache:
            self._features.popitem(last=False)
        return f

    def __call__(self, a: str, b: str) -> Verdict:
        fa, fb = self._get(a), self._get(b)
        if fa is None or fb is None:
            return Verdict(False, reason="unreadable")
        return compare(fa, fb, self.cfg)
