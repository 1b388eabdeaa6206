"""COCO detection files: read, check, write, and import CVAT's COCO export.

Generic over categories (the detector stack is, as hSDB's is); the cervix project uses one,
`cervix`. Files we write always carry `info` and `licenses` (pycocotools before 2.0.11 fails
without `info`) and are checked against pycocotools in the tests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.data.schema import DataProblems, on_disk, path_key, validation_reasons
from pipelines.outputs import write_atomically

CERVIX = "cervix"


class CocoCategory(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    name: str
    supercategory: str = ""


class CocoImage(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    file_name: str
    width: int
    height: int


class CocoAnnotation(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    image_id: int
    category_id: int
    bbox: list[float] = Field(min_length=4, max_length=4)  # x, y, w, h
    area: float = 0.0  # the box's, when a file leaves it out (see below)
    iscrowd: int = 0

    @model_validator(mode="after")
    def _area_of_the_box(self) -> CocoAnnotation:
        """COCO's area ranges (AP small/medium/large) read this field: a file without it put
        every box in "small" at area 0 (pycocotools itself raises KeyError). Box-only sets
        have no mask, so the box's own area is the area."""
        if "area" not in self.model_fields_set:
            self.area = self.bbox[2] * self.bbox[3]
        return self


class CocoDataset(BaseModel):
    model_config = ConfigDict(extra="allow")
    info: dict[str, Any] = Field(default_factory=lambda: {"description": "cervixqc", "version": "1.0"})
    licenses: list[dict[str, Any]] = Field(default_factory=list)
    images: list[CocoImage] = Field(default_factory=list)
    annotations: list[CocoAnnotation] = Field(default_factory=list)
    categories: list[CocoCategory] = Field(default_factory=list)

    def category_id(self, name: str) -> int:
        for c in self.categories:
            if c.name == name:
                return c.id
        raise KeyError(f"no category {name!r}; have {[c.name for c in self.categories]}")

    def sizes_by_file(self) -> dict[str, tuple[int, int]]:
        """file_name -> (width, height) as recorded: the frame its boxes are drawn in."""
        return {path_key(im.file_name): (im.width, im.height) for im in self.images}

    def boxes_by_file(self, category: str | None = None) -> dict[str, list[list[float]]]:
        """file_name -> [[x1, y1, x2, y2], ...]; images without boxes map to []."""
        wanted = None if category is None else self.category_id(category)
        names = {im.id: path_key(im.file_name) for im in self.images}  # keyed as manifests' paths are looked up
        out: dict[str, list[list[float]]] = {n: [] for n in names.values()}
        for a in self.annotations:
            if wanted is None or a.category_id == wanted:
                x, y, w, h = a.bbox
                out[names[a.image_id]].append([x, y, x + w, y + h])
        return out


class CocoError(DataProblems):
    """A COCO file that cannot be used, with every reason."""


def validate_coco(ds: CocoDataset, tolerance: float = 0.0) -> list[str]:
    """Every problem in the file: ids, references, and boxes outside their image or empty."""
    problems: list[str] = []
    images: dict[int, CocoImage] = {}
    for im in ds.images:
        if im.id in images:
            problems.append(f"image id {im.id} is used twice")
        images[im.id] = im
        if im.width <= 0 or im.height <= 0:
            problems.append(f"image {im.id} ({im.file_name!r}): size {im.width}x{im.height} is not positive")
    # as every reader looks them up: `./a.jpg` beside `a.jpg` is one photo twice, whose boxes one
    # lookup or the other lost
    seen: dict[str, str] = {}
    twice = []
    for im in ds.images:
        key = path_key(im.file_name)
        if key in seen:
            twice.append(f"{seen[key]!r} and {im.file_name!r}" if seen[key] != im.file_name else repr(im.file_name))
        seen.setdefault(key, im.file_name)
    if twice:
        problems.append(f"{len(twice)} file_name(s) used by several images (e.g. {', '.join(twice[:3])})")
    cats = {c.id for c in ds.categories}
    if len(cats) != len(ds.categories):
        problems.append("some category ids are used twice")
    seen: set[int] = set()
    for a in ds.annotations:
        where = f"annotation {a.id}"
        if a.id in seen:
            problems.append(f"{where}: id is used twice")
        seen.add(a.id)
        if a.category_id not in cats:
            problems.append(f"{where}: unknown category_id {a.category_id}")
        im = images.get(a.image_id)
        if im is None:
            problems.append(f"{where}: unknown image_id {a.image_id}")
            continue
        where += f" (image {im.id} {im.file_name!r})"
        x, y, w, h = a.bbox
        if not all(math.isfinite(v) for v in a.bbox):
            problems.append(f"{where}: box {a.bbox} has a non-finite value")
        elif w <= 0 or h <= 0:
            problems.append(f"{where}: box {a.bbox} has no area (w={w}, h={h})")
        elif x < -tolerance or y < -tolerance or x + w > im.width + tolerance or y + h > im.height + tolerance:
            problems.append(
                f"{where}: box [x1={x:g}, y1={y:g}, x2={x + w:g}, y2={y + h:g}] is not inside the "
                f"{im.width}x{im.height} image"
            )
    return problems


