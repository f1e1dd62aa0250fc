"""A preview grid of a prepared data set: rows are classes, columns are sources (or images)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

CELL = 64


def make_preview(folder: Path, rows: int = 12, columns: int = 10) -> Path:
    """Write ``folder/preview.png``: ``rows`` classes spread over the data set, each with up to
    ``columns`` of its images in file-name order (one per source for emoji and glyphs); the
    column headers are the file names' stems."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    step = max(1, len(classes) // rows)
    chosen = classes[::step][:rows]
    names = sorted({p.stem for c in chosen for p in c.glob("*.png")})
    by_source = len(names) <= columns  # one image per source: align the columns by source
    header = 14
    width = CELL * (columns if not by_source else len(names))
    grid = Image.new("RGB", (width, header + CELL * len(chosen)), "white")
    draw = ImageDraw.Draw(grid)
    if by_source:
        for j, name in enumerate(names):
            draw.text((j * CELL + 2, 1), name[:10], fill="black")
    for i, cls in enumerate(chosen):
        files = sorted(cls.glob("*.png"))
        placed = ([(names.index(f.stem), f) for f in files] if by_source
                  else list(enumerate(files[:columns])))
        for j, path in placed:
            with Image.open(path) as image:
                tile = image.convert("RGB")
                tile.thumbnail((CELL - 2, CELL - 2))
                grid.paste(tile, (j * CELL + 1, header + i * CELL + 1))
    out = folder / "preview.png"
    grid.save(out)
    return out
