"""Sampling the diffusion prior: captions' CLIP text conditioning -> CLIP image embeddings.

One function traced into one program: the reverse process as a scan over the (respaced)
steps, classifier-free guidance as one doubled batch, and best-of-N as N candidates per
caption in the same batch, the one with the largest dot product with the caption's text
embedding kept (unCLIP uses N = 2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clipgen.diffusion import samplers
from clipgen.diffusion.gaussian import Diffusion
from clipgen.models.prior import PriorTransformer

TextCondition = dict[str, jax.Array]  # text_embed (B, D), text_tokens (B, L, C), text_mask (B, L)


def null_condition(cond: TextCondition) -> TextCondition:
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
    cond: TextCondition,
    rng: jax.Array,
    *,
    guidance_scale: float = 1.0,
    best_of: int = 1,
    method: str = "ddpm",
    eta: float = 0.0,
    clip_denoised: float | None = None,
    uncond: TextCondition | None = None,
    return_candidates: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """CLIP image embeddings (B, D) for a batch of text conditions, in CLIP's space (the
    prior's latents passed through `post_process_latents`).

    `diffusion` is the (respaced) process to run; `uncond` is the guidance's unconditional
    input (default `null_condition`; the diffusers pipelines use the empty caption's CLIP
    encodings for Karlo's prior). `clip_denoised` clamps the predicted x0 to +-value in the
    prior's latent space (Karlo: 10). With `return_candidates`, also the (B, N, D) draws.
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
    x_T = jax.random.normal(noise_rng, (batch * best_of, module.config.embedding_dim))
    latents = samplers.sample(
        diffusion, denoise, x_T, step_rng, method=method, eta=eta, clip=clip_denoised
    )
    embeds = module.apply({"params": params}, latents, method=PriorTransformer.post_process_latents)
    candidates = embeds.reshape(batch, best_of, -1)
    chosen = select_best(candidates, text_embed)
    return (chosen, candidates) if return_candidates else chosen
