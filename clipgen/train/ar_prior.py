"""Autoregressive prior stage: next-code cross-entropy over PCA-quantised CLIP image
embeddings, on the same embedding shards as the diffusion prior (and scored by the same
evaluator)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clipgen.models.ar_prior import (
    ARPrior,
    ARPriorConfig,
    dot_bucket,
    fit_statistics,
    init_ar_prior,
    quantize,
    sample_ar_prior,
)
from clipgen.train import prior as prior_stage
from clipgen.train.loop import Stage


def build_model(config: ml_collections.ConfigDict) -> ARPrior:
    model = config.model
    return ARPrior(
        ARPriorConfig(
            width=model.width,
            heads=model.heads,
            layers=model.layers,
            embedding_dim=model.embedding_dim,
            num_codes=model.num_codes,
            num_buckets=model.num_buckets,
            num_dot_buckets=model.num_dot_buckets,
            num_text_tokens=model.num_text_tokens,
            text_token_dim=model.text_token_dim,
        ),
        dtype=jnp.dtype(model.dtype),
    )


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
    train = prior_stage.training_split(config)
    module = build_model(config)
    stats = fit_statistics(train["image_embeds"], train["text_embed"], module.config)

    def init_params(rng):
        params = dict(init_ar_prior(module, rng)["params"])
        for name, value in stats.items():
            old = params[name]
            params[name] = old.replace_boxed(value) if hasattr(old, "replace_boxed") else value
        return jax.tree_util.tree_map(jnp.asarray, params)

    sampler = jax.jit(
        functools.partial(
            sample_ar_prior,
            module,
            top_p=config.sample.top_p,
            dot_range=tuple(config.sample.dot_range),
        )
    )

    def sample(params, cond, rng):
        return sampler(params=params, cond=cond, rng=rng)

    synthetic = config.data.embeddings == "synthetic"
    return Stage(
        "ar_prior",
        init_params,
        ar_loss(module),
        prior_stage.train_batches(config, train),
        functools.partial(prior_stage.batch_spec_for, config),
        evaluate=None if synthetic else prior_stage.make_evaluator(config, sample),
    )
