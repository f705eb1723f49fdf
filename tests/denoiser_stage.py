"""A small stage that exists to test the training loop: a conv denoiser on 16 px shapes
images with the eps-prediction diffusion loss. (The real stages live in clipgen.train.)"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from clipgen import config as config_lib
from clipgen.data import pipeline
from clipgen.diffusion import gaussian, samplers
from clipgen.models.layers import timestep_embedding
from clipgen.train.loop import Stage

RESOLUTION = 16


def _kernel(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class Denoiser(nn.Module):
    """Three 3x3 convolutions with a timestep embedding; output channels FSDP-shardable."""

    channels: int = 16
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, t):
        def conv(features, name):
            kernel_init = _kernel((None,) * 3 + ("conv_out",))
            return nn.Conv(features, (3, 3), name=name, kernel_init=kernel_init, dtype=self.dtype)

        h = conv(self.channels, "conv_in")(x)
        emb = nn.Dense(self.channels, kernel_init=_kernel((None, "embed")), dtype=self.dtype)(
            timestep_embedding(t, 32)
        )
        h = nn.silu(nn.GroupNorm(4, dtype=self.dtype)(h + emb[:, None, None, :]))
        h = nn.silu(conv(self.channels, "conv_mid")(h))
        return conv(x.shape[-1], "conv_out")(h).astype(jnp.float32)


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    model = Denoiser(config.model.channels, config.model.dtype)
    diffusion = gaussian.make_diffusion("cosine", 1000)

    def init_params(rng):
        x = jnp.zeros((1, RESOLUTION, RESOLUTION, 3))
        return model.init(rng, x, jnp.zeros((1,), jnp.int32))["params"]

    def loss(params, batch, rng):
        t_rng, noise_rng = jax.random.split(rng)
        x0 = batch["image"]
        t = diffusion.sample_timesteps(t_rng, x0.shape[0])
        noise = jax.random.normal(noise_rng, x0.shape)
        model_fn = lambda x_t, steps: model.apply({"params": params}, x_t, steps)
        losses = diffusion.training_losses(model_fn, x0, t, noise)
        return losses["loss"].mean(), {"mse": losses["mse"].mean()}

    source = pipeline.ProceduralShapes((RESOLUTION,), seed=config.data.seed)

    def to_arrays(examples):
        images = np.stack([e[f"image_{RESOLUTION}"] for e in examples])
        return {"image": images.astype(np.float32) / 127.5 - 1.0}

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict]:
        stream = pipeline.host_batches(source, to_arrays, first_batch, global_batch_size)
        for number, batch in enumerate(stream, start=first_batch):
            if number == config.data.nan_at_batch:
                batch["image"][0, 0, 0, 0] = np.nan
            yield batch

    def batch_spec(global_batch_size: int):
        shape = (global_batch_size, RESOLUTION, RESOLUTION, 3)
        return {"image": jax.ShapeDtypeStruct(shape, jnp.float32)}

    @jax.jit
    def sample(params, rng):
        respaced = diffusion.respaced("ddim10")
        model_fn = lambda x_t, steps: model.apply({"params": params}, x_t, steps)
        x_T = jax.random.normal(rng, (4, RESOLUTION, RESOLUTION, 3))
        return samplers.sample(respaced, model_fn, x_T, rng, method="ddim", clip=1.0)

    def preview(state):
        params = next(iter(state.ema.values()))
        images = sample(params, jax.random.key(0))
        return {"samples": np.asarray((images + 1) * 127.5).round().clip(0, 255).astype(np.uint8)}

    return Stage("denoiser", init_params, loss, batches, batch_spec, preview=preview)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The test stage's config; `arg` is ignored (one preset)."""
    del arg
    config = config_lib.base_config()
    config.stage = "denoiser_stage"
    config.total_steps = 6
    config.batch_size = 16
    config.log_every = 2
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 2
    config.optim.ema_decays = (0.9, 0.99)
    config.checkpoint.every = 2
    config.model.channels = 16
    config.model.dtype = "float32"
    config.data.seed = 0
    config.data.nan_at_batch = -1
    return config
