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

import hashlib
import json
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Protocol

import cv2
import faiss
import numpy as np

from pipelines.engine.decode import decode


@dataclass(frozen=True)
class CopyCheckConfig:
    """Thresholds chosen on the real photos' val split (the `aligned_distances` of
    `cervixqc eval-duplicates --split val`), reported on test; the measured margins are in
    `pipelines.data.duplicates.DuplicateConfig`."""

    side: int = 384  # long side (px) the keypoints are found at
    features: int = 500  # ORB keypoints per photo
    thumb: int = 160  # long side (px) of the colour thumbnail the aligned photos are compared at
    blur: float = 1.5  # Gaussian sigma (thumbnail px) before the comparison: resampling noise out
    ratio: float = 0.8  # Lowe's ratio test on the two nearest descriptors
    min_inliers: int = 40  # RANSAC inliers of the fitted similarity
    min_overlap: float = 0.5  # share of A that B covers once aligned (a 10% crop a side keeps 0.64)
    max_difference: float = 3.0  # mean abs difference (grey levels of 255) of the aligned, blurred thumbnails
    scale: tuple[float, float] = (0.2, 5.0)  # B's size next to A's
    in_memory: int = 4096  # photos whose keypoints stay in RAM (20 KB each, 80 MB); more go to a temporary file
    thumbs: int = 256  # photos whose thumbnail (~60 KB) is kept for the pairs that align

    def __post_init__(self) -> None:
        if self.side < 64 or self.thumb < 16 or self.features < 16 or self.thumbs < 2 or self.in_memory < 0:
            raise ValueError("side >= 64, thumb >= 16, features >= 16, thumbs >= 2 and in_memory >= 0 are needed")
        if not 0 < self.ratio <= 1 or not 0 < self.min_overlap <= 1 or self.max_difference < 0:
            raise ValueError("ratio and min_overlap must be in (0, 1], max_difference >= 0")


# Raised whenever the check's algorithm changes what it calls a copy: stored verdicts
# (`VerdictStore`) of an older version are then not reused.
CHECK_VERSION = 1


def verdict_setting(cfg: CopyCheckConfig) -> str:
    """What a stored verdict was reached under: the check's version and the thresholds that
    decide it (not the memory settings, which change nothing it says)."""
    deciding = {k: v for k, v in asdict(cfg).items() if k not in ("in_memory", "thumbs")}
    return hashlib.sha256(json.dumps([CHECK_VERSION, deciding], sort_keys=True).encode()).hexdigest()[:16]


class VerdictStore(Protocol):
    """Pixel-check verdicts kept between runs, by the two photos' sha256 (in the order checked) and the
    `verdict_setting` they were reached under: a rerun of a collection checks only the pairs
    that touch photos new since (`clean` keeps them in its state). Without it, every rerun
    and resume decoded the whole collection again: 11 of a no-op rerun's 17 s on 2,000
    photos, about 9 minutes at 10^5."""

    def verdicts(self, pairs: list[tuple[str, str]], setting: str) -> dict[tuple[str, str], bool]: ...

    def add_verdicts(self, verdicts: Mapping[tuple[str, str], bool], setting: str, unread: int = 0) -> None:
        """`unread`: pairs checked this time without a verdict (a photo could not be read)."""


@dataclass(frozen=True)
class Keypoints:
    points: np.ndarray  # float32 [K, 2] positions, at `side`
    descriptors: np.ndarray  # uint8 [K, 32] ORB


@dataclass(frozen=True)
class Thumb:
    pixels: np.ndarray  # uint8 [h, w, 3] blurred colour thumbnail
    scale: float  # thumbnail px per `side` px


@dataclass(frozen=True)
class PhotoFeatures:
    keypoints: Keypoints
    thumb: Thumb


@dataclass(frozen=True)
class Verdict:
    copy: bool
    inliers: int = 0
    overlap: float = 0.0
    difference: float | None = None  # None: never aligned
    reason: str = ""


def _decode(data: bytes, side: int) -> np.ndarray:
    """RGB uint8 [h, w, 3], long side `side`, through the engine's own decoder (its header
    limits, EXIF orientation, 16-bit/CMYK/palette handling, and the JPEG decoder's DCT
    scaling to the smallest scale at or above `side`), then an area resize. A file it
    refuses raises DecodeError, a ValueError."""
    img = np.ascontiguousarray(decode(data, min_long_side=side).image.permute(1, 2, 0).numpy())
    h, w = img.shape[:2]
    s = side / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


_local = threading.local()  # one ORB per thread: `CopyChecker.prepare` decodes on several


def _orb(n: int) -> cv2.ORB:
    if getattr(_local, "n", None) != n:
        _local.orb, _local.n = cv2.ORB_create(nfeatures=n, fastThreshold=10), n
    return _local.orb


