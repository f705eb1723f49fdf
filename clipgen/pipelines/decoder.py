"""Sampling the decoder and the upsamplers: one scan over the respaced steps each, with
classifier-free guidance for the decoder (on the CLIP image embedding and the text
together, as unCLIP's decoder guidance), and the low-resolution image for the upsamplers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clipgen.diffusion import samplers
from clipgen.diffusion.gaussian import Diffusion
from clipgen.models.decoder import Decoder
from clipgen.models.upsampler import Upsampler, from_target, target_range

# The decoder's condition: image_embed (B, D), text (B, L, C) CLIP token encodings,
# text_mask (B, L), text_embed (B, D_text).
DecoderCondition = dict[str, jax.Array]


def decoder_model_fn(module: Decoder, params: Any, guidance_scale: float, cond: DecoderCondition):
    """model_fn(x_t, t) of the decoder: guided by `guidance_scale` against the output with
    both the image embedding and the text dropped (scale 1: no guidance). `cond` may carry
    `drop_text` (B,) bool for the conditional branch itself (e.g. rendering without text)."""

    def model_fn(x_t, t, condition):
        return module.apply(
            {"params": params},
            x_t,
            t,
            condition["image_embed"],
            condition["text"],
            condition["text_mask"],
            condition["text_embed"],
            drop_image=condition["drop_image"],
            drop_text=condition["drop_text"],
        )

    batch = cond["image_embed"].shape[0]
    kept = dict(cond, drop_image=jnp.zeros((batch,), bool))
    kept.setdefault("drop_text", jnp.zeros((batch,), bool))
    if guidance_scale == 1.0:
        return lambda x_t, t: model_fn(x_t, t, kept)
    dropped = dict(cond, drop_image=jnp.ones((batch,), bool), drop_text=jnp.ones((batch,), bool))
    channels = module.config.unet.out_channels
    guided = 3 if channels == 6 else None  # a learned-range model: guide the prediction only
    return samplers.classifier_free_guidance(
        model_fn, kept, [(dropped, guidance_scale)], guided_channels=guided
    )


def sample_decoder(
    module: Decoder,
    params: Any,
    diffusion: Diffusion,
    cond: DecoderCondition,
    rng: jax.Array,
    image_size: int,
    *,
    guidance_scale: float = 1.0,
    method: str = "ddpm",
    eta: float = 0.0,
    x_T: jax.Array | None = None,
) -> jax.Array:
    """Images (B, size, size, 3) in [-1, 1] from decoder conditions; `x_T` fixes the start
    noise (variations, interpolations)."""
    noise_rng, step_rng = jax.random.split(rng)
    batch = cond["image_embed"].shape[0]
    if x_T is None:
        x_T = jax.random.normal(noise_rng, (batch, image_size, image_size, 3))
    model_fn = decoder_model_fn(module, params, guidance_scale, cond)
    return samplers.sample(diffusion, model_fn, x_T, step_rng, method=method, eta=eta, clip=1.0)


def sample_upsampler(
    module: Upsampler,
    params: Any,
    diffusion: Diffusion,
    low_res: jax.Array,
    rng: jax.Array,
    image_size: int,
    *,
    method: str = "ddim",
    eta: float = 0.0,
) -> jax.Array:
    """(B, size, size, 3) in [-1, 1] from low-resolution images (B, h, w, 3) in [-1, 1]."""
    noise_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, (low_res.shape[0], image_size, image_size, 3))

    def model_fn(x_t, t):
        return module.apply({"params": params}, x_t, t, low_res)

    clip = target_range(module.config)
    target = samplers.sample(diffusion, model_fn, x_T, step_rng, method=method, eta=eta, clip=clip)
    return from_target(module.config, target, low_res)


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8, rounded."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
