"""pOps operator stage: a diffusion prior fine-tuned to map input image embeddings (and an
instruction's tokens) to the embedding of the composed result (clipgen.operators).

It starts from any prior: a clipgen prior run, a converted diffusers PriorTransformer
directory (Kandinsky 2.2's, pOps' base), optionally with an operator's state dict (pOps'
learned_prior.pth) over it; the prior's normalisation statistics stay frozen. The loss is
pOps': x0 MSE in the prior's normalised space, per-input and all-input drops, shuffled
input order for union, and for instruct `clip_loss_weight * (1 - cos)` between the output
and the CLIP text embedding of the target's caption. LoRA adapters or only the first k
blocks can be trained instead of the whole prior.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from clipgen import build, lora, operators
from clipgen.checkpoint import check_compatible
from clipgen.data import embeddings
from clipgen.models.prior import PriorTransformer, init_prior
from clipgen.train.loop import Stage
from clipgen.weights import load_prior, load_prior_state_dict

SYNTHETIC_TEXT_TOKENS = 4
# What pOps' "<k>_layers" mode leaves frozen besides the blocks from k on.
_FROZEN_OUTSIDE_BLOCKS = (
    "time_embed_in/.*",
    "time_embed_out/.*",
    "output_norm/.*",
    "output_proj/.*",
)


def initial_prior(config: ml_collections.ConfigDict, module: PriorTransformer) -> dict[str, Any]:
    """The prior params to fine-tune (host arrays): `config.init.prior` is a clipgen prior
    run or a diffusers PriorTransformer directory, whose model must be config.model's;
    `config.init.weights`, if set, an operator state dict loaded over it."""
    source = Path(config.init.prior)
    if (source / "checkpoints").is_dir():
        trained = build.restore(source)
        meta = {"stage": trained.config.get("stage", "?")}
        check_compatible(trained.config.to_dict(), _model_only(config), meta, source)
        params = trained.params
    elif (source / "config.json").is_file():
        loaded, variables = load_prior(source)
        params = variables["params"]
        if loaded.config != module.config:
            raise ValueError(
                f"config.init.prior {source}: its PriorTransformer is {loaded.config}, "
                f"config.model describes {module.config}; set config.model to the checkpoint's"
            )
    else:
        raise FileNotFoundError(
            f"config.init.prior={str(source)!r} is neither a clipgen prior run (no checkpoints/) "
            "nor a diffusers PriorTransformer directory (no config.json)"
        )
    if config.init.weights:
        params = load_prior_state_dict(config.init.weights, module, params)["params"]
    return jax.tree_util.tree_map(np.asarray, params)


def _model_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": config.model.to_dict()})


def frozen_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What the stage never trains: the base prior under LoRA, or with `train_blocks` = k
    the blocks from k on and the time embedding and output layers (pOps' k-layers mode)."""
    if config.lora.rank:
        return ("base/.*",)
    if config.train_blocks:
        later = range(config.train_blocks, config.model.layers)
        return (*_FROZEN_OUTSIDE_BLOCKS, *(f"block_{i}/.*" for i in later))
    return ()


