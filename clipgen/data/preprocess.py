"""Image preprocessing as CLIP's: resize the short side (bicubic), centre crop, mean/std."""

from __future__ import annotations

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation statistics (RGB, on [0, 1] pixels).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 HxWx3 image with its short side resized to `size` (bicubic), then the
    central size x size crop. An image already size x size is returned as it is."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    scale = size / min(height, width)
    resized = Image.fromarray(image).resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32, scaled to [0, 1], minus CLIP's mean, over its std."""
    return (images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def clip_preprocess(images: list[np.ndarray] | np.ndarray, size: int) -> np.ndarray:
    """CLIP's whole preprocessing for a batch of uint8 images of any sizes."""
    return normalize(np.stack([resize_and_crop(np.asarray(image), size) for image in images]))


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0
