"""Duplicates across a collection: byte-identical files (sha256) and copies that were
re-encoded, resized, cropped or turned a little (the keys of `pipelines.engine.hashes`, and
pairs those keys propose checked pixel by pixel, `pipelines.data.copy_check`).

Why groups and not pairs: a split must keep every copy of a photo on one side, and copies
chain (A resized is B, B cropped is C), so pairs found by any key are joined into connected
components. Each key is searched with its k nearest neighbours, not a radius: a radius over
10^6 photos where thousands share one degenerate hash (black frames) returns ~10^6^2 pairs,
k neighbours at most k * N, and the union still joins a large group through its chain.
Byte-identical files are searched once (one representative per sha256), which keeps a
folder copied twice from filling every neighbour list with distance-0 copies.

Search is exact (flat faiss indexes) up to `exact_below` keys. Above, hashes stay exact
(pigeonhole buckets, for distances <= 7) and embeddings go through an IVF index (near
copies sit much closer than distinct photos, so they share a cell or a neighbouring one,
and nprobe cells per query find them); `tests/benchmarks/duplicates_scale.py` times 10^6.

Why a check with the pixels: no global key separates cropped or turned copies from other
photos of one patient (below), yet each photo's closest few by the whole photo's hash and by
the embedding do include its copies. So those `verify_k` closest, when not already joined,
are checked by local features and an aligned comparison (`CopyChecker`), which needs the
photos themselves: `read(path) -> bytes`. Without `read` (a results table alone) only the
keys group.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import DisjointSet
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipelines.data.copy_check import CopyCheckConfig, CopyChecker, VerdictStore, verdict_setting
from pipelines.data.schema import path_key
from pipelines.engine.hashes import decode_embeddings, hash_bits
from pipelines.engine.qc_result import QCResult, spreadsheet_plain, spreadsheet_safe

log = logging.getLogger(__name__)
KEYS = ("sha256", "phash", "aligned", "crop_hash", "embedding")  # evidence, strongest first
COLUMNS = ["path", "group", "duplicate_of", "kind", "evidence"]


@dataclass(frozen=True)
class DuplicateConfig:
    """Thresholds for a near copy, chosen on the real photos' val split and reported on test:

        cervixqc --threads 1 eval-duplicates .cache/real-data/real/split.csv --weights weights --split val -o val.json
        cervixqc --threads 1 eval-duplicates .cache/real-data/real/split.csv --weights weights --split test -o test.json

    (2 copies per transform and photo, seed 0.) Recall of copies grouped with their original:

        split  photos  exact  re-encode  resize  crop   rotate  pair precision
        val    106     1.000  1.000      1.000   1.000  1.000   0.9795 (100 false of 4870: one pair, below)
        test   113     1.000  1.000      1.000   1.000  1.000   1.0000 (0 of 5085)
        keys alone (verify_k=0):
        val    106     1.000  1.000      1.000   0.033  0.434   0.9996
        test   113     1.000  1.000      1.000   0.049  0.460   1.0000

    The whole photo's hash groups re-encoded and resized copies (within 2 bits) and stops at
    4: two photos of one patient minutes apart (saline, acetic acid, green filter) come
    within 6 bits (val; 8 on test). Crops (up to 10% a side) move it 14 bits at the median
    and turns 6, as far as another patient's photo (>= 14); the cervix crop's hash and the
    embedding do no better (another patient's photo reaches cosine 0.986, crop copies fall
    to 0.76), so no threshold on any key finds them at precision >= 0.99, and those two keys
    stay off. Cropped and turned copies are found by the pixel check (`CopyCheckConfig`) of
    each photo's verify_k closest by the whole photo's hash and by the embedding: copies
    align with >= 41 inliers and differ by <= 2.69 grey levels once aligned (val; 2.38 on
    test), other photos of one patient that align differ by >= 3.96 (test: 3.61), so 3.0
    is the cut. With one copy per photo (no other copies to chain through), crop recall is
    0.991 on val and 1.000 on test at verify_k 8 (0.981 on val at 4).

    The one pair of originals grouped on val, AnnoCerv C41Aceto_1 and C41Aceto_2, is one
    exposure framed twice (the highlights coincide; aligned difference 2.5, as a copy's):
    the truth table counts it as two photos, and it costs every pair across their copies.
    """

    max_phash_distance: int = 4  # copies <= 2 bits; another photo of the patient >= 6 (val)
    # pairs farther apart than this, within max_phash_distance, are checked with the pixels when
    # the photos are at hand: at 3-4 bits sat different retina photos on their black surround
    # and consecutive video frames (an audit of 1,461 real photos)
    max_phash_unchecked: int = 2
    max_crop_distance: int = -1  # off (-1): at any distance that finds a crop copy, precision < 0.99 (val)
    min_cosine: float = 1.01  # off (> 1): at 0.99, 44% of crops found at precision 0.95 (val)
    k: int = 8  # neighbours per key and photo
    verify_k: int = 8  # closest photos per key (whole-photo hash, embedding) checked with the pixels; 0: off
    copy_check: CopyCheckConfig = CopyCheckConfig()
    exact_below: int = 50_000  # flat (exact) search up to this many keys, IVF / pigeonhole above
    max_bucket_scan: int = 4096  # pigeonhole: neighbours compared in one bucket
    nprobe: int = 8  # IVF cells visited per query
    chunk: int = 65_536  # queries per search call: bounds the memory of neighbour lists

    def __post_init__(self) -> None:
        if not -1 <= self.max_phash_distance <= 64 or not -1 <= self.max_crop_distance <= 64:
            raise ValueError("Hamming distances must be in 0..64 (64-bit hashes), or -1 to switch a key off")
        if not self.min_cosine >= -1.0:
            raise ValueError(f"min_cosine must be in -1..1 (above 1 switches the embedding off), got {self.min_cosine}")
        if self.k < 1 or self.nprobe < 1 or self.chunk < 1:
            raise ValueError("k, nprobe and chunk must be >= 1")
        if self.verify_k < 0:
            raise ValueError(f"verify_k must be >= 0 (0: no pixel check), got {self.verify_k}")


def _present(values: Sequence[str | None] | None, n: int) -> np.ndarray:
    if values is None:
        return np.zeros(n, dtype=bool)
    if len(values) != n:
        raise ValueError(f"{len(values)} keys for {n} paths")
    return np.array([isinstance(v, str) and v != "" for v in values], dtype=bool)


def _ivf_cells(n: int) -> int:
    """4 sqrt(N) cells, at most 4096: the coarse search is one BLAS product, cheap next to
    scanning nprobe cells, so more and smaller cells pay (10^5 embeddings, one thread: 14.6 s
    at sqrt(N) cells and nprobe 16, 6 s at 4 sqrt(N) and nprobe 8, same planted pairs found)."""
    return int(min(max(16, 4 * np.sqrt(n)), 4096))


def _knn(index, queries: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """All rows of `queries` against the index, in chunks; returns ([N, k] scores, [N, k] ids)."""
    scores, ids = [], []
    for start in range(0, len(queries), chunk):
        d, i = index.search(queries[start:start + chunk], k)
        scores.append(d)
        ids.append(i)
    return np.concatenate(scores), np.concatenate(ids)


def _hash_pairs(bits: np.ndarray, max_distance: int, cfg: DuplicateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (row, row) of uint8 [N, 8] hashes within max_distance: k neighbours from a flat
    index below exact_below, all pairs by pigeonhole above (a binary IVF above that for
    distances > 7, where the pieces get too short to bucket). Equal hashes are folded
    first: one search per distinct hash, then every holder joined."""
    uniq, inverse = np.unique(bits, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    same_i, same_j = _same_value_pairs(inverse)
    if len(uniq) < 2:
        return same_i, same_j
    if len(uniq) >= cfg.exact_below and 64 // (max_distance + 1) >= 8:
        ui, uj = _pigeonhole_pairs(uniq.view(">u8").ravel().astype(np.uint64), max_distance, cfg.max_bucket_scan)
    else:
        dist, ids = _hash_knn(uniq, cfg.k, cfg)
        ui, uj = _close(dist <= max_distance, ids)
    first = _first_of(inverse, len(uniq))  # one holder stands for each distinct hash
    return np.concatenate([same_i, first[ui]]), np.concatenate([same_j, first[uj]])


def _hash_knn(bits: np.ndarray, k: int, cfg: DuplicateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows (and itself) of uint8 [N, 8] hashes: exact below
    exact_below, a binary IVF above."""
    if len(bits) < cfg.exact_below:
        index = faiss.IndexBinaryFlat(64)
    else:
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(64), 64, _ivf_cells(len(bits)))
        index.cp.niter = 10
        index.train(_sample(bits, 32 * _ivf_cells(len(bits))))
        index.nprobe = cfg.nprobe
    index.add(bits)
    return _knn(index, bits, min(k + 1, len(bits)), cfg.chunk)


def _pigeonhole_pairs(h: np.ndarray, max_distance: int, max_scan: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of distinct 64-bit hashes within max_distance bits, exactly: cut the bits
    into max_distance + 1 pieces, and two hashes that close agree on at least one piece
    (pigeonhole), so sorting by each piece and comparing neighbours in the same bucket finds
    them all. ~N^2 / 2^(64/(t+1)) comparisons per piece (10^6 hashes, t = 4: 13-bit pieces,
    ~6e7), where a binary IVF missed 5-10% of 2-bit pairs. A bucket beyond max_scan
    (hashes of blank frames bunch up) is scanned max_scan neighbours deep only."""
    pieces = max_distance + 1
    edges = np.linspace(0, 64, pieces + 1).astype(int)
    found_i, found_j = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        piece = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.lexsort((h, piece))  # within a bucket, by the whole hash: near ones adjacent
        sp, sh = piece[order], h[order]
        active = np.arange(len(h))
        for step in range(1, max_scan + 1):
            active = active[active + step < len(h)]
            active = active[sp[active] == sp[active + step]]
            if not len(active):
                break
            close = active[np.bitwise_count(sh[active] ^ sh[active + step]) <= max_distance]
            found_i.append(order[close])
            found_j.append(order[close + step])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64)


def _embedding_pairs(vectors: np.ndarray, min_cosine: float, cfg: DuplicateConfig) -> tuple[np.ndarray, np.ndarray]:
    if len(vectors) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    sim, ids = _embedding_knn(vectors, cfg.k, cfg)
    return _close(sim >= min_cosine, ids)


def _embedding_knn(vectors: np.ndarray, k: int, cfg: DuplicateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows (and itself) by cosine: exact below exact_below, IVF above."""
    n, d = vectors.shape
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.normalize_L2(x)
    if n < cfg.exact_below:
        index = faiss.IndexFlatIP(d)
    else:
        cells = _ivf_cells(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10  # cells only route queries: a rough clustering does
        index.train(_sample(x, 32 * cells))
        index.nprobe = cfg.nprobe
    index.add(x)
    return _knn(index, x, min(k + 1, n), cfg.chunk)


def _close(keep: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists -> (query, neighbour) pairs kept by the mask, self and misses dropped."""
    rows = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)
    keep = keep & (ids >= 0) & (ids != rows)
    return rows[keep].astype(np.int64), ids[keep].astype(np.int64)


def _sample(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(0).choice(len(x), n, replace=False)]


def _first_of(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """The first row holding each label (labels are 0..n_labels-1)."""
    first = np.full(n_labels, len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first


def _same_value_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row joined to the first row with its label (a star per label, not a clique)."""
    first = _first_of(labels, int(labels.max()) + 1 if len(labels) else 0)
    rows = np.arange(len(labels))
    keep = first[labels] != rows
    return rows[keep], first[labels][keep]


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    """faiss's OpenMP threads for one call: one below `exact_below` (spinning up threads for a
    few thousand keys costs more than the search, ~0.5 s on a busy 2-core machine), else
    torch's count, which `cervixqc --threads` sets."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def find_duplicates(
    paths: Sequence[str],
    sha256s: Sequence[str | None] | None,
    phashes: Sequence[str | None] | None,
    crop_hashes: Sequence[str | None] | None,
    embeddings: Sequence[str | None] | np.ndarray | None,
    cfg: DuplicateConfig = DuplicateConfig(),
    read: Callable[[str], bytes] | None = None,
    verdicts: VerdictStore | None = None,
) -> pd.DataFrame:
    """One row per member of every group of >= 2 photos: path, group (1, 2, ... in order of
    the groups' first paths), duplicate_of (the group's first path), kind (exact when the
    member's bytes are another member's, its sha256 shared in the group; else near: before,
    exact meant "the first path's bytes", so a group's first path was always exact, even a
    crop, and two byte twins of a third photo were near: an audit), evidence (the strongest key that joined
    the member: sha256, phash, aligned, crop_hash, embedding). A missing key (None: an
    unreadable file, no cervix crop) joins nothing. `embeddings` are base64 strings
    (QCResult.embedding) or a float array [N, D] whose missing rows are NaN. `read(path)`
    gives a photo's bytes for the pixel check of the closest pairs (None: keys alone);
    `verdicts` keeps its verdicts between runs."""
    n = len(paths)
    if n == 0:
        return pd.DataFrame(columns=COLUMNS)
    check = CopyChecker(read, cfg.copy_check) if read is not None and cfg.verify_k > 0 else None
    with _faiss_threads(1 if n < cfg.exact_below else torch.get_num_threads()):
        return _find(paths, sha256s, phashes, crop_hashes, embeddings, cfg, check, verdicts)


def _find(paths, sha256s, phashes, crop_hashes, embeddings, cfg: DuplicateConfig,
          check: CopyChecker | None, verdicts: VerdictStore | None = None) -> pd.DataFrame:
    n = len(paths)
    edges_i, edges_j, edges_key = [], [], []

    def add(i: np.ndarray, j: np.ndarray, key: int) -> None:
        edges_i.append(i)
        edges_j.append(j)
        edges_key.append(np.full(len(i), key, dtype=np.int8))

    # exact: a star per sha256; rows without one stand for themselves
    has_sha = _present(sha256s, n)
    sha = np.where(has_sha, np.asarray(sha256s if sha256s is not None else [""] * n, dtype=object), None)
    codes = pd.factorize(pd.Series(sha), use_na_sentinel=True)[0]
    codes = pd.factorize(np.where(codes < 0, codes.max(initial=-1) + 1 + np.arange(n), codes))[0]
    i, j = _same_value_pairs(codes)
    add(i, j, 0)
    representative = np.zeros(n, dtype=bool)
    representative[_first_of(codes, int(codes.max()) + 1)] = True

    near = (np.empty(0, np.int64), np.empty(0, np.int64))  # the whole-photo hash's pairs, for the pixel check
    for key, values, limit in ((1, phashes, cfg.max_phash_distance), (3, crop_hashes, cfg.max_crop_distance)):
        rows = np.flatnonzero(_present(values, n) & representative)
        if len(rows) >= 2 and limit >= 0:
            bits = hash_bits([values[r] for r in rows])
            a, b = _hash_pairs(bits, limit, cfg)
            if key == 1 and check is not None:
                sure = np.unpackbits(bits[a] ^ bits[b], axis=1).sum(1) <= cfg.max_phash_unchecked
                add(rows[a][sure], rows[b][sure], key)
                near = (rows[a][~sure], rows[b][~sure])
            else:
                add(rows[a], rows[b], key)

    vectors, has_vector = _embedding_matrix(embeddings, n) if embeddings is not None else (None, None)
    if vectors is not None and cfg.min_cosine <= 1.0:
        rows = np.flatnonzero(has_vector & representative)
        a, b = _embedding_pairs(vectors[rows], cfg.min_cosine, cfg)
        add(rows[a], rows[b], 4)

    if check is not None:
        # a hash pair past max_phash_unchecked is checked with the pixels too, and joined by the
        # hash only where the check cannot judge it (a photo too plain for keypoints, or
        # unreadable): unchecked, eight different retina photos on their black surround and
        # consecutive video frames were grouped as copies (an audit of 1,461 real photos).
        # Such verdicts are not stored, so a rerun judges the pair as a first run does
        ci, cj = _candidates(phashes, vectors, has_vector, representative, cfg)
        pairs = np.unique(np.stack([np.concatenate([ci, np.minimum(*near)]),
                                    np.concatenate([cj, np.maximum(*near)])], axis=1), axis=0)
        a, b, undecided = _checked(np.asarray(paths, dtype=object), sha, pairs[:, 0], pairs[:, 1],
                                   np.concatenate(edges_i), np.concatenate(edges_j), check, verdicts)
        add(a, b, 2)
        kept = [(i, j) for i, j in zip(np.minimum(*near).tolist(), np.maximum(*near).tolist()) if (i, j) in undecided]
        add(np.asarray([i for i, _ in kept], dtype=np.int64), np.asarray([j for _, j in kept], dtype=np.int64), 1)

    return _groups(np.asarray(paths, dtype=object), sha, np.concatenate(edges_i), np.concatenate(edges_j),
                   np.concatenate(edges_key))


def _candidates(phashes, vectors: np.ndarray | None, has_vector: np.ndarray | None, representative: np.ndarray,
                cfg: DuplicateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j, sorted) of each photo and its verify_k closest by the whole photo's
    hash and by the embedding, with no threshold: the pixel check decides."""
    n = len(representative)
    keys = [(_present(phashes, n), lambda rows: _hash_knn(hash_bits([phashes[r] for r in rows]), cfg.verify_k, cfg))]
    if vectors is not None:
        keys.append((has_vector, lambda rows: _embedding_knn(vectors[rows], cfg.verify_k, cfg)))
    found_i, found_j = [], []
    for has, knn in keys:
        rows = np.flatnonzero(has & representative)
        if len(rows) >= 2:
            _, ids = knn(rows)
            a, b = _close(np.ones(ids.shape, dtype=bool), ids)
            found_i.append(rows[a])
            found_j.append(rows[b])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    pairs = np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _checked(paths: np.ndarray, sha: np.ndarray, ci: np.ndarray, cj: np.ndarray, ei: np.ndarray, ej: np.ndarray,
             check: CopyChecker, verdicts: VerdictStore | None = None
             ) -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]]]:
    """The candidate pairs the pixel check calls copies. A pair already joined (by the keys
    or by a check before it) is not checked: in a group of ten copies, one check joins a
    cropped copy to all of them. Every photo of a pair left to check is decoded once first,
    in path order (`CopyChecker.prepare`). A pair with a stored verdict (`verdicts`, by the
    two photos' sha256 in the order checked) is taken from it, in the same order, so the
    groups are those a fresh check finds; the new verdicts of two read photos are stored (an
    unreadable photo is asked again next time)."""
    joined = DisjointSet(range(len(paths)))
    for a, b in zip(ei.tolist(), ej.tolist()):
        joined.merge(a, b)
    todo = [(a, b) for a, b in zip(ci.tolist(), cj.tolist()) if not joined.connected(a, b)]

    def key(a: int, b: int) -> tuple[str, str] | None:
        # in the order checked (path order): the check matches b's keypoints to a's, and a pair
        # at the edge of the cut was a copy one way and not the other (2.958 vs 3.011 of 3.0)
        return None if sha[a] is None or sha[b] is None else (sha[a], sha[b])

    setting = verdict_setting(check.cfg)
    known = {} if verdicts is None else verdicts.verdicts([k for pair in todo if (k := key(*pair))], setting)
    t0 = time.perf_counter()
    unknown = sorted({r for pair in todo if key(*pair) not in known for r in pair})
    check.prepare([paths[r] for r in unknown], threads=torch.get_num_threads())
    prepared = time.perf_counter() - t0
    keep_i, keep_j, undecided = [], [], set()
    checked, found, unread, plain = 0, {}, 0, 0
    try:
        with _faiss_threads(1):  # 500 x 500 descriptors a search: threads cost more than they save
            for a, b in todo:
                if joined.connected(a, b):
                    continue
                k = key(a, b)
                if k in known:
                    copy = known[k]
                else:
                    checked += 1
                    verdict = check(paths[a], paths[b])
                    copy = verdict.copy
                    plain += verdict.reason == "too few keypoints"
                    if verdict.reason in ("too few keypoints", "unreadable"):
                        undecided.add((a, b))  # not stored: a hash pair takes the hash's word (`_find`)
                    if k is not None and verdict.reason not in ("unreadable", "too few keypoints"):
                        found[k] = copy
                    elif verdict.reason == "unreadable" or k is None:
                        unread += 1
                if copy:
                    joined.merge(a, b)
                    keep_i.append(a)
                    keep_j.append(b)
    finally:
        check.close()
    if verdicts is not None:
        verdicts.add_verdicts(found, setting, unread)
    log.info("pixel check: %d candidate pairs, %d checked, %d known from before, %d copies; %d photos read, "
             "keypoints %.1f s, pairs %.1f s", len(ci), checked, len(known), len(keep_i), check.photos_read,
             prepared, time.perf_counter() - t0 - prepared)
    # said, not only stored: a wrong --images folder read nothing and fell back to the keys
    # unsaid, and smooth photos (dark, blurred) are beyond the check's keypoints (an audit)
    if unread:
        log.warning("pixel check: %d of %d pairs not judged, a photo unreadable (moved, or --images another "
                    "folder?): cropped and turned copies among them go unfound", unread, checked)
    if plain:
        log.info("pixel check: %d pairs too plain to judge (too few keypoints: smooth, dark or blurred photos): "
                 "their cropped or turned copies go unfound", plain)
    return np.asarray(keep_i, dtype=np.int64), np.asarray(keep_j, dtype=np.int64), undecided


def _embedding_matrix(embeddings: Sequence[str | None] | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(embeddings, np.ndarray):
        if len(embeddings) != n:
            raise ValueError(f"{len(embeddings)} embeddings for {n} paths")
        return embeddings, ~np.isnan(embeddings).any(axis=1)
    has = _present(embeddings, n)
    rows = np.flatnonzero(has)
    decoded = decode_embeddings([embeddings[r] for r in rows]) if len(rows) else np.zeros((0, 1), np.float32)
    vectors = np.full((n, decoded.shape[1]), np.nan, dtype=np.float32)
    vectors[rows] = decoded
    return vectors, has


def _groups(paths: np.ndarray, sha: np.ndarray, i: np.ndarray, j: np.ndarray, key: np.ndarray) -> pd.DataFrame:
    n = len(paths)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    evidence = np.full(n, len(KEYS), dtype=np.int8)
    np.minimum.at(evidence, i, key)
    np.minimum.at(evidence, j, key)
    sizes = np.bincount(component)
    members = np.flatnonzero(sizes[component] >= 2)
    if len(members) == 0:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame({"path": paths[members], "component": component[members], "row": members})
    df = df.sort_values("path", kind="stable")
    first_row = df.groupby("component", sort=False)["row"].first()
    order = {c: g for g, c in enumerate(first_row.index, start=1)}  # first appearance in path order
    df["group"] = df["component"].map(order)
    df["duplicate_of"] = paths[first_row.loc[df["component"]].to_numpy()]
    df["sha"] = sha[df["row"].to_numpy()]
    twins = df[df["sha"].notna()].groupby(["component", "sha"])["row"].transform("size")
    df["kind"] = np.where(twins.reindex(df.index).fillna(0) >= 2, "exact", "near")
    df["evidence"] = np.asarray(KEYS, dtype=object)[evidence[df["row"].to_numpy()]]
    return df.sort_values(["group", "path"], kind="stable")[COLUMNS].reset_index(drop=True)


def duplicates_of_records(records: Iterable[QCResult], cfg: DuplicateConfig = DuplicateConfig(),
                          read: Callable[[str], bytes] | None = None,
                          verdicts: VerdictStore | None = None) -> pd.DataFrame:
    """find_duplicates over engine results (clean's state, a job's results), read as a stream:
    only the keys are kept, not 10^6 records. `read(path)`: the photos, for the pixel check."""
    keys: tuple[list, ...] = ([], [], [], [], [])
    for r in records:
        for column, value in zip(keys, (r.path, r.sha256, r.phash, r.crop_hash, r.embedding)):
            column.append(value)
    return find_duplicates(*keys, cfg, read=read, verdicts=verdicts)


def with_group(record: QCResult, row) -> QCResult:
    """The record with its group from one row of find_duplicates' table (None: in no group,
    which also clears a stale group)."""
    if row is None:
        return record.model_copy(update={"duplicate_group": None, "duplicate_of": None, "duplicate_kind": None})
    return record.model_copy(update={"duplicate_group": int(row.group), "duplicate_of": row.duplicate_of,
                                     "duplicate_kind": row.kind})


def annotate(records: Iterable[QCResult], df: pd.DataFrame) -> list[QCResult]:
    """Copies of the records with duplicate_group / duplicate_of / duplicate_kind from
    find_duplicates' table; records in no group get None (a re-run clears stale groups)."""
    by_path = {row.path: row for row in df.itertuples(index=False)}
    return [with_group(r, by_path.get(r.path)) for r in records]


def read_duplicates(path: Path, cfg: DuplicateConfig = DuplicateConfig()) -> pd.DataFrame:
    """A duplicates.csv (as `cervixqc duplicates` writes it), or a `cervixqc clean` output
    folder: its own duplicates.csv (grouped with the photos at hand, so cropped and turned
    copies are in it), else its state.sqlite grouped here with `cfg` on the keys alone. That
    folder's duplicates.csv named itself is read as the folder is: alone, a table the run's
    later rows had outdated was taken as it was (an audit)."""
    if path.is_file() and path.name == "duplicates.csv" and (path.parent / "state.sqlite").is_file():
        path = path.parent
    if path.is_dir():
        check_clean_state(path)
        table = path / "duplicates.csv"
        # the run's own table only when its exports followed the state's last rows: a resumed
        # run stopped before its exports left the older table, without the new photos' groups
        if table.is_file() and _exports_current(path / "state.sqlite"):
            return _read_table(table)
        if table.is_file():
            log.warning("duplicates.csv is older than the run's state (a run stopped before its exports): "
                        "grouped again from the state, on the keys alone")
        return duplicates_of_records(read_clean_state(path), cfg)
    return _read_table(path)


NAME_COLUMNS = ("path", "duplicate_of")  # file names, which a site chose: spreadsheet-escaped in the CSV


def write_table(df: pd.DataFrame, target: Path) -> None:
    """A duplicates table (or the list of the photos it compared) as CSV, its names made
    `spreadsheet_safe` as results.csv's are: `=HYPERLINK(..).jpg` ran as a formula in a
    spreadsheet, and a name holding a carriage return split its row in two for pandas and the
    csv module, so `split --duplicates` read a broken table (an audit). `_read_table` and
    `compared_paths` read the names back as they are on disk."""
    df.assign(**{c: df[c].map(spreadsheet_safe) for c in NAME_COLUMNS if c in df}).to_csv(target, index=False)


def _names(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(**{c: df[c].map(spreadsheet_plain) for c in NAME_COLUMNS if c in df})


def _read_table(path: Path) -> pd.DataFrame:
    try:
        df = _names(pd.read_csv(path, dtype={"path": str, "duplicate_of": str}, keep_default_na=False))
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: not a duplicates table (cannot read it as CSV: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = sorted({"path", "group"} - set(df.columns))
    if missing:
        raise ValueError(f"{path}: not a duplicates table (no {', '.join(missing)} column)")
    groups = pd.to_numeric(df["group"], errors="coerce")
    bad = [i + 2 for i in range(len(df)) if groups.isna().iat[i] or groups.iat[i] % 1]  # the header is line 1
    if bad:
        raise ValueError(f"{path}: group must be a whole number; not on line {', '.join(map(str, bad[:10]))}"
                         + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    return df.assign(group=groups.astype(int))


def check_clean_state(folder: Path) -> None:
    """ValueError, naming the file, where a clean folder's state.sqlite is not a database with
    its results table: a damaged, emptied or foreign one was a traceback (DatabaseError, "no
    such table") in `duplicates` and `split --duplicates` (an audit)."""
    db_path = folder / "state.sqlite"
    if not db_path.is_file():
        return
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            db.execute("SELECT path, record FROM results LIMIT 1").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{db_path}: not a readable `cervixqc clean` state ({e}); run clean again into a new "
                         "folder, or restore this one from a backup") from None


def compared_file(table: Path) -> Path:
    """Beside a duplicates table, the photos it compared: the table lists group members only,
    so a photo in no group was "compared, no copy" or "never compared", and `split` passed a
    table made on a subfolder, or before photos were added, checking almost nothing, unsaid."""
    return table.with_name(f"{table.stem}.compared.csv")


def compared_paths(source: Path) -> set[str] | None:
    """The paths a duplicates table (or a clean folder) compared, keyed as `path_key` spells
    them; None when it does not say (a table written before the list was kept)."""
    folder = source if source.is_dir() else source.parent if source.name == "duplicates.csv" else None
    if folder is not None and (folder / "state.sqlite").is_file():  # a clean run's
        check_clean_state(folder)
        exported = folder / "results.csv"
        if (folder / "duplicates.csv").is_file() and exported.is_file() and _exports_current(folder / "state.sqlite"):
            # its table, which `read_duplicates` reads, compared the last run's photos: those of
            # its results.csv. The state keeps rows of photos a later manifest left out, whose
            # copies the table no longer holds, and they passed as compared (an audit)
            return {path_key(p) for p in _names(pd.read_csv(exported, usecols=["path"], dtype={"path": str},
                                                            keep_default_na=False))["path"]}
        db = sqlite3.connect(f"file:{folder / 'state.sqlite'}?mode=ro", uri=True)  # grouped from the state
        try:
            return {path_key(p) for (p,) in db.execute("SELECT path FROM results")}
        except sqlite3.OperationalError:
            return None
        finally:
            db.close()
    listed = compared_file(source)
    if source.is_dir() or not listed.is_file():
        return None
    return {path_key(p) for p in _names(pd.read_csv(listed, dtype={"path": str}, keep_default_na=False))["path"]}


def _exports_current(db_path: Path) -> bool:
    """Whether a clean folder's exports were written after its last rows (StateStore counts
    its writes and records the count at each export); a folder older than that count, or one
    without a state, is taken as current."""
    if not db_path.is_file():
        return True
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        marks = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('writes', 'exported_writes')"))
    except sqlite3.OperationalError:  # no meta table: a folder from before the count
        return True
    finally:
        db.close()
    return "writes" not in marks or str(marks.get("exported_writes")) == str(marks["writes"])


def read_clean_state(folder: Path) -> Iterator[QCResult]:
    """The records of a clean output folder (state.sqlite: results(path, label, record)), in
    path order, streamed. Opened read-only, unlike clean's own StateStore, which creates its
    table: a finished folder is only read here."""
    from pipelines.clean.state import refuse_newer_state

    db_path = folder / "state.sqlite"
    if not db_path.is_file():
        raise ValueError(f"{folder}: no state.sqlite (not a `cervixqc clean` output folder)")
    check_clean_state(folder)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        refuse_newer_state(db, folder)
    finally:
        db.close()
    shown = _last_run_paths(folder) if _exports_current(db_path) else None
    records = _read_records(db_path)
    return records if shown is None else (r for r in records if r.path in shown)


def _last_run_paths(folder: Path) -> set[str] | None:
    """The photos of the folder's last run, as its exports list them (results.parquet: exact
    paths): the state keeps the rows of files deleted from the source since, which clean's own
    tables leave out, and `duplicates OUT` grouped them in, its group numbers then off by one
    from results.csv's `duplicate_group` (an audit). None: no readable exports, every row."""
    import pyarrow.parquet as pq

    try:
        return set(pq.read_table(folder / "results.parquet", columns=["path"]).column("path").to_pylist())
    except (OSError, ValueError, KeyError):
        return None


def _read_records(db_path: Path) -> Iterator[QCResult]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        for (rec,) in db.execute("SELECT record FROM results ORDER BY path"):
            yield QCResult.model_validate_json(rec)
    finally:
        db.close()
