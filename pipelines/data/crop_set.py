"""Stage-2 inputs: cervix crops cut once from the photos and kept as uint8 tensors.

Crops come from ground-truth boxes (COCO) or from a detector's boxes (same COCO format, so a
detector's predictions can be written and used the same way); the paper trains on detector
crops, and we report both. Photos without a box (no cervix) have no stage-2 crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipelines.engine.crops import crop_boxes
from pipelines.data.coco import size_problem
from pipelines.data.images import load_rgb
from pipelines.data.schema import Kind, path_key

KIND_INDEX = {Kind.REGULAR.value: 0, Kind.GREEN.value: 1, Kind.IODINE.value: 2}


@dataclass
class CropSet:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    kinds: torch.Tensor  # int64 [N]: 0 regular, 1 green, 2 iodine
    paths: list[str]
    patients: list[str]
    sources: list[str]

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
                       self.paths + other.paths, self.patients + other.patients, self.sources + other.sources)


def extract_crops(manifest: pd.DataFrame, boxes_by_path: dict[str, list[list[float]]], size: int,
                  margin: float = 0.05, root: Path | None = None,
                  recorded: dict[str, tuple[int, int]] | None = None) -> CropSet:
    """One crop per manifest row of kind regular/green/iodine that has a box (the first box,
    which for detector output is the highest-scoring one); paths matched as `path_key` spells
    them (a manifest's `./a.jpg` got no crop). `recorded`: the box file's image sizes, checked
    against each photo's (`size_mismatches` says why)."""
    rows = manifest[manifest["kind"].isin(list(KIND_INDEX))]
    boxes_by_key = {path_key(p): b for p, b in boxes_by_path.items()}
    crops, kinds, paths, patients, sources, wrong = [], [], [], [], [], []
    for row in rows.itertuples(index=False):
        boxes = boxes_by_key.get(path_key(row.path)) or []
        if not boxes:
            continue
        path = Path(getattr(row, "abspath", None) or (root / row.path if root else row.path))
        x1, y1, x2, y2 = boxes[0]
        # Decode only as large as the crop needs (box short side >= 2x the crop size): JPEG
        # DCT scaling makes a 12 MP photo's 224 px crop several times cheaper.
        with Image.open(path) as im:
            long_full = max(im.size)
        f = min(1.0, 2 * size / max(1.0, min(x2 - x1, y2 - y1)))
        image, sx, sy = load_rgb(path, math.ceil(long_full * f))
        want = (recorded or {}).get(path_key(row.path))
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
    if wrong:
        raise ValueError("the box file's image sizes are not the photos' (its boxes are drawn in the recorded "
                         "size): " + "; ".join(wrong[:10]) + (f"; and {len(wrong) - 10} more" if len(wrong) > 10 else ""))
    images = torch.cat(crops) if crops else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return CropSet(images, torch.tensor(kinds, dtype=torch.int64), paths, patients, sources)


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
                splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, CropSet]:
    """Crops per split of a manifest that has a `split` column, boxes from a COCO file whose
    file names are the manifest's paths (ground truth, or a detector's output)."""
    from pipelines.data.coco import load_coco
    from pipelines.data.manifest import load_manifest

    df = load_manifest(manifest_path)
    if "split" not in df.columns:
        raise ValueError(f"{manifest_path} has no split column: run `cervixqc split` first")
    coco = load_coco(coco_path)
    boxes, recorded = coco.boxes_by_file(), coco.sizes_by_file()
    return {s: extract_crops(df[df["split"] == s], boxes, size, margin, recorded=recorded) for s in splits}


def extra_crops(manifest_path: Path, coco_path: Path, size: int, margin: float = 0.05) -> CropSet:
    """Training-only crops from another collection (the generator's, for volume): its train
    split when it has a split column, else every row with a box."""
    from pipelines.data.coco import load_coco
    from pipelines.data.manifest import load_manifest

    df = load_manifest(manifest_path)
    if "split" in df.columns:
        df = df[df["split"] == "train"]
    coco = load_coco(coco_path)
    return extract_crops(df, coco.boxes_by_file(), size, margin, recorded=coco.sizes_by_file())
