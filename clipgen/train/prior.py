"""Diffusion prior stage: caption (CLIP text embedding and token encodings) -> CLIP image
embedding, trained on the embedding shards that `clipgen embed` writes.

The prior denoises image embeddings in a normalised latent space: x = (z - mean) / std,
with (mean, std) either (0, 1 / scale) (the paper's z * 17.2) or per-dimension statistics
of the training embeddings (Karlo). Both live in the prior's `clip_mean` / `clip_std`
parameters, as in diffusers' `PriorTransformer`, frozen by the optimizer. The text is
dropped (zero embedding, every token masked) for a `text_drop` fraction of the batch, so
the same network also gives the unconditional output for classifier-free guidance.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen import build
from clipgen.data import embeddings
from clipgen.models.prior import PriorTransformer, init_prior
from clipgen.train.loop import Stage

EMBEDDING_SCALINGS = ("scale", "mean_std")


def latent_stats(data_config: ml_collections.ConfigDict, image_embeds: np.ndarray):
    """(mean, std), each (1, D), mapping image embeddings to the prior's latents."""
    if data_config.scaling == "scale":
        dim = image_embeds.shape[-1]
        return np.zeros((1, dim), np.float32), np.full(
            (1, dim), 1.0 / data_config.scale, np.float32
        )
    if data_config.scaling == "mean_std":
        return (
            image_embeds.mean(0, keepdims=True).astype(np.float32),
            image_embeds.std(0, keepdims=True).astype(np.float32) + 1e-6,
        )
    raise ValueError(f"config.data.scaling: {data_config.scaling!r}, expected {EMBEDDING_SCALINGS}")


def with_latent_stats(params: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """params with clip_mean / clip_std replaced (inside their logical-axis boxes, if any)."""

    def put(old, value):
        value = jnp.asarray(value, jnp.float32).reshape(jnp.shape(getattr(old, "value", old)))
        return old.replace_boxed(value) if hasattr(old, "replace_boxed") else value

    return dict(
        params, clip_mean=put(params["clip_mean"], mean), clip_std=put(params["clip_std"], std)
    )


def diffusion_loss(module, diffusion, text_drop: float):
    """loss(params, batch, rng) of the diffusion prior: the simple loss on the latents, with
    the text dropped for a `text_drop` fraction of examples."""

    def loss(params, batch, rng):
        drop_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 4)
        latents = module.apply(
            {"params": jax.lax.stop_gradient(params)},
            batch["image_embeds"],
            method=PriorTransformer.normalize_latents,
        )
        batch_size = latents.shape[0]
        keep = jax.random.uniform(drop_rng, (batch_size,)) >= text_drop
        text_embed = batch["text_embed"] * keep[:, None]
        text_tokens = batch["text_tokens"] * keep[:, None, None]
        text_mask = batch["text_mask"] * keep[:, None]

        def model_fn(x_t, t):
            return module.apply(
                {"params": params},
                x_t,
                t,
                text_embed,
                text_tokens,
                text_mask,
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )

        t = diffusion.sample_timesteps(t_rng, batch_size)
        noise = jax.random.normal(noise_rng, latents.shape, latents.dtype)
        losses = diffusion.training_losses(model_fn, latents, t, noise)
        return losses["loss"].mean(), {"mse": losses["mse"].mean()}

    return loss


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    train = embeddings.training_split(config)
    mean, std = latent_stats(config.data, train["image_embeds"])
    module = build.module(config)

    def init_params(rng):
        return with_latent_stats(init_prior(module, rng)["params"], mean, std)

    return Stage(
        "prior",
        init_params,
        diffusion_loss(module, build.diffusion(config), config.data.text_drop),
        embeddings.shuffled_batches(train, config.seed),
        functools.partial(embeddings.prior_batch_spec, config.model),
    )
