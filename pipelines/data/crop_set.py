"""Stage-2 inputs: cervix crops cut once from the photos and kept as uint8 tensors.

Crops come from ground-truth boxes (COCO) or from a detector's boxes (same COCO format, so a
detector's predictions can be written and used the same way); the paper trains on detector
crops, and we report both. Photos without a box (no cervix) have no stage-2 crop; a cervix
photo without one is refused unless the caller allows it (a detector's box file, whose misses
are expected): training dropped such photos unsaid, 15 of 21 regulars once (an audit).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from pipelines.engine.crops import crop_boxes
from pipelines.data.coco import image_file, size_problem
from pipelines.data.images import load_rgb, stored_long_side
from pipelines.data.schema import Kind, path_key

KIND_INDEX = {Kind.REGULAR.value: 0, Kind.GREEN.value: 1, Kind.IODINE.value: 2}


@dataclass
class CropSet:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    kinds: torch.Tensor  # int64 [N]: 0 regular, 1 green, 2 iodine
    paths: list[str]
    patients: list[str]
    sources: list[str]
    unboxed: list[str] = field(default_factory=list)  # cervix photos left out for want of a box

    @property
    def non_regular(self) -> torch.Tensor:
        return (self.kinds > 0).long()

    def subset(self, mask: torch.Tensor) -> CropSet:
        idx = torch.nonzero(mask).flatten().tolist()
        return CropSet(self.images[idx], self.kinds[idx], [self.paths[i] for i in idx],
                       [self.patients[i] for i in idx], [self.sources[i] for i in idx])

    def __len__(self) -> int:
        return len(self.paths)

    def concat(self, other: CropSet) -> CropSet:
        if len(other) and other.images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"crop sizes differ: {tuple(self.images.shape[1:])} vs {tuple(other.images.shape[1:])}")
        return CropSet(torch.cat([self.images, other.images]), torch.cat([self.kinds, other.kinds]),
                       self.paths + other.paths, self.patients + other.patients, self.sources + other.sources,
                       self.unboxed + other.unboxed)


def extract_crops(manifest: pd.DataFrame, boxes_by_path: dict[str, list[list[float]]], size: int,
                  margin: float = 0.05, root: Path | None = None,
                  recorded: dict[str, tuple[int, int]] | None = None, allow_unboxed: bool = False,
                  where: str = "the box file", boxes_root: Path | None = None) -> CropSet:
    """One crop per manifest row of kind regular/green/iodine that has a box (the first box,
    which for detector output is the highest-scoring one); paths matched as `path_key` spells
    them (a manifest's `./a.jpg` got no crop). `recorded`: the box file's image sizes, checked
    against each photo's (`size_mismatches` says why). A cervix photo without a box raises
    ValueError naming the first few, unless `allow_unboxed` (then listed in `unboxed`). An
    absolute manifest path (README: allowed), or a row of a manifest in another folder, is also
    looked up as the file it names relative to `boxes_root`, the box file's folder, where every
    box file's names start: such rows met no box, and every crop was dropped."""
    rows = manifest[manifest["kind"].isin(list(KIND_INDEX))]
    boxes_by_key = {path_key(p): b for p, b in boxes_by_path.items()}
    # the file each box file's name stands for, as split --coco matches them (coco.image_file)
    key_of_file = {image_file(boxes_root, key): key for key in boxes_by_key} if boxes_root is not None else {}
    crops, kinds, paths, patients, sources, wrong, unboxed = [], [], [], [], [], [], []
    for row in rows.itertuples(index=False):
        key = _box_key(row.path, getattr(row, "abspath", None), key_of_file, boxes_by_key)
        boxes = boxes_by_key.get(key) or []
        if not boxes:
            unboxed.append(row.path)
            continue
        path = Path(getattr(row, "abspath", None) or (root / row.path if root else row.path))
        x1, y1, x2, y2 = boxes[0]
        # Decode only as large as the crop needs (box short side >= 2x the crop size): JPEG
        # DCT scaling makes a 12 MP photo's 224 px crop several times cheaper.
        f = min(1.0, 2 * size / max(1.0, min(x2 - x1, y2 - y1)))
        image, sx, sy = load_rgb(path, math.ceil(stored_long_side(path) * f))
        want = (recorded or {}).get(key)
        problem = want and size_problem(row.path, want, (round(image.shape[2] / sx), round(image.shape[1] / sy)))
        if problem:
            wrong.append(problem)
            continue
        box = torch.tensor([[x1 * sx, y1 * sy, x2 * sx, y2 * sy]])
        crops.append(crop_boxes([image], box, sizes=(size,), margin=margin)[size].round().clamp(0, 255).byte())
        kinds.append(KIND_INDEX[row.kind])
        paths.append(row.path)
        patients.append(row.patient_id)
        sources.append(row.source)
    if unboxed and not allow_unboxed:
        named = boxes_by_key and next(iter(boxes_by_key))
        raise ValueError(
            f"{len(unboxed)} of {len(rows)} cervix photos (regular, green, iodine) have no box in {where} "
            f"(first: {', '.join(unboxed[:3])}" + (f"; it names e.g. {named}" if named else "; it names no photo")
            + "): box them (propose-boxes, fix-boxes), or pass --allow-unboxed when the boxes are a detector's, "
            "whose misses are then left out")
    if wrong:
        raise ValueError("the box file's image sizes are not the photos' (its boxes are drawn in the recorded "
                         "size): " + "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else ""))
    images = torch.cat(crops) if crops else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return CropSet(images, torch.tensor(kinds, dtype=torch.int64), paths, patients, sources, unboxed)


def _box_key(path: str, abspath: str | None, key_of_file: dict[str, str], boxes_by_key: dict[str, list]) -> str:
    """The name a photo has in the box file: its manifest path as spelt, or else the name of
    the file it names (`abspath`, or an absolute `path`) in `key_of_file` (the box file's names
    by the file each stands for): a manifest in another folder than its boxes (`split -o
    elsewhere/`) met none of them."""
    key = path_key(path)
    target = abspath or (path if os.path.isabs(path) else None)
    if key in boxes_by_key or target is None:
        return key
    return key_of_file.get(os.path.abspath(target), key)


class CropDataset(Dataset):
    """(float image in [0, 1] after `transform`, kind) pairs from a CropSet.

    `synthesise` > 0 turns that share of regular crops into green-filter or iodine crops
    with the generator's own transforms, relabelled (hSDB's answer to class imbalance).
    """

    def __init__(self, crops: CropSet, transform=None, synthesise: float = 0.0) -> None:
        self.crops, self.transform, self.synthesise = crops, transform, synthesise
        self._looks = None
        if synthesise > 0:
            from pipelines.data.transforms import GreenFilter, LugolIodine

            self._looks = (GreenFilter(), LugolIodine())

    def __len__(self) -> int:
        return len(self.crops)

    def label_counts(self) -> torch.Tensor:
        """Expected crops per kind (regular, green, iodine) an epoch draws, relabelled ones
        included: the loss's class weights come from these. From the crops' own labels, a
        split with no green or iodine crop weighted every synthesised one 0, and one with a few
        weighted the synthesised ones up with them (270 regular, 10 green or iodine, 0.2: about
        8:1 for the positives instead of 1:1; an audit)."""
        counts = torch.bincount(self.crops.kinds, minlength=3).double()
        moved = counts[0] * (self.synthesise if self._looks is not None else 0.0)
        return counts + torch.stack([-moved, moved / 2, moved / 2])

    def __getitem__(self, i: int):
        img = self.crops.images[i].float() / 255.0
        kind = self.crops.kinds[i]
        if self._looks is not None and kind == 0 and float(torch.rand(())) < self.synthesise:
            k = int(torch.randint(0, 2, ()))
            img, kind = self._looks[k](img), torch.tensor(k + 1)
        if self.transform is not None:
            img = self.transform(img)
        return img, kind


def split_crops(manifest_path: Path, coco_path: Path, size: int, margin: float = 0.05,
                splits: tuple[str, ...] = ("train", "val", "test"), allow_unboxed: bool = False) -> dict[str, CropSet]:
    """Crops per split of a manifest that has a `split` column, boxes from a COCO file whose
    file names are the manifest's paths (ground truth, or a detector's output)."""
    from pipelines.data.coco import load_coco
    from pipelines.data.manifest import load_manifest

    df = load_manifest(manifest_path)
    if "split" not in df.columns:
        raise ValueError(f"{manifest_path} has no split column: run `cervixqc split` first")
    coco = load_coco(coco_path)
    boxes, recorded = coco.boxes_by_file(), coco.sizes_by_file()
    return {s: extract_crops(df[df["split"] == s], boxes, size, margin, recorded=recorded, allow_unboxed=allow_unboxed,
                             where=f"{coco_path.name} (the {s} split)", boxes_root=coco_path.parent)
            for s in splits}


def extra_crops(manifest_path: Path, coco_path: Path, size: int, margin: float = 0.05,
                allow_unboxed: bool = False) -> CropSet:
    """Training-only crops from another collection (the generator's, for volume): its train
    split when it has a split column, else every row."""
    from pipelines.data.coco import load_coco
    from pipelines.data.manifest import load_manifest

    df = load_manifest(manifest_path)
    if "split" in df.columns:
        df = df[df["split"] == "train"]
    coco = load_coco(coco_path)
    return extract_crops(df, coco.boxes_by_file(), size, margin, recorded=coco.sizes_by_file(),
                         allow_unboxed=allow_unboxed, where=coco_path.name, boxes_root=coco_path.parent)
