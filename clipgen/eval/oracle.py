"""Scoring images with the shapes-world oracle: what it reads in each image against the
scene it should show (clipgen.data.shapes.attribute_accuracy: colour, shape, size,
position, background, count and whole). The decoder's evaluation, the demo's true renders
and the `shapes_oracle` evaluator all score through here."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipgen.data import shapes

MIN_RESOLUTION = 32  # the oracle reads images of at least this size


def enlarged(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 images enlarged bicubically to `resolution` when smaller (the oracle needs
    MIN_RESOLUTION px or more), else as they are."""
    images = np.asarray(images)
    if images.shape[1] >= resolution:
        return images
    shape = (len(images), resolution, resolution, 3)
    enlarged = jax.image.resize(jnp.asarray(images, jnp.float32), shape, "cubic")
    return np.asarray(jnp.clip(jnp.round(enlarged), 0, 255).astype(jnp.uint8))


def read(images: Sequence[np.ndarray], scenes: Sequence[shapes.Scene]) -> list[dict[str, bool]]:
    """For each image, which attributes of the scene it should show the oracle reads in it."""
    return [
        shapes.attribute_accuracy(shapes.oracle(image), scene)
        for image, scene in zip(images, scenes, strict=True)
    ]


def mean_accuracy(results: Sequence[dict[str, bool]]) -> dict[str, float]:
    """The fraction of images right in each attribute (and whole), from `read`."""
    return {key: float(np.mean([result[key] for result in results])) for key in results[0]}