def operator_loss(module: PriorTransformer, diffusion, spec: operators.OperatorSpec, alpha):
    """loss(params, batch, rng): pOps' objective (see the module docstring)."""

    def loss(params, batch, rng):
        prior = lora.merge(params["base"], params["lora"], alpha) if alpha else params
        drop_rng, all_rng, order_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 6)
        mean = jax.lax.stop_gradient(prior["clip_mean"])
        std = jax.lax.stop_gradient(prior["clip_std"])
        inputs = operators.normalize(batch["inputs"], mean[:, None], std[:, None])
        target = operators.normalize(batch["target"], mean, std)
        size, count = inputs.shape[:2]
        dropped = jax.random.uniform(drop_rng, (size, count)) < jnp.asarray(
            spec.drop or (0.0,) * count
        )
        dropped |= (jax.random.uniform(all_rng, (size,)) < spec.drop_all)[:, None]
        if spec.swap:
            order = jnp.argsort(jax.random.uniform(order_rng, (size, count)), axis=1)
            inputs = jnp.take_along_axis(inputs, order[:, :, None], axis=1)
            dropped = jnp.take_along_axis(dropped, order, axis=1)
        cond = operators.condition(
            inputs,
            module,
            dropped=dropped,
            text_states=batch.get("text_tokens"),
            text_mask=batch.get("text_mask"),
        )

        def model_fn(x_t, t):
            return module.apply(
                {"params": prior},
                x_t,
                t,
                cond["text_embed"],
                cond["text_tokens"],
                cond["text_mask"],
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )

        t = diffusion.sample_timesteps(t_rng, size)
        noise = jax.random.normal(noise_rng, target.shape, target.dtype)
        with_clip = spec.clip_loss_weight > 0
        losses = diffusion.training_losses(model_fn, target, t, noise, with_x0=with_clip)
        total, metrics = losses["loss"].mean(), {"mse": losses["mse"].mean()}
        if with_clip:
            output = _unit(operators.unnormalize(losses["pred_x0"], mean, std))
            cosine = jnp.sum(output * _unit(batch["target_text"]), axis=-1)
            metrics["clip_loss"] = jnp.mean(1.0 - cosine)
            total = total + spec.clip_loss_weight * metrics["clip_loss"]
        return total, metrics

    return loss


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def training_data(config: ml_collections.ConfigDict, spec: operators.OperatorSpec):
    """The training examples: the operator's train shards (CLIP embeddings L2-normalised
    when config.data.normalize), or random ones for data.embeddings == "synthetic"."""
    data, model = config.data, config.model
    if data.embeddings == "synthetic":
        rng = np.random.default_rng(data.seed)
        count, dim = int(data.num_examples["train"]), model.embedding_dim
        arrays = {
            "inputs": rng.standard_normal((count, spec.inputs, dim)).astype(np.float32),
            "target": rng.standard_normal((count, dim)).astype(np.float32),
        }
        if spec.text:
            shape = (count, SYNTHETIC_TEXT_TOKENS, model.text_token_dim)
            arrays["text_tokens"] = rng.standard_normal(shape).astype(np.float32)
            arrays["text_mask"] = np.ones((count, SYNTHETIC_TEXT_TOKENS), np.int32)
            arrays["target_text"] = rng.standard_normal((count, dim)).astype(np.float32)
        if data.normalize:
            arrays["inputs"] = _l2(arrays["inputs"])
            arrays["target"] = _l2(arrays["target"])
    else:
        shards = embeddings.EmbeddingShards(embeddings.embedding_dir(data, "train"), "train")
        text_fields = ("text_tokens", "text_mask", "target_text") if spec.text else ()
        shards.require(("inputs", "target", *text_fields), f"the {config.operator} operator")
        arrays = {k: v for k, v in shards.arrays().items() if k != "ids"}
        if data.normalize:
            arrays["inputs"] = shards.unit(arrays, "inputs")
            arrays["target"] = shards.unit(arrays, "target")
    return {
        name: np.asarray(value, np.int32 if name == "text_mask" else np.float32)
        for name, value in arrays.items()
    }


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    spec = operators.spec(config.operator)
    module = build.prior_module(config)
    train = training_data(config, spec)
    rank, alpha = config.lora.rank, config.lora.alpha

    def init_params(rng):
        prior_rng, lora_rng = jax.random.split(rng)
        prior = init_prior(module, prior_rng)["params"]
        if not rank:
            return prior
        adapters = lora.init(nn.meta.unbox(prior), config.lora.targets, rank, lora_rng)
        return {"base": prior, "lora": adapters}

    def pretrained():
        prior = initial_prior(config, module)
        if not rank:
            return prior
        adapters = lora.init(prior, config.lora.targets, rank, jax.random.key(config.seed))
        return {"base": prior, "lora": jax.tree_util.tree_map(np.asarray, adapters)}

    def batch_spec(global_batch_size: int):
        return {
            name: jax.ShapeDtypeStruct((global_batch_size, *value.shape[1:]), value.dtype)
            for name, value in train.items()
        }

    return Stage(
        "operator",
        init_params,
        operator_loss(module, build.diffusion(config), spec, alpha if rank else 0.0),
        embeddings.shuffled_batches(train, config.seed),
        batch_spec,
        pretrained=None if config.init.prior == "random" else pretrained,
        frozen=frozen_patterns(config),
    )
