"""Writing files so that no reader ever sees half of one; reading images from a file or a
folder."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # in folders


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`;
    on any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_images(path: str | Path, size: int | None = None) -> tuple[list[str], np.ndarray]:
    """(names, uint8 images (N, size, size, 3)) of one image file or of every image in a
    folder (sorted by name), each resized on its short side and centre-cropped to `size`
    (CLIP's preprocessing; None: all must already share one size). Every file is read by
    `clipgen.data.image_input.read_image`, the one image reader."""
    from clipgen.data.image_input import read_image
    from clipgen.data.preprocess import resize_and_crop

    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no image or folder at {path}")
    pictures = [read_image(file) for file in files]
    if size is not None:
        pictures = [resize_and_crop(picture, size) for picture in pictures]
    shapes = {picture.shape for picture in pictures}
    if len(shapes) > 1:
        raise ValueError(f"images in {path} differ in size {sorted(shapes)}: give a size")
    return [file.name for file in files], np.stack(pictures)