def features(data: bytes, cfg: CopyCheckConfig = CopyCheckConfig()) -> PhotoFeatures:
    """Keypoints and a thumbnail of one encoded photo (DecodeError, a ValueError, when it
    cannot be decoded)."""
    img = _decode(data, cfg.side)
    kp, des = _orb(cfg.features).detectAndCompute(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), None)
    h, w = img.shape[:2]
    t = min(1.0, cfg.thumb / max(h, w))
    small = cv2.resize(img, (max(1, round(w * t)), max(1, round(h * t))), interpolation=cv2.INTER_AREA)
    points = np.float32([k.pt for k in kp]).reshape(-1, 2)
    return PhotoFeatures(Keypoints(points, des if des is not None else np.zeros((0, 32), np.uint8)),
                         Thumb(cv2.GaussianBlur(small, (0, 0), cfg.blur), t))


def compare(a: PhotoFeatures, b: PhotoFeatures, cfg: CopyCheckConfig = CopyCheckConfig()) -> Verdict:
    """Whether B is a copy of A: matched keypoints, one similarity transform, then the
    aligned thumbnails compared."""
    m, verdict = fit(a.keypoints, b.keypoints, cfg)
    return verdict if m is None else judge(a.thumb, b.thumb, m, verdict.inliers, cfg)


def fit(a: Keypoints, b: Keypoints, cfg: CopyCheckConfig = CopyCheckConfig()) -> tuple[np.ndarray | None, Verdict]:
    """The similarity taking B's keypoints onto A's (None with the reason when there is
    none). Cheap rejections first: most proposed pairs are two different photos with a
    handful of chance matches, and never need their thumbnails."""
    if len(a.descriptors) < 8 or len(b.descriptors) < 8:
        return None, Verdict(False, reason="too few keypoints")
    src, dst = _matches(a, b, cfg.ratio)
    if len(src) < cfg.min_inliers:
        return None, Verdict(False, inliers=len(src), reason="too few matches")
    m, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0, maxIters=2000)
    inliers = int(mask.sum()) if mask is not None else 0
    if m is None or inliers < cfg.min_inliers:
        return None, Verdict(False, inliers=inliers, reason="no transform")
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if not cfg.scale[0] <= scale <= cfg.scale[1]:
        return None, Verdict(False, inliers=inliers, reason="implausible scale")
    return m, Verdict(False, inliers=inliers)


def judge(a: Thumb, b: Thumb, m: np.ndarray, inliers: int, cfg: CopyCheckConfig = CopyCheckConfig()) -> Verdict:
    """The verdict on an aligned pair, from its thumbnails."""
    overlap, difference = _aligned_difference(a, b, m)
    copy = overlap >= cfg.min_overlap and difference <= cfg.max_difference
    return Verdict(copy, inliers, overlap, difference, "" if copy else "differs once aligned")


