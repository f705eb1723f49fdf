"""Upsampler stages: low-resolution image -> image `scale` times larger (unCLIP's 64->256
and 256->1024 diffusion upsamplers; the demo's cascade runs them at smaller sizes).

Training reads the shapes renders at the target resolution, makes the conditioning image
by area downsampling plus the stage's corruption (`blur`: the 3x3 sigma 0.6 gaussian for
the first upsampler; `bsr`: the BSR chain for the second), deterministic per example, and
trains on random aligned crops (a quarter of the target size in the paper): the network is
fully convolutional and runs on whole images at sampling time. Evaluation: PSNR of
upsampled test images against the true high-resolution render, beside plain bicubic
upsampling of the same low-resolution input.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen.data import degrade, pipeline
from clipgen.models.unet import UNetConfig
from clipgen.models.upsampler import Upsampler, UpsamplerConfig, init_upsampler, to_target
from clipgen.pipelines.decoder import sample_upsampler, to_uint8
from clipgen.train.decoder import build_diffusion, to_unit_range
from clipgen.train.loop import Stage


def build_model(config: ml_collections.ConfigDict) -> Upsampler:
    model = config.model
    unet = UNetConfig(**model.unet.to_dict())
    upsampler = UpsamplerConfig(unet, resize=model.resize, residual=model.get("residual", False))
    return Upsampler(upsampler, dtype=jnp.dtype(model.dtype))


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


def psnr(images: np.ndarray, truth: np.ndarray) -> float:
    """Mean PSNR in dB of uint8 images against uint8 references."""
    error = (np.asarray(images, np.float64) - np.asarray(truth, np.float64)) ** 2
    mse = np.maximum(error.reshape(len(error), -1).mean(1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


def bicubic(low: np.ndarray, size: int) -> np.ndarray:
    """Plain bicubic upsampling of uint8 images (the baseline)."""
    shape = (len(low), size, size, 3)
    enlarged = jax.image.resize(jnp.asarray(low, jnp.float32), shape, "cubic")
    return np.asarray(jnp.clip(jnp.round(enlarged), 0, 255).astype(jnp.uint8))


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    module = build_model(config)
    diffusion = build_diffusion(config)
    data = config.data
    size, scale, crop = data.resolution, data.scale, data.crop
    low_size = size // scale
    train_source = pipeline.ProceduralShapes((size,), "train", data.seed)
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

    sampler = jax.jit(
        functools.partial(
            sample_upsampler,
            module,
            diffusion=build_diffusion(config, config.sample.respacing),
            image_size=size,
            method=config.sample.method,
            eta=config.sample.eta,
        )
    )

    def upsample(params, low: np.ndarray, rng) -> np.ndarray:
        return np.asarray(to_uint8(sampler(params=params, low_res=to_unit_range(low), rng=rng)))

    def test_pairs() -> tuple[np.ndarray, np.ndarray]:
        source = pipeline.ProceduralShapes((size,), "test", data.seed)
        high = np.stack([source[i][key] for i in range(config.eval.num_examples)])
        return high, degrade.low_resolution(high, low_size)

    def evaluate(state) -> dict[str, float]:
        params = next(iter(state.ema.values())) if config.eval.use_ema else state.params
        high, low = test_pairs()
        batch = config.eval.batch_size
        rng = jax.random.key(config.eval.seed)
        upsampled = np.concatenate(
            [
                upsample(params, low[start : start + batch], jax.random.fold_in(rng, start))
                for start in range(0, len(low), batch)
            ]
        )
        return {
            "test/psnr": psnr(upsampled, high),
            "test/bicubic_psnr": psnr(bicubic(low, size), high),
        }

    def preview(state) -> dict[str, np.ndarray]:
        high, low = test_pairs()
        images = upsample(next(iter(state.ema.values())), low[:8], jax.random.key(0))
        return {
            "upsampled_bicubic_truth": np.concatenate([images, bicubic(low[:8], size), high[:8]], 1)
        }

    return Stage(
        "upsampler", init_params, loss, batches, batch_spec, preview=preview, evaluate=evaluate
    )
