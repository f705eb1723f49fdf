"""Autoregressive prior stage: next-code cross-entropy over PCA-quantised CLIP image
embeddings, on the same embedding shards as the diffusion prior (and scored by the same
evaluator, `prior_retrieval`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clipgen import build
from clipgen.data import embeddings
from clipgen.models.ar_prior import ARPrior, dot_bucket, fit_statistics, init_ar_prior, quantize
from clipgen.train.loop import Stage


def ar_loss(module: ARPrior):
    """loss(params, batch, rng): mean next-code cross-entropy and code accuracy."""
    cfg = module.config

    def loss(params, batch, rng):
        del rng
        stats = module.apply({"params": params}, method=ARPrior.statistics)
        stats = jax.lax.stop_gradient(stats)
        buckets = quantize(batch["image_embeds"], stats, cfg.num_buckets)
        dots = dot_bucket(batch["image_embeds"], batch["text_embed"], stats["dot_edges"])
        logits = module.apply(
            {"params": params},
            batch["text_embed"],
            batch["text_tokens"],
            batch["text_mask"],
            dots,
            buckets,
        )
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, buckets)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == buckets)
        return cross_entropy.mean(), {"code_accuracy": accuracy}

    return loss


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    train = embeddings.training_split(config)
    module = build.module(config)
    stats = fit_statistics(train["image_embeds"], train["text_embed"], module.config)

    def init_params(rng):
        params = dict(init_ar_prior(module, rng)["params"])
        for name, value in stats.items():
            old = params[name]
            params[name] = old.replace_boxed(value) if hasattr(old, "replace_boxed") else value
        return jax.tree_util.tree_map(jnp.asarray, params)

    return Stage(
        "ar_prior",
        init_params,
        ar_loss(module),
        embeddings.shuffled_batches(train, config.seed),
        functools.partial(embeddings.prior_batch_spec, config.model),
    )
