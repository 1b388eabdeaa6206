"""COCO detection data for torchvision detectors: samples, collation and real + extra mixing.

Labels are contiguous (1..K in COCO category order, 0 = background), the torchvision
contract; images without boxes (no-cervix photos) are valid samples with empty targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from pipelines.data.coco import CocoDataset, CocoError, size_mismatches
from pipelines.data.images import load_rgb
from pipelines.data.schema import on_disk


class CocoDetection(Dataset):
    def __init__(
        self,
        coco: CocoDataset,
        image_root: str | Path,
        transforms: Callable | None = None,
        decode_long_side: int | None = 1024,
        categories: Sequence[str] | None = None,
    ) -> None:
        self.coco = coco
        self.root = Path(image_root)
        wrong = size_mismatches(coco, self.root)
        if wrong:
            raise CocoError(f"{self.root} (the boxes' photos)", [*wrong[:10], "boxes are drawn in the recorded "
                            "size: fix the sizes (or the boxes) in the box file, or the photos"])
        self.transforms = transforms
        self.decode_long_side = decode_long_side
        names = list(categories) if categories is not None else [c.name for c in coco.categories]
        by_id = {c.id: c.name for c in coco.categories}
        self.categories = names
        self.label_of = {cid: names.index(n) + 1 for cid, n in by_id.items() if n in names}
        self._anns: dict[int, list] = {im.id: [] for im in coco.images}
        for a in coco.annotations:
            if a.category_id in self.label_of:
                self._anns[a.image_id].append(a)

    def __len__(self) -> int:
        return len(self.coco.images)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        """Boxes in the COCO file's (full-resolution) pixels."""
        im = self.coco.images[index]
        anns = self._anns[im.id]
        boxes = torch.tensor([[a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a.category_id] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels, "image_id": torch.tensor(im.id)}

    def __getitem__(self, index: int):
        im = self.coco.images[index]
        image, _, _ = load_rgb(on_disk(self.root, im.file_name), self.decode_long_side)
        sx, sy = image.shape[2] / im.width, image.shape[1] / im.height
        target = self.target(index)
        target["boxes"] = tv_tensors.BoundingBoxes(
            target["boxes"] * torch.tensor([sx, sy, sx, sy]), format="XYXY", canvas_size=image.shape[1:]
        )
        target["scale"] = torch.tensor([sx, sy])
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch))


class MixedEpochSampler(Sampler[int]):
    """Every real sample once per epoch, plus `extra_ratio` x as many drawn from the extra
    set (hSDB's real + synthetic mixing), shuffled; sharded by rank for DDP.

    Indices >= n_real address the extra dataset in a ConcatDataset([real, extra]).
    """

    def __init__(self, n_real: int, n_extra: int = 0, extra_ratio: float = 0.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.n_real, self.n_extra, self.ratio = n_real, n_extra, extra_ratio if n_extra else 0.0
        self.seed, self.rank, self.world, self.shuffle, self.epoch = seed, rank, world_size, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        idx = np.arange(self.n_real)
        k = int(round(self.ratio * self.n_real))
        if k:
            extra = rng.choice(self.n_extra, size=k, replace=k > self.n_extra) + self.n_real
            idx = np.concatenate([idx, extra])
        if self.shuffle:
            idx = rng.permutation(idx)
        pad = (-len(idx)) % self.world  # equal shard sizes keep DDP ranks in step
        return np.concatenate([idx, idx[:pad]]) if pad else idx

    def __iter__(self) -> Iterator[int]:
        return iter(self._epoch_indices()[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        total = self.n_real + int(round(self.ratio * self.n_real))
        return -(-total // self.world)