def _not_coco(e: ValueError) -> str:
    """Why a file is not a COCO detection file, a part per field at fault: pydantic's own text
    ended with a link to its documentation and the file's first bytes (an audit)."""
    if not isinstance(e, ValidationError):  # json's JSONDecodeError: its message says where
        return f"not a COCO detection file: {e}"
    return f"not a COCO detection file: {validation_reasons(e, 'the file', shown=5)}"


def load_coco(path: str | Path) -> CocoDataset:
    path = Path(path)
    try:
        ds = CocoDataset.model_validate_json(path.read_bytes())
    except OSError as e:  # missing, a folder, no permission: the file named, not a traceback
        raise CocoError(str(path), [f"cannot read it ({e.strerror or type(e).__name__})"]) from None
    except ValueError as e:
        raise CocoError(str(path), [_not_coco(e)]) from e
    problems = validate_coco(ds)
    if "images" not in ds.model_fields_set:  # `{}` or another tool's JSON read as an empty box file (an audit)
        problems.insert(0, 'not a COCO detection file: no "images" list')
    if problems:
        raise CocoError(str(path), problems)
    return ds


def save_coco(ds: CocoDataset, path: str | Path) -> Path:
    """Write atomically after validating: we never write a file we would refuse to read."""
    problems = validate_coco(ds)
    if problems:
        raise CocoError(str(path), problems)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(ds.model_dump(mode="json"), separators=(",", ":"))))


def image_file(root: Path, name: str) -> str:
    """The file a box file's image names, absolute (names are taken from the box file's folder
    `root`): how box files meet manifests' `abspath` whatever folder each is relative to."""
    return os.path.abspath(on_disk(root, name))


def missing_images(ds: CocoDataset, root: Path) -> list[str]:
    """The images' names that are no file under `root` (training and eval refuse them)."""
    return [im.file_name for im in ds.images if not os.path.isfile(image_file(root, im.file_name))]


def manifest_rows(ds: CocoDataset, root: Path, abspaths: Iterable[str]) -> dict[int, int]:
    """Each image's row in a manifest (by position in `abspaths`, `load_manifest`'s column), for
    the images that are one. Matched by the file both name, the box file's names taken from
    `root` and the manifest's paths from its own folder: compared as spelt, a manifest of
    absolute paths matched no box, a split written into another folder matched no image, and a
    manifest of another collection matched 13 of 40 by name, other files (audits)."""
    row_of = {os.path.abspath(a): i for i, a in enumerate(abspaths)}
    rows = {im.id: row_of.get(image_file(root, im.file_name)) for im in ds.images}
    return {i: r for i, r in rows.items() if r is not None}


def photo_problems(ds: CocoDataset, root: Path) -> list[str]:
    """What training and eval refuse in a box file, one line each: an image that is no file
    under `root`, or one whose recorded size is not the photo's (`size_mismatches`)."""
    return [*(f"{name}: no such file under {root}" for name in missing_images(ds, root)), *size_mismatches(ds, root)]


def split_box_files(df, written: Sequence[str], ds: CocoDataset, root: Path
                    ) -> dict[str, tuple[CocoDataset, list[str]]]:
    """Per split of `df` (from `load_manifest`), the images of `ds` (names taken from `root`)
    that are its rows, renamed to `written` (the paths of the split manifest, which the box file
    is written beside), and the rows that have none (`manifest_rows`). Files put beside the
    boxes under the split's name replaced another split's, whose training boxes then held this
    one's test patients (an audit). Ids are kept."""
    matched: list = [None] * len(df)
    by_id = {im.id: im for im in ds.images}
    for image_id, row in manifest_rows(ds, root, df["abspath"]).items():
        matched[row] = by_id[image_id]
    if not ds.images:  # split wrote no box file and exited 0 (an audit)
        raise ValueError("it lists no images")
    if not any(matched):
        raise ValueError(f"none of its {len(ds.images)} images is a row of the manifest (its names are taken from "
                         "its own folder, the manifest's paths from the manifest's)")
    parts = {}
    for name in ("train", "val", "test"):
        rows = [i for i, s in enumerate(df["split"]) if s == name]
        images = [matched[i].model_copy(update={"file_name": written[i]}) for i in rows if matched[i] is not None]
        ids = {im.id for im in images}
        part = ds.model_copy(update={"images": images,
                                     "annotations": [a for a in ds.annotations if a.image_id in ids]})
        parts[name] = (part, [df["path"].iat[i] for i in rows if matched[i] is None])
    return parts


def size_mismatches(ds: CocoDataset, root: Path) -> list[str]:
    """Images whose recorded width and height are not the photo's as displayed (after EXIF
    orientation), read from each header. Boxes are in the recorded frame: the detector scaled
    them from it and the stage-2 crops did not, so a photo resized after boxing, or a phone
    photo boxed upright but recorded at its stored size (as some annotation tools export),
    trained the two on different regions, unsaid. A photo that cannot be opened is left to the
    checks that read it."""
    from pipelines.data.images import displayed_size

    out = []
    for im in ds.images:
        try:
            problem = size_problem(im.file_name, (im.width, im.height), displayed_size(on_disk(root, im.file_name)))
        except OSError:
            continue
        if problem:
            out.append(problem)
    return out