def _matches(a: Keypoints, b: Keypoints, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """B's keypoints whose nearest descriptor in A passes Lowe's ratio test, and those
    nearest: (B points, A points). faiss's flat binary search rather than OpenCV's BFMatcher,
    because this is most of the check's time: 0.35 ms against 1.08 ms a pair of 500
    descriptors (60 real photos, 1,000 pairs, one thread)."""
    index = faiss.IndexBinaryFlat(a.descriptors.shape[1] * 8)
    index.add(a.descriptors)
    dist, ids = index.search(b.descriptors, 2)
    good = (ids[:, 1] >= 0) & (dist[:, 0] < ratio * dist[:, 1])
    return b.points[good], a.points[ids[good, 0]]


def _aligned_difference(a: Thumb, b: Thumb, m: np.ndarray) -> tuple[float, float]:
    """B's thumbnail warped onto A's by `m` (fitted between keypoints at `side`): the share of
    A covered, and the mean absolute difference there. The overlap is eroded by 2 px so
    interpolated borders (a turned copy's black corners) do not count. The finer thumbnail is
    warped onto the coarser one, never the other way: blown up, a thumbnail is blurrier than
    the one it is compared with (a cropped copy's thumbnail sees a smaller field at the same
    160 px), which read 3.8 grey levels on a copy that reads 2.1 the right way round."""
    t = m.astype(np.float64).copy()
    t[:, :2] *= a.scale / b.scale  # B's thumb px -> B's side px -> A's side px -> A's thumb px
    t[:, 2] *= a.scale
    if abs(np.linalg.det(t[:, :2])) > 1.0:
        t, a, b = cv2.invertAffineTransform(t), b, a
    h, w = a.pixels.shape[:2]
    warped = cv2.warpAffine(b.pixels.astype(np.float32), t, (w, h), flags=cv2.INTER_LINEAR)
    ones = np.full(b.pixels.shape[:2], 255, np.uint8)
    cover = cv2.warpAffine(ones, t, (w, h), flags=cv2.INTER_NEAREST)
    cover = cv2.erode(cover, np.ones((5, 5), np.uint8)) > 0
    overlap = float(cover.mean())
    if not cover.any():
        return overlap, float("inf")
    return overlap, float(np.abs(warped[cover] - a.pixels[cover].astype(np.float32)).mean())


class KeypointTable:
    """Every prepared photo's keypoints in fixed-size rows (20 KB a photo at 500 keypoints):
    in RAM up to `in_memory` photos, above that in a temporary file (np.memmap; 20 GB for
    10^6 photos, in $TMPDIR, removed when the table is). Why keep them all: the pairs to
    check join photos far apart in any order, so a cache of recent photos decodes the second
    photo of most pairs again (measured: 3.0x the engine's time with a cache far smaller than
    the collection, against 0.49x with everything cached)."""

    def __init__(self, n: int, cfg: CopyCheckConfig):
        self.cfg, self._tmp = cfg, None
        shapes = {"points": ((n, cfg.features, 2), np.float32), "descriptors": ((n, cfg.features, 32), np.uint8)}
        if n > cfg.in_memory:
            self._tmp = tempfile.TemporaryDirectory(prefix="cervixqc-keypoints-")
            self.arrays = {k: np.lib.format.open_memmap(f"{self._tmp.name}/{k}.npy", "w+", dtype, shape)
                           for k, (shape, dtype) in shapes.items()}
        else:
            self.arrays = {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
        self.count = np.full(n, -1, np.int32)  # keypoints held; -1: unreadable

    def put(self, row: int, kp: Keypoints | None) -> None:
        if kp is None:
            return
        k = min(len(kp.points), self.cfg.features)
        self.arrays["points"][row, :k] = kp.points[:k]
        self.arrays["descriptors"][row, :k] = kp.descriptors[:k]
        self.count[row] = k

    def get(self, row: int) -> Keypoints | None:
        k = int(self.count[row])
        if k < 0:
            return None
        return Keypoints(np.asarray(self.arrays["points"][row, :k]), np.ascontiguousarray(self.arrays["descriptors"][row, :k]))

    def close(self) -> None:
        self.arrays = {}
        if self._tmp is not None:
            self._tmp.cleanup()


class CopyChecker:
    """Verdicts for pairs of a collection's photos, read through `read(path) -> bytes`.
    `prepare(paths)` decodes each photo once, in order and on `threads` threads, and keeps
    its keypoints (`KeypointTable`); a pair whose keypoints align decodes its thumbnails
    again (a few hundred kept), which only copies and photos of one scene do. Unprepared
    photos are decoded when asked for. A photo that cannot be read is no copy of anything
    (the engine has already reported it)."""

    def __init__(self, read: Callable[[str], bytes], cfg: CopyCheckConfig = CopyCheckConfig()):
        self.read, self.cfg = read, cfg
        self._recent: OrderedDict[str, PhotoFeatures | None] = OrderedDict()
        self._rows: dict[str, int] = {}
        self._table: KeypointTable | None = None
        self.photos_read = 0  # decodes: the check's main cost

    def _read_features(self, path: str) -> PhotoFeatures | None:
        try:
            return features(self.read(path), self.cfg)
        except (OSError, ValueError):  # missing, unreadable or refused by the decoder's checks
            return None

    def _decoded(self, path: str) -> PhotoFeatures | None:
        if path in self._recent:
            self._recent.move_to_end(path)
            return self._recent[path]
        self.photos_read += 1
        f = self._read_features(path)
        self._recent[path] = f
        if len(self._recent) > self.cfg.thumbs:
            self._recent.popitem(last=False)
        return f

    def prepare(self, paths: list[str], threads: int = 1) -> None:
        """Keypoints of every photo in `paths`, decoded once each (OpenCV releases the GIL, so
        threads run in parallel)."""
        self.close()
        self._rows = {p: i for i, p in enumerate(paths)}
        self._table = KeypointTable(len(paths), self.cfg)

        def one(path: str) -> Keypoints | None:
            f = self._read_features(path)
            return None if f is None else f.keypoints

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for start in range(0, len(paths), 256):
                chunk = paths[start:start + 256]
                self.photos_read += len(chunk)
                for row, kp in enumerate(pool.map(one, chunk), start):
                    self._table.put(row, kp)

    def _keypoints(self, path: str) -> Keypoints | None:
        if self._table is not None and path in self._rows:
            return self._table.get(self._rows[path])
        f = self._decoded(path)
        return None if f is None else f.keypoints

    def __call__(self, a: str, b: str) -> Verdict:
        ka, kb = self._keypoints(a), self._keypoints(b)
        if ka is None or kb is None:
            return Verdict(False, reason="unreadable")
        m, verdict = fit(ka, kb, self.cfg)
        if m is None:
            return verdict
        fa, fb = self._decoded(a), self._decoded(b)
        if fa is None or fb is None:  # readable a moment ago: changed under us
            return Verdict(False, reason="unreadable")
        return judge(fa.thumb, fb.thumb, m, verdict.inliers, self.cfg)

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None
