"""Upsampler stages: low-resolution image -> image `scale` times larger (unCLIP's 64->256
and 256->1024 diffusion upsamplers; the demo's cascade runs them at smaller sizes).

Training reads the shapes renders at the target resolution, makes the conditioning image
by area downsampling plus the stage's corruption (`blur`: the 3x3 sigma 0.6 gaussian for
the first upsampler; `bsr`: the BSR chain for the second), deterministic per example, and
trains on random aligned crops (a quarter of the target size in the paper): the network is
fully convolutional and runs on whole images at sampling time. Its evaluation
(`upsampler_psnr`): PSNR of upsampled test images against the true high-resolution render,
beside plain bicubic upsampling of the same low-resolution input.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen import build, sampling
from clipgen.data import degrade, pipeline, sources
from clipgen.data.preprocess import to_unit_range
from clipgen.models.upsampler import init_upsampler, to_target
from clipgen.train.loop import Stage


def crop_pairs(
    high: np.ndarray, low: np.ndarray, crop: int, scale: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random crops of `crop` px from high-resolution images and the matching crop / scale
    px of their low-resolution versions (offsets on the low-resolution grid)."""
    size = high.shape[1]
    if crop == size:
        return high, low
    positions = rng.integers(0, (size - crop) // scale + 1, (len(high), 2))
    low_crop = crop // scale
    highs, lows = [], []
    for image, small, (y, x) in zip(high, low, positions, strict=True):
        highs.append(image[y * scale : y * scale + crop, x * scale : x * scale + crop])
        lows.append(small[y : y + low_crop, x : x + low_crop])
    return np.stack(highs), np.stack(lows)


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    module = build.module(config)
    diffusion = build.diffusion(config)
    data = config.data
    size, scale, crop = data.resolution, data.scale, data.crop
    low_size = size // scale
    train_source = sources.open_source(
        data.get("source", "procedural"), (size,), "train", data.seed
    )
    key = f"image_{size}"

    def to_batch(examples: list[dict]) -> dict[str, np.ndarray]:
        high = np.stack([e[key] for e in examples])
        ids = np.array([e["id"] for e in examples])
        low = degrade.degrade_batch(high, data.seed, ids, data.corruption, scale=scale)
        rng = np.random.default_rng([data.seed, int(ids[0]), len(ids)])
        high, low = crop_pairs(high, low, crop, scale, rng)
        return {"image": to_unit_range(high), "low_res": to_unit_range(low)}

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict]:
        return pipeline.host_batches(
            train_source, to_batch, first_batch, global_batch_size, config.seed
        )

    def batch_spec(global_batch_size: int):
        return {
            "image": jax.ShapeDtypeStruct((global_batch_size, crop, crop, 3), jnp.float32),
            "low_res": jax.ShapeDtypeStruct(
                (global_batch_size, crop // scale, crop // scale, 3), jnp.float32
            ),
        }

    def init_params(rng):
        return init_upsampler(module, rng, crop, crop // scale)["params"]

    def loss(params, batch, rng):
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        x0 = to_target(module.config, batch["image"], batch["low_res"])

        def model_fn(x_t, t):
            return module.apply(
                {"params": params},
                x_t,
                t,
                batch["low_res"],
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )

        t = diffusion.sample_timesteps(t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        losses = diffusion.training_losses(model_fn, x0, t, noise)
        return losses["loss"].mean(), {"mse": losses["mse"].mean()}

    draw = sampling.image_sampler(config, module)

    def preview(state) -> dict[str, np.ndarray]:
        high = pipeline.renders("test", range(8), size, data.seed)
        low = degrade.low_resolution(high, low_size)
        images = draw(next(iter(state.ema.values())), to_unit_range(low), jax.random.key(0))
        return {
            "upsampled_bicubic_truth": np.concatenate([images, degrade.bicubic(low, size), high], 1)
        }

    return Stage("upsampler", init_params, loss, batches, batch_spec, preview=preview)
