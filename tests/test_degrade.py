"""Tests of the upsampler conditioning corruptions: gaussian blur, BSR degradation, batches."""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clipgen.data import degrade, shapes


def _scene(background: str, seed: int = 0) -> shapes.Scene:
    rng = np.random.default_rng(seed)
    while True:
        scene = shapes.sample_scene(rng)
        if scene.background == background and len(scene.objects) == 2:
            return scene


def _direct_blur(images: np.ndarray) -> np.ndarray:
    """A 3x3 2-D correlation with the normalised gaussian of sigma 0.6, written out."""
    side = math.exp(-1.0 / (2.0 * 0.6**2))
    taps = np.array([side, 1.0, side]) / (1.0 + 2.0 * side)
    kernel = np.outer(taps, taps)
    padded = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    return sum(
        kernel[i, j] * padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)
    )


def test_blur_equals_direct_convolution() -> None:
    images = np.random.default_rng(0).uniform(-1.0, 1.0, (2, 9, 11, 3)).astype(np.float32)
    blurred = degrade.gaussian_blur(jnp.asarray(images))
    assert isinstance(blurred, jax.Array) and blurred.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(blurred), _direct_blur(images), atol=2e-6)


@pytest.mark.parametrize("value", [-1.0, 0.0, 0.3137255, 1.0])
def test_blur_preserves_constant_image_exactly(value: float) -> None:
    images = np.full((1, 8, 8, 3), value, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(degrade.gaussian_blur(images)), images)


def test_blur_under_jit_equals_eager() -> None:
    images = jnp.asarray(np.random.default_rng(1).uniform(0.0, 1.0, (2, 16, 16, 3)), jnp.float32)
    eager = degrade.gaussian_blur(images)
    np.testing.assert_allclose(jax.jit(degrade.gaussian_blur)(images), eager, atol=1e-6)
    traced_sigma = jax.jit(degrade.gaussian_blur, static_argnames="kernel_size")
    np.testing.assert_allclose(
        traced_sigma(images, jnp.float32(0.6), kernel_size=3), eager, atol=1e-6
    )


def test_blur_rejects_even_kernel_and_integer_images() -> None:
    with pytest.raises(ValueError, match="odd"):
        degrade.gaussian_blur(jnp.zeros((1, 8, 8, 3)), kernel_size=4)
    with pytest.raises(TypeError, match="float"):
        degrade.gaussian_blur(jnp.zeros((1, 8, 8, 3), jnp.uint8))


def test_low_resolution_area_matches_the_low_resolution_render() -> None:
    # The renderer draws coverage, so the area average of a 4x render is the 1x render, up to
    # rounding and the renderer's approximate coverage at corners.
    scene = _scene("gray")
    small = degrade.low_resolution(shapes.render(scene, 256), 64)
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(float) - shapes.render(scene, 64)).mean() < 0.5


@pytest.mark.parametrize(("size", "scale"), [(128, 4), (256, 4), (64, 2)])
def test_bsr_shape_dtype(size: int, scale: int) -> None:
    image = shapes.render(_scene("white"), size)
    out = degrade.bsr_degradation(image, 0, scale)
    assert out.shape == (size // scale, size // scale, 3) and out.dtype == np.uint8


def test_bsr_is_deterministic_and_differs_between_seeds() -> None:
    image = shapes.render(_scene("gray"), 128)
    first = degrade.bsr_degradation(image, 7)
    np.testing.assert_array_equal(degrade.bsr_degradation(image, 7), first)
    np.testing.assert_array_equal(degrade.bsr_degradation(image, np.random.default_rng(7)), first)
    outputs = [degrade.bsr_degradation(image, seed).tobytes() for seed in range(8)]
    assert len(set(outputs)) == len(outputs)


def test_bsr_degrades_more_than_resizing_or_jpeg_alone() -> None:
    image = shapes.render(_scene("white", seed=3), 128)
    clean = degrade.low_resolution(image, 32).astype(float)
    bicubic = degrade.low_resolution(image, 32, "bicubic").astype(float)
    buffer = io.BytesIO()
    Image.fromarray(clean.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    jpeg95 = np.asarray(Image.open(buffer), dtype=float)
    errors = [np.abs(degrade.bsr_degradation(image, s) - clean).mean() for s in range(12)]
    # Each draw is further from the clean downsample than switching resizers moves it ...
    assert min(errors) > 5.0 * np.abs(bicubic - clean).mean()
    # ... and on average much further than the mildest single step, the final JPEG at q = 95.
    assert np.mean(errors) > 3.0 * np.abs(jpeg95 - clean).mean()


def test_bsr_keeps_the_mean_colour() -> None:
    # Blurs and resizes have normalised weights and the noise is zero-mean; what moves the mean
    # is aliasing of unfiltered resizes, JPEG rounding and noise clipped at 0/255. On a gray
    # (128) background the noise (sigma <= 25 levels) cannot clip, so 6 of 255 levels is loose.
    image = shapes.render(_scene("gray", seed=5), 128)
    mean = image.reshape(-1, 3).mean(axis=0)
    for seed in range(12):
        out = degrade.bsr_degradation(image, seed)
        assert np.abs(out.reshape(-1, 3).mean(axis=0) - mean).max() < 6.0, seed


def test_bsr_rejects_sizes_not_divisible_by_scale() -> None:
    with pytest.raises(ValueError, match="divisible"):
        degrade.bsr_degradation(np.zeros((30, 32, 3), np.uint8), 0, 4)


@pytest.mark.parametrize("mode", ["blur", "bsr"])
def test_degrade_batch_is_independent_of_batching(mode: str) -> None:
    scenes = [_scene(background, seed=i) for i, background in enumerate(["white", "gray", "black"])]
    images = np.stack([shapes.render(scene, 64) for scene in scenes])
    batch = degrade.degrade_batch(images, seed=11, index=[40, 41, 42], mode=mode)
    assert batch.shape == (3, 16, 16, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(degrade.degrade_batch(images, 11, 40, mode), batch)
    for i in range(3):
        alone = degrade.degrade_batch(images[i : i + 1], seed=11, index=40 + i, mode=mode)
        np.testing.assert_array_equal(alone[0], batch[i])
    reversed_order = degrade.degrade_batch(images[::-1], 11, [42, 41, 40], mode)
    np.testing.assert_array_equal(reversed_order[::-1], batch)


def test_degrade_batch_seeds_and_indices_change_bsr() -> None:
    images = np.stack([shapes.render(_scene("gray"), 64)] * 2)
    same_image = degrade.degrade_batch(images, 0, 0, "bsr")
    assert not np.array_equal(same_image[0], same_image[1])
    assert not np.array_equal(degrade.degrade_batch(images, 1, 0, "bsr"), same_image)


def test_degrade_batch_blur_is_downsample_then_gaussian_blur() -> None:
    images = np.stack([shapes.render(_scene("white"), 64)])
    small = degrade.low_resolution(images.astype(np.float32) / 255.0, 16)
    expected = np.rint(np.clip(np.asarray(degrade.gaussian_blur(small)), 0.0, 1.0) * 255.0)
    np.testing.assert_array_equal(degrade.degrade_batch(images, 0, 0, "blur"), expected)
