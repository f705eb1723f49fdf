"""The resizes FID references apply before their Inception, for NHWC images in 0..255.

- `tf1_bilinear`: TF1 `resize_bilinear(align_corners=False)`, what the TF graph of TTUR and
  OpenAI's ADM evaluator does and torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
  repeats: source = destination * in/out (no half-pixel offset), no antialiasing, float32.
- `clean`: clean-fid's "clean" mode, PIL bicubic (antialiased) on each channel as a float32
  "F" image, clipped to 0..255.
- `pytorch_fid`: `torch.nn.functional.interpolate(bilinear, align_corners=False)` as
  pytorch-fid calls it: source = (destination + 0.5) * in/out - 0.5, no antialiasing.

None of the references rounds the resized image: all feed the float result to the network,
and so do these functions (float32 out). `to_uint8` rounds and clips, for storing images.
The bilinear modes accept numpy arrays (exact float32 host arithmetic) or jax arrays (usable
inside jit); `clean` runs PIL on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

RESIZE_MODES = ("tf1_bilinear", "clean", "pytorch_fid")


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_images(images: Any) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images (B, H, W, C), got shape {images.shape}")


def _array_module(images: Any) -> Any:
    return jnp if isinstance(images, jax.Array) else np


def _tf1_sample_points(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source indices and the float32 lerp weight, as TF1's legacy scaler."""
    scale = np.float32(in_size) / np.float32(out_size)
    position = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, (position - lower.astype(np.float32)).astype(np.float32)


def _half_pixel_sample_points(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source indices and the float32 weight of the upper one, as torch's
    bilinear `align_corners=False` (negative source positions clamp to 0)."""
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    # One rounding of scale * (d + 0.5) - 0.5, as torch's fused multiply-add gives.
    position = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0).astype(np.float32)
    lower = position.astype(np.int64)
    upper = np.where(lower < in_size - 1, lower + 1, lower)
    weight = np.clip(position - lower.astype(np.float32), 0, 1).astype(np.float32)
    return lower, upper, weight


def tf1_bilinear(images: Any, size: int | tuple[int, int]) -> Any:
    """(B, H, W, C) -> (B, h, w, C) float32 by TF1 bilinear with `align_corners=False`."""
    _check_images(images)
    xp = _array_module(images)
    out_h, out_w = _size_pair(size)
    y_lo, y_hi, y_lerp = _tf1_sample_points(images.shape[1], out_h)
    x_lo, x_hi, x_lerp = _tf1_sample_points(images.shape[2], out_w)
    x = images.astype(xp.float32)
    top, bottom = x[:, y_lo], x[:, y_hi]
    x_lerp = x_lerp[None, None, :, None]
    top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * x_lerp
    bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp[None, :, None, None]


def pytorch_fid_bilinear(images: Any, size: int | tuple[int, int]) -> Any:
    """(B, H, W, C) -> (B, h, w, C) float32 by half-pixel bilinear, as torch's
    `F.interpolate(mode="bilinear", align_corners=False)`."""
    _check_images(images)
    xp = _array_module(images)
    out_h, out_w = _size_pair(size)
    y_lo, y_hi, y_weight = _half_pixel_sample_points(images.shape[1], out_h)
    x_lo, x_hi, x_weight = _half_pixel_sample_points(images.shape[2], out_w)
    x = images.astype(xp.float32)
    x_weight = x_weight[None, None, :, None]
    x_weight_lo = np.float32(1) - x_weight

    def along_width(rows: Any) -> Any:
        return rows[:, :, x_lo] * x_weight_lo + rows[:, :, x_hi] * x_weight

    y_weight = y_weight[None, :, None, None]
    return along_width(x[:, y_lo]) * (np.float32(1) - y_weight) + along_width(x[:, y_hi]) * y_weight


def clean_bicubic(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(B, H, W, C) -> (B, h, w, C) float32 by PIL bicubic per channel in "F" mode, clipped
    to 0..255 (clean-fid's "clean" resize; host only)."""
    _check_images(images)
    out_h, out_w = _size_pair(size)
    images = np.asarray(images, np.float32)
    out = np.empty((images.shape[0], out_h, out_w, images.shape[3]), np.float32)
    for index in range(images.shape[0]):
        for channel in range(images.shape[3]):
            # A float32 plane makes a mode "F" image: PIL resamples it without quantising.
            plane = Image.fromarray(np.ascontiguousarray(images[index, :, :, channel]))
            resized = plane.resize((out_w, out_h), resample=Image.Resampling.BICUBIC)
            out[index, :, :, channel] = np.asarray(resized, np.float32)
    return np.clip(out, 0, 255)


def resize(images: Any, size: int | tuple[int, int], mode: str) -> Any:
    """Resize (B, H, W, C) 0..255 images to `size` by one of `RESIZE_MODES`; float32 out."""
    if mode == "tf1_bilinear":
        return tf1_bilinear(images, size)
    if mode == "clean":
        return clean_bicubic(np.asarray(images), size)
    if mode == "pytorch_fid":
        return pytorch_fid_bilinear(images, size)
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def to_uint8(images: Any) -> Any:
    """Float 0..255 images -> uint8 by rounding to nearest and clipping (never truncating)."""
    xp = _array_module(images)
    return xp.clip(xp.round(images), 0, 255).astype(xp.uint8)
