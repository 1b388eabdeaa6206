"""Duplicate grouping at collection scale: N synthetic photos' keys (sha256, two 64-bit hashes,
a base64 64-d embedding, as QCResult carries them) with planted copy groups, grouped by
find_duplicates with every key switched on; time, peak RSS and planted pairs found, printed.

    python -m tests.benchmarks.duplicates_scale --n 1000000 --threads 1

Not a test: minutes at 10^6. Random keys are the easy case for the approximate indexes
(real hashes bunch up), so the recall printed here is about the index, not the photos.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import threading
import time

import numpy as np

from pipelines.data.duplicates import DuplicateConfig, find_duplicates


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Samples the resident set every 20 ms: the peak of one call, not of the process."""

    def __enter__(self) -> "PeakRss":
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def synthetic_keys(n: int, copy_share: float, seed: int = 0):
    """Keys of n photos; a copy_share of them are copies of an earlier photo, each changed in
    one way: same bytes, 2 bits of the whole-photo hash, 2 bits of the crop hash, or a little
    embedding noise (the other keys then far from the original's). Returns keys and pairs."""
    rng = np.random.default_rng(seed)
    sha = rng.integers(0, 2**63, n, dtype=np.int64)
    ph = rng.integers(0, 2**63, n, dtype=np.int64)
    crop = rng.integers(0, 2**63, n, dtype=np.int64)
    emb = rng.normal(size=(n, 64)).astype(np.float32)
    n_copies = int(n * copy_share)
    copies = rng.choice(np.arange(1, n), n_copies, replace=False)
    originals = (copies * rng.random(n_copies)).astype(np.int64)  # an earlier row
    how = rng.integers(0, 4, n_copies)
    flips = (np.int64(1) << rng.integers(0, 63, n_copies)) | (np.int64(1) << rng.integers(0, 63, n_copies))
    sha[copies[how == 0]] = sha[originals[how == 0]]
    ph[copies[how == 1]] = ph[originals[how == 1]] ^ flips[how == 1]
    crop[copies[how == 2]] = crop[originals[how == 2]] ^ flips[how == 2]
    e = how == 3
    emb[copies[e]] = emb[originals[e]] + 0.05 * rng.normal(size=(int(e.sum()), 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # 3% of photos have no crop (no cervix) and so no crop hash and no embedding
    missing = rng.random(n) < 0.03
    missing[copies[how >= 2]] = False
    missing[originals[how >= 2]] = False
    to_hex = lambda v: [f"{int(x) & (2**64 - 1):016x}" for x in v]  # noqa: E731
    raw = emb.astype("<f2")
    embeddings = [None if m else base64.b64encode(row.tobytes()).decode("ascii") for row, m in zip(raw, missing)]
    crops = [None if m else h for h, m in zip(to_hex(crop), missing)]
    return ([f"{x:064x}" for x in sha], to_hex(ph), crops, embeddings), np.stack([originals, copies], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--copy-share", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1, help="faiss/torch threads")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    (sha, ph, crop, emb), pairs = synthetic_keys(args.n, args.copy_share)
    paths = [f"photos/{i:08d}.jpg" for i in range(args.n)]
    print(f"{args.n} photos' keys made in {time.perf_counter() - t:.1f} s; process RSS {_rss_mb():.0f} MB")
    cfg = DuplicateConfig(max_phash_distance=4, max_crop_distance=4, min_cosine=0.99)
    with PeakRss() as rss:
        before = _rss_mb()
        t = time.perf_counter()
        df = find_duplicates(paths, sha, ph, crop, emb, cfg)
        seconds = time.perf_counter() - t
    group = dict(zip(df["path"], df["group"]))
    found = np.mean([group.get(paths[a], -1) == group.get(paths[b], -2) for a, b in pairs])
    print(f"find_duplicates: {seconds:.1f} s with {args.threads} thread(s); RSS {before:.0f} MB before, "
          f"peak {rss.peak:.0f} MB (+{rss.peak - before:.0f} MB); process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"{df['group'].nunique()} groups, {len(df)} members; planted copy pairs found {found:.4f} "
          f"({len(pairs)} planted); config {cfg}")


if __name__ == "__main__":
    main()
