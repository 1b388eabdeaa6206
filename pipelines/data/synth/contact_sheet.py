"""A grid of generated images, one row per source and one column per kind, boxes drawn:
the quickest way for a person to judge whether the generator looks like the clinic."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipelines.data.schema import Kind
from pipelines.data.synth.profiles import SOURCES
from pipelines.data.synth.render import ImageSpec, SizePolicy, render_image

COLUMNS = [(Kind.REGULAR, "pre"), (Kind.REGULAR, "post"), (Kind.GREEN, "green"), (Kind.GREEN, "green"),
           (Kind.IODINE, "iodine"), (Kind.IODINE, "iodine"), (Kind.NO_CERVIX, "no_cervix")]


def contact_sheet(path: str | Path, seed: int = 0, cell: int = 220) -> Path:
    label_w, head_h = 90, 22
    sources = list(SOURCES)
    sheet = Image.new("RGB", (label_w + cell * len(COLUMNS), head_h + cell * len(sources)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for j, (kind, stage) in enumerate(COLUMNS):
        draw.text((label_w + j * cell + 6, 4), f"{kind.value} ({stage})" if kind == Kind.REGULAR else kind.value,
                  fill="black", font=font)
    for i, src in enumerate(sources):
        draw.text((6, head_h + i * cell + cell // 2 - 8), src, fill="black", font=font)
        for j, (kind, stage) in enumerate(COLUMNS):
            spec = ImageSpec(f"sheet-{i}-{j}", f"sheet-{i}", i * 97 + j, j, src, kind, stage, seed)
            img = render_image(spec, SizePolicy(max_side=640))
            thumb = Image.open(io.BytesIO(img.jpeg)).convert("RGB")
            s = min((cell - 4) / img.width, (cell - 4) / img.height)
            thumb = thumb.resize((int(img.width * s), int(img.height * s)))
            ox, oy = label_w + j * cell + 2, head_h + i * cell + 2
            sheet.paste(thumb, (ox, oy))
            if img.box is not None:
                x1, y1, x2, y2 = (v * s for v in img.box)
                draw.rectangle([ox + x1, oy + y1, ox + x2, oy + y2], outline=(0, 255, 255), width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=85)
    return path
