"""Sampling clipgen's diffusion stages, each one function traced into one program (call
them under `jax.jit`): the diffusion prior (captions' CLIP text conditioning -> CLIP image
embeddings, classifier-free guidance as one doubled batch, best-of-N as N candidates per
caption in the same batch), the decoder (guided on the CLIP image embedding and the text
together, as unCLIP's decoder guidance), the upsamplers (the low-resolution image) and
unconditional UNets.
Training previews, the stage evaluators and the pipelines all sample through here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen import build
from clipgen.data import degrade
from clipgen.diffusion import samplers
from clipgen.diffusion.gaussian import Diffusion
from clipgen.models.decoder import Decoder
from clipgen.models.prior import PriorTransformer
from clipgen.models.unet import UNet
from clipgen.models.upsampler import Upsampler, from_target, target_range

# --- the decoder and the upsamplers -------------------------------------------------------------

# The decoder's condition: image_embed (B, D), text (B, L, C) CLIP token encodings,
# text_mask (B, L), text_embed (B, D_text).
DecoderCondition = dict[str, jax.Array]


def decoder_condition(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder's condition fields from a split's embedding arrays
    (clipgen.data.embeddings.load_split)."""
    return {
        "image_embed": arrays["image_embeds"],
        "text": arrays["text_tokens"],
        "text_mask": arrays["text_mask"],
        "text_embed": arrays["text_embed"],
    }


def decoder_model_fn(
    module: Decoder,
    params: Any,
    guidance_scale: float,
    cond: DecoderCondition,
    uncond: DecoderCondition | None = None,
):
    """model_fn(x_t, t) of the decoder, guided by `guidance_scale` (1: no guidance) against
    its output for `uncond`: by default `cond` with both the image embedding and the text
    dropped (clipgen's decoders train with that null); Karlo's is the null image embedding
    with the empty caption's CLIP encodings (`uncond` with drop_image True, drop_text False).
    `cond` may carry `drop_text` (B,) bool for the conditional branch itself (e.g. rendering
    without text); `uncond` carries both drops."""

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
    if uncond is None:
        uncond = dict(cond, drop_image=jnp.ones((batch,), bool), drop_text=jnp.ones((batch,), bool))
    channels = module.config.unet.out_channels
    guided = 3 if channels == 6 else None  # a learned-range model: guide the prediction only
    return samplers.classifier_free_guidance(
        model_fn, kept, [(uncond, guidance_scale)], guided_channels=guided
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
    noise: samplers.StepNoise | None = None,
    uncond: DecoderCondition | None = None,
    clip: float | None = None,
) -> jax.Array:
    """Images (B, size, size, 3) in [-1, 1] from decoder conditions; `x_T` fixes the start
    noise (variations, interpolations, another implementation's draw) and `noise` the
    noise of each step (clipgen.diffusion.samplers.sample); `uncond` is the guidance's null
    (decoder_model_fn); x0 estimates are clamped to +-`clip` (None: 1)."""
    noise_rng, step_rng = jax.random.split(rng)
    batch = cond["image_embed"].shape[0]
    if x_T is None:
        x_T = jax.random.normal(noise_rng, (batch, image_size, image_size, 3))
    model_fn = decoder_model_fn(module, params, guidance_scale, cond, uncond)
    clip = 1.0 if clip is None else clip
    return samplers.sample(
        diffusion, model_fn, x_T, step_rng, method=method, eta=eta, clip=clip, noise=noise
    )


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
    x_T: jax.Array | None = None,
    noise: samplers.StepNoise | None = None,
    clip: float | None = None,
    last_step_params: Any = None,
    condition_blur: float = 0.0,
) -> jax.Array:
    """(B, size, size, 3) in [-1, 1] from low-resolution images (B, h, w, 3) in [-1, 1];
    `x_T` and `noise` as for the decoder; x0 estimates clamped to +-`clip` (None: the
    target's range); `last_step_params` run the last step (Karlo's super_res_last);
    `condition_blur` > 0 blurs the low-resolution images first with the gaussian of that
    sigma (clipgen.data.degrade.gaussian_blur), as an upsampler trained on blurred inputs
    saw them."""
    noise_rng, step_rng = jax.random.split(rng)
    if condition_blur:
        low_res = degrade.gaussian_blur(low_res, condition_blur)
    if x_T is None:
        x_T = jax.random.normal(noise_rng, (low_res.shape[0], image_size, image_size, 3))

    def model_fn(x_t, t, weights=params):
        return module.apply({"params": weights}, x_t, t, low_res)

    final_fn = None
    if last_step_params is not None:
        final_fn = lambda x_t, t: model_fn(x_t, t, last_step_params)  # noqa: E731
    clip = target_range(module.config) if clip is None else clip
    target = samplers.sample(
        diffusion,
        model_fn,
        x_T,
        step_rng,
        method=method,
        eta=eta,
        clip=clip,
        noise=noise,
        final_model_fn=final_fn,
    )
    return from_target(module.config, target, low_res)


def sample_unet(
    module: UNet,
    params: Any,
    diffusion: Diffusion,
    rng: jax.Array,
    count: int,
    image_size: int,
    *,
    method: str = "ddim",
    eta: float = 0.0,
) -> jax.Array:
    """`count` images (count, size, size, 3) in [-1, 1] from an unconditional UNet."""
    noise_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, (count, image_size, image_size, module.config.in_channels))

    def model_fn(x_t, t):
        return module.apply({"params": params}, x_t, t)

    return samplers.sample(diffusion, model_fn, x_T, step_rng, method=method, eta=eta, clip=1.0)


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8, rounded."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# --- the diffusion prior ----------------------------------------------------------------------

