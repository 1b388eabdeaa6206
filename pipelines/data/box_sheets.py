"""Contact sheets of boxes for a person to check: numbered tiles, the box drawn in a colour
that says where it came from, and ticks every 10% of the width and height on the tile's
border so a wrong box can be corrected by reading fractions off the picture.

Sheets are PNG (JPEG smears the thin box lines) with an index CSV: tile number -> file.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipelines.data.coco import CocoDataset
from pipelines.data.schema import on_disk
from pipelines.engine.decode import as_displayed

# colour per origin prefix; anything else draws white
COLOURS = {"detector": (0, 255, 255), "tissue": (255, 255, 0), "fixed": (0, 255, 0), "ground": (255, 0, 255)}
_CAPTION = 16


def _colour(origin: str) -> tuple[int, int, int]:
    for prefix, colour in COLOURS.items():
        if origin.startswith(prefix):
            return colour
    return (255, 255, 255)


def _tile(path: Path, boxes: list[tuple[list[float], str]], caption: str, size: int, font) -> Image.Image:
    tile = Image.new("RGB", (size, size + _CAPTION), (40, 40, 40))
    with Image.open(path) as im:
        im = as_displayed(im).convert("RGB")
        w, h = im.size
        s = (size - 8) / max(w, h)
        thumb = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    ox, oy = (size - thumb.width) // 2, (size - thumb.height) // 2
    tile.paste(thumb, (ox, oy))
    draw = ImageDraw.Draw(tile)
    for k in range(11):  # ticks every 10%, longer at 50%
        n = 6 if k == 5 else 3
        x, y = ox + k * thumb.width / 10, oy + k * thumb.height / 10
        draw.line([x, oy - n, x, oy], fill="white")
        draw.line([x, oy + thumb.height, x, oy + thumb.height + n], fill="white")
        draw.line([ox - n, y, ox, y], fill="white")
        draw.line([ox + thumb.width, y, ox + thumb.width + n, y], fill="white")
    for (x1, y1, x2, y2), origin in boxes:
        draw.rectangle([ox + x1 * s, oy + y1 * s, ox + x2 * s, oy + y2 * s], outline=_colour(origin), width=2)
    draw.text((4, size), caption, fill="white", font=font)
    return tile


_SHEET = re.compile(r"sheet_\d{3,}\.png")
_INDEX_COLUMNS = ["tile", "sheet", "file", "boxes"]


def sheets_folder_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot take a set of sheets: it holds files that are not an earlier set's
    (a site's own index.csv was overwritten without a word, an audit). An earlier set is
    replaced whole: its extra sheets stayed beside a smaller new set, and a reviewer who looked
    at every sheet looked at photos of another run."""
    if not out_dir.is_dir():
        return None
    others = sorted(p.name for p in out_dir.iterdir() if not (_SHEET.fullmatch(p.name) or p.name == "index.csv"))
    if others or ((out_dir / "index.csv").is_file() and not _ours(out_dir / "index.csv")):
        named = ", ".join(others[:3]) or "an index.csv of other columns"
        return f"{out_dir} holds files that are not contact sheets ({named}): choose an empty or new folder"
    return None


def _ours(index: Path) -> bool:
    try:
        with open(index, newline="") as fh:
            return next(csv.reader(fh), None) == _INDEX_COLUMNS
    except (OSError, UnicodeDecodeError):
        return False


def draw_sheets(ds: CocoDataset, image_root: str | Path, out_dir: str | Path, per_row: int = 6,
                rows: int = 5, tile: int = 240, captions: dict[str, str] | None = None) -> list[Path]:
    """One PNG per `per_row * rows` images, in the COCO file's image order, plus index.csv; an
    earlier set in `out_dir` is removed first (`sheets_folder_problem` says when it cannot be)."""
    root, out = Path(image_root), Path(out_dir)
    problem = sheets_folder_problem(out)
    if problem is not None:
        raise ValueError(problem)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if _SHEET.fullmatch(old.name):
            old.unlink()
    boxes: dict[int, list] = {im.id: [] for im in ds.images}
    for a in ds.annotations:
        x, y, w, h = a.bbox
        boxes[a.image_id].append(([x, y, x + w, y + h], str(getattr(a, "origin", "ground truth"))))
    font = ImageFont.load_default(size=12)
    per_sheet, sheets, index = per_row * rows, [], []
    for start in range(0, len(ds.images), per_sheet):
        chunk = ds.images[start : start + per_sheet]
        sheet = Image.new("RGB", (per_row * tile, rows * (tile + _CAPTION)), "black")
        for j, im in enumerate(chunk):
            number = start + j
            caption = f"#{number} " + (captions or {}).get(im.file_name, Path(im.file_name).stem)[:30]
            sheet.paste(_tile(on_disk(root, im.file_name), boxes[im.id], caption, tile, font),
                        ((j % per_row) * tile, (j // per_row) * (tile + _CAPTION)))
            index.append({"tile": number, "sheet": len(sheets), "file": im.file_name,
                          "boxes": len(boxes[im.id])})
        path = out / f"sheet_{len(sheets):03d}.png"
        sheet.save(path)
        sheets.append(path)
    with open(out / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(index)
    return sheets
