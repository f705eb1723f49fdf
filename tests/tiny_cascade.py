"""A tiny unCLIP cascade with random weights (every layer non-zero), for the tests that run
the cascade without training it."""

import functools

import jax
import numpy as np
from flax import linen as nn

from clipgen import build, stages
from clipgen.models.clip import init_clip
from clipgen.models.decoder import init_decoder
from clipgen.models.prior import init_prior
from clipgen.models.upsampler import init_upsampler

SIZES = (16, 32, 64)  # decoder, upsamplers (the shapes renderer draws 16 px and up)


def tiny_configs():
    """The tiny presets, the prior's and decoder's dimensions set from the tiny CLIP."""
    configs = {spec.name: spec.config("tiny") for spec in stages.cascade()}
    clip = configs["clip"]
    width, dim, length = clip.model.text.width, clip.model.projection_dim, clip.data.context_length
    configs["prior"].model.update(embedding_dim=dim, text_token_dim=width, num_text_tokens=length)
    configs["decoder"].model.update(clip_embed_dim=dim, text_width=width, num_text_tokens=length)
    configs["decoder"].data.resolution = SIZES[0]
    configs["upsampler"].data.update(resolution=SIZES[1], crop=16)
    configs["upsampler2"].data.update(resolution=SIZES[2], crop=16)
    configs["decoder"].sample.guidance_scale = 2.0
    configs["prior"].sample.guidance_scale = 2.0
    for config in configs.values():
        config.eval_every = 0
        config.total_steps = 2
        config.checkpoint.every = 2
    return configs


def _random_params(init, seed):
    """Random weights for the variables `init()` would make, without running it (no zero-
    initialised layer left, so every stage's output counts): kernels N(0, 1 / fan-in), norm
    scales and the prior's latent std 1 + N(0, 0.05^2), the rest N(0, 0.05^2)."""
    shapes = nn.meta.unbox(jax.eval_shape(init)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        if name in ("scale", "clip_std"):
            return 1.0 + 0.05 * noise
        return 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_cascade():
    """(configs, random params) of a tiny cascade."""
    configs = tiny_configs()
    rng = jax.random.key(0)
    clip, prior, decoder = (build.module(configs[name]) for name in ("clip", "prior", "decoder"))
    inits = {
        "clip": lambda: init_clip(clip, rng),
        "prior": lambda: init_prior(prior, rng),
        "decoder": lambda: init_decoder(decoder, rng, SIZES[0], text_length=8),
    }
    for name in ("upsampler", "upsampler2"):
        size = configs[name].data.resolution
        module = build.module(configs[name])
        inits[name] = functools.partial(init_upsampler, module, rng, size, size // 2)
    return configs, {name: _random_params(init, i) for i, (name, init) in enumerate(inits.items())}