PriorCondition = dict[str, jax.Array]  # text_embed (B, D), text_tokens (B, L, C), text_mask (B, L)


def null_condition(cond: PriorCondition) -> PriorCondition:
    """The dropped-text condition clipgen's priors train with: a zero text embedding and
    every token masked out (and zeroed)."""
    return {
        "text_embed": jnp.zeros_like(cond["text_embed"]),
        "text_tokens": jnp.zeros_like(cond["text_tokens"]),
        "text_mask": jnp.zeros_like(cond["text_mask"]),
    }


def select_best(candidates: jax.Array, text_embed: jax.Array) -> jax.Array:
    """(B, N, D) candidate image embeddings -> (B, D): per caption the candidate with the
    largest dot product with its text embedding (B, D)."""
    scores = jnp.einsum("bnd,bd->bn", candidates, text_embed.astype(candidates.dtype))
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(candidates, best[:, None, None], axis=1)[:, 0]


def sample_prior(
    module: PriorTransformer,
    params: Any,
    diffusion: Diffusion,
    cond: PriorCondition,
    rng: jax.Array,
    *,
    guidance_scale: float = 1.0,
    best_of: int = 1,
    method: str = "ddpm",
    eta: float = 0.0,
    clip_denoised: float | None = None,
    uncond: PriorCondition | None = None,
    return_candidates: bool = False,
    x_T: jax.Array | None = None,
    noise: samplers.StepNoise | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """CLIP image embeddings (B, D) for a batch of text conditions, in CLIP's space (the
    prior's latents passed through `post_process_latents`).

    `diffusion` is the (respaced) process to run; `uncond` is the guidance's unconditional
    input (default `null_condition`; the diffusers pipelines use the empty caption's CLIP
    encodings for Karlo's prior). `clip_denoised` clamps the predicted x0 to +-value in the
    prior's latent space (Karlo's pipeline: 5). With `return_candidates`, also the (B, N, D)
    draws. `x_T` (B * N, D) fixes the starting latents and `noise` each step's noise
    (clipgen.diffusion.samplers.sample), the N draws of a caption being adjacent rows.
    Call it under `jax.jit`; inputs sharded over the batch keep the program batch-parallel.
    """
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    text_embed = cond["text_embed"]
    batch = text_embed.shape[0]
    repeated = jax.tree_util.tree_map(lambda a: jnp.repeat(a, best_of, axis=0), cond)

    def model_fn(x_t, t, condition):
        return module.apply(
            {"params": params},
            x_t,
            t,
            condition["text_embed"],
            condition["text_tokens"],
            condition["text_mask"],
        )

    if guidance_scale == 1.0:
        denoise = lambda x_t, t: model_fn(x_t, t, repeated)  # noqa: E731
    else:
        null = uncond if uncond is not None else null_condition(cond)
        null = jax.tree_util.tree_map(lambda a: jnp.repeat(a, best_of, axis=0), null)
        denoise = samplers.classifier_free_guidance(model_fn, repeated, [(null, guidance_scale)])

    noise_rng, step_rng = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(noise_rng, (batch * best_of, module.config.embedding_dim))
    latents = samplers.sample(
        diffusion, denoise, x_T, step_rng, method=method, eta=eta, clip=clip_denoised, noise=noise
    )
    embeds = module.apply({"params": params}, latents, method=PriorTransformer.post_process_latents)
    candidates = embeds.reshape(batch, best_of, -1)
    chosen = select_best(candidates, text_embed)
    return (chosen, candidates) if return_candidates else chosen


# --- jitted samplers of a stage's config --------------------------------------------------------


def prior_sampler(config: ml_collections.ConfigDict, module: PriorTransformer) -> Callable:
    """sample(params, cond, rng) -> image embeddings, as `config.sample` says; jitted."""
    settings = config.sample
    return jax.jit(
        functools.partial(
            sample_prior,
            module,
            diffusion=build.diffusion(config, settings.respacing),
            guidance_scale=settings.guidance_scale,
            best_of=settings.best_of,
            method=settings.method,
            eta=settings.eta,
            clip_denoised=settings.clip_denoised,
        ),
    )


def image_sampler(
    config: ml_collections.ConfigDict, module: Decoder | Upsampler
) -> Callable[[Any, Any, jax.Array], np.ndarray]:
    """draw(params, condition, rng) -> uint8 images (host arrays) of a decoder (condition:
    a DecoderCondition) or an upsampler (condition: low-resolution images in [-1, 1]),
    sampled as `config.sample` says, at `config.data.resolution`; jitted."""
    settings = config.sample
    diffusion = build.diffusion(config, settings.respacing)
    size = config.data.resolution
    if config.stage == "decoder":

        def sample(params, condition, rng):
            return sample_decoder(
                module,
                params,
                diffusion,
                condition,
                rng,
                size,
                guidance_scale=settings.guidance_scale,
                method=settings.method,
            )

    else:

        def sample(params, condition, rng):
            return sample_upsampler(
                module,
                params,
                diffusion,
                condition,
                rng,
                size,
                method=settings.method,
                eta=settings.eta,
                condition_blur=settings.get("condition_blur", 0.0),
            )

    program = jax.jit(sample)
    return lambda params, condition, rng: np.asarray(to_uint8(program(params, condition, rng)))
