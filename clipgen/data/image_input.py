"""Every image a user hands clipgen (a file on the command line, an array or PIL image in
the Python API, a picture of a folder or tar data source) goes through here and comes out
as uint8 HxWx3 RGB, or fails with an InputError naming it.

Normalisation: grayscale becomes three equal channels; 16-bit samples are scaled to 8
bits (v / 257, rounded); float arrays are read as [0, 1]; alpha is composited over
BACKGROUND (white), as a viewer shows a transparent PNG; palette, CMYK and other modes
convert through PIL; of an animation or a multi-page file the first frame is read."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipgen.errors import InputError

BACKGROUND = (255, 255, 255)
MAX_PIXELS = 64 * 2**20  # 64 megapixels: an 8192 x 8192 photograph still passes
MAX_ASPECT = 64  # a longer strip would be cropped to almost nothing of itself


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as uint8 HxWx3 RGB, fully decoded (a truncated file fails
    here, not later)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"image {path} {what}; give an image file (PNG, JPEG, ...)")
    data = path.read_bytes()
    if not data:
        raise InputError(f"image {path} is empty (0 bytes); give an image file")
    return decode_image(data, str(path))


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes (named `where` in errors) as uint8 HxWx3 RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_size(image.size, where)
            image.load()
            return to_rgb(image, where)
    except InputError:
        raise
    except Image.DecompressionBombError as error:
        raise InputError(
            f"image {where} is too large to decode safely ({error}); downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            f"image {where} is not an image PIL can read ({len(data)} bytes starting "
            f"{data[:8]!r}); give a PNG, JPEG or another common format"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(
            f"image {where} is damaged or truncated ({type(error).__name__}: {error}); "
            "re-export or re-download it"
        ) from None


def to_rgb(image, where: str = "image") -> np.ndarray:
    """A PIL image or an array (HxW, HxWx1, HxWx3 or HxWx4; uint8, uint16, bool, another
    integer type holding 0..255, or float in [0, 1]) as uint8 HxWx3 RGB."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, where)
    array = np.asarray(image)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"{where}: an image array of {array.dtype} cannot be read; give uint8")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(
            f"{where}: an image of shape {array.shape} is not HxW, HxWx1, HxWx3 or HxWx4; "
            "give one image (index a batch)"
        )
    _check_size((array.shape[1], array.shape[0]), where)
    pixels = _to_uint8(array, where)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.shape[-1] == 4:
        pixels = _composite(pixels[..., :3], pixels[..., 3])
    return np.ascontiguousarray(pixels)


def to_rgb_batch(images, where: str = "images") -> list[np.ndarray]:
    """A batch of images (a sequence of what `to_rgb` reads, or one NxHxWxC array) as a
    list of uint8 HxWx3 RGB images. A 2-D or 3-D array is refused rather than guessed:
    one image or a batch of grayscale ones?"""
    if hasattr(images, "ndim") and not isinstance(images, Image.Image):
        if images.ndim != 4:
            raise InputError(
                f"{where}: a batch array must be NxHxWxC, got shape {tuple(images.shape)}; "
                "for one image pass [image]"
            )
    elif isinstance(images, Image.Image | str | bytes | os.PathLike):
        raise InputError(f"{where}: expected a list of images, got one {type(images).__name__}")
    batch = [to_rgb(image, f"{where}[{i}]") for i, image in enumerate(images)]
    if not batch:
        raise InputError(f"{where}: the batch holds no image")
    return batch


def _pil_to_rgb(image: Image.Image, where: str) -> np.ndarray:
    _check_size(image.size, where)
    if image.mode.startswith("I;16"):
        return to_rgb(np.asarray(image).astype(np.uint16), where)
    if image.mode in ("I", "F"):  # 32-bit integer (often 16-bit data) or float samples
        return to_rgb(np.asarray(image), where)
    try:
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = np.asarray(image.convert("RGBA"))
            return _composite(rgba[..., :3], rgba[..., 3])
        return np.asarray(image.convert("RGB"))
    except ValueError as error:
        raise InputError(
            f"{where}: PIL cannot convert its {image.mode} pixels to RGB ({error}); "
            "save it as RGB or grayscale"
        ) from None


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{where}: the image holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InputError(
                f"{where}: float image values run from {low:g} to {high:g}; float images "
                "are read as [0, 1] (divide 0..255 data by 255, or pass uint8)"
            )
        return np.round(array * 255.0).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if array.dtype == np.uint16 or (low >= 0 and 255 < high <= 65535):
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if low < 0 or high > 255:
        raise InputError(
            f"{where}: {array.dtype} image values run from {low} to {high}; give 0..255 "
            "(or uint16 for 16-bit data)"
        )
    return array.astype(np.uint8)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha.astype(np.float32)[..., None] / 255.0
    background = np.asarray(BACKGROUND, np.float32)
    return np.round(rgb * weight + background * (1.0 - weight)).astype(np.uint8)


def _check_size(size: tuple[int, int], where: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{where}: the image is empty ({width} x {height} pixels)")
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{where}: {width} x {height} pixels is over the limit of "
            f"{MAX_PIXELS // 2**20} megapixels; downscale it first"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(
            f"{where}: {width} x {height} pixels is a strip (aspect over {MAX_ASPECT}:1); "
            "its centre crop would hold almost nothing of it: crop it first"
        )
