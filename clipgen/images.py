"""Image grids with captions, written as PNG atomically."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipgen.data.files import atomic_write


def grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    columns: int = 8,
    cell: int | None = None,
) -> np.ndarray:
    """Tile uint8 HxWx3 images into one image, each resized to `cell` pixels (nearest
    neighbour, so pixels stay visible) with its caption wrapped underneath."""
    if not len(images):
        raise ValueError("grid() needs at least one image")
    cell = cell or max(image.shape[0] for image in images)
    font = ImageFont.load_default()
    wrap = max(8, cell // 6)
    lines = [textwrap.wrap(text, wrap) for text in captions] if captions else []
    text_height = 11 * max((len(parts) for parts in lines), default=0)
    rows = -(-len(images) // columns)
    columns = min(columns, len(images))
    pad = 2
    canvas = Image.new(
        "RGB", (columns * (cell + pad) + pad, rows * (cell + text_height + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        x = pad + (i % columns) * (cell + pad)
        y = pad + (i // columns) * (cell + text_height + pad)
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize(
            (cell, cell), Image.NEAREST
        )
        canvas.paste(tile, (x, y))
        for j, line in enumerate(lines[i] if lines else []):
            draw.text((x, y + cell + 11 * j), line, fill="black", font=font)
    return np.asarray(canvas)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write `image` as a PNG, atomically."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    return atomic_write(path, lambda file: picture.save(file, format="PNG"))