def size_problem(name: str, recorded: tuple[int, int], displayed: tuple[int, int]) -> str | None:
    if recorded == displayed:
        return None
    return f"{name}: recorded {recorded[0]}x{recorded[1]}, the photo is {displayed[0]}x{displayed[1]} as displayed"


def make_annotation(ann_id: int, image_id: int, category_id: int, xyxy) -> CocoAnnotation:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    w, h = x2 - x1, y2 - y1
    return CocoAnnotation(id=ann_id, image_id=image_id, category_id=category_id,
                          bbox=[round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)], area=round(w * h, 2))


def _rotated_aabb(x: float, y: float, w: float, h: float, degrees: float) -> tuple[float, float, float, float]:
    """CVAT rotates boxes about their centre; the enclosing axis-aligned box."""
    cx, cy = x + w / 2, y + h / 2
    t = math.radians(degrees)
    hw = abs(w / 2 * math.cos(t)) + abs(h / 2 * math.sin(t))
    hh = abs(w / 2 * math.sin(t)) + abs(h / 2 * math.cos(t))
    return cx - hw, cy - hh, cx + hw, cy + hh


def _merge_category_names(ds: CocoDataset) -> list[str]:
    """Names lower-cased and stripped; categories whose names then agree ("Cervix" and
    "cervix ", two labels typed in CVAT) become one, the first, and their boxes move to it.
    Kept apart, `match-boxes` read the first one's boxes only, and a photo boxed under the
    second became a photo without a cervix."""
    notes: list[str] = []
    first_of: dict[str, int] = {}
    moved: dict[int, int] = {}
    for c in ds.categories:
        clean = c.name.strip().lower()
        if clean != c.name:
            notes.append(f"category {c.id}: name {c.name!r} -> {clean!r}")
            c.name = clean
        if clean in first_of:
            moved[c.id] = first_of[clean]
            notes.append(f"category {c.id} merged into category {first_of[clean]} ({clean!r})")
        else:
            first_of[clean] = c.id
    if moved:
        ds.categories = [c for c in ds.categories if c.id not in moved]
        for a in ds.annotations:
            a.category_id = moved.get(a.category_id, a.category_id)
    return notes


def import_cvat(path: str | Path, clip_tolerance: float = 2.0) -> tuple[CocoDataset, list[str]]:
    """Normalise a CVAT "COCO 1.0" export; returns the dataset and notes on what changed.

    CVAT writes category names as typed ("Cervix "), rotated boxes as an attribute, and
    boxes that poke up to a pixel or two past the border after rounding. We lower-case and
    strip names, replace rotated boxes by their enclosing box, clip overshoots up to
    `clip_tolerance` pixels, and refuse (with every reason) anything worse.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"the top level is a JSON {type(raw).__name__}, not an object")
        raw.setdefault("info", {"description": f"imported from CVAT export {path.name}"})
        raw.setdefault("licenses", [])
        ds = CocoDataset.model_validate(raw)
    except OSError as e:
        raise CocoError(str(path), [f"cannot read it ({e.strerror or type(e).__name__})"]) from None
    except ValueError as e:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
        raise CocoError(str(path), [_not_coco(e)]) from None
    if not ds.images:  # imported as "0 images, 0 boxes", exit 0 (an audit): the wrong export?
        raise CocoError(str(path), ["it lists no images: export the task's annotations as COCO 1.0 again"])
    notes = _merge_category_names(ds)
    sizes = {im.id: (im.width, im.height) for im in ds.images}
    unreadable: list[str] = []
    for a in ds.annotations:
        x, y, w, h = a.bbox
        attributes = getattr(a, "attributes", None) or {}
        try:
            rotation = float(attributes.get("rotation", 0.0) or 0.0) if isinstance(attributes, dict) else 0.0
        except (TypeError, ValueError):
            unreadable.append(f"annotation {a.id}: rotation {attributes.get('rotation')!r} is not a number")
            continue
        x1, y1, x2, y2 = _rotated_aabb(x, y, w, h, rotation) if rotation else (x, y, x + w, y + h)
        if rotation:
            notes.append(f"annotation {a.id}: rotated {rotation:g} deg box replaced by its enclosing box")
        if a.image_id in sizes:
            iw, ih = sizes[a.image_id]
            over = max(-x1, -y1, x2 - iw, y2 - ih)
            if 0 < over <= clip_tolerance:
                notes.append(f"annotation {a.id}: box clipped to the image ({over:.2f} px over)")
                x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(iw)), min(y2, float(ih))
        a.bbox = [x1, y1, x2 - x1, y2 - y1]
        a.area = max(0.0, (x2 - x1) * (y2 - y1))
    problems = unreadable + validate_coco(ds)
    if problems:
        raise CocoError(str(path), problems)
    return ds, notes
