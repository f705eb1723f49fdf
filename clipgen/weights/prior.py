"""Diffusion-prior weights from diffusers (`PriorTransformer.save_pretrained`: config.json and
diffusion_pytorch_model.safetensors), read into clipgen's `PriorTransformer` params.

Loading is strict: every checkpoint tensor must land in a clipgen parameter and every
parameter must be filled, with matching, finite, floating-point values; otherwise an
InputError names the file and the keys; so does a config field of the wrong type.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clipgen.data.json_input import (
    COUNT,
    NUMBER,
    POSITIVE_INT,
    STR,
    Fields,
    optional,
    read_json_object,
)
from clipgen.errors import InputError
from clipgen.models.prior import (
    PriorConfig,
    PriorTransformer,
    init_prior,
    prior_config_from_diffusers,
)
from clipgen.weights.convert import (
    Rule,
    fill_params,
    linear_rules,
    norm_rules,
    read_torch_state_dict,
    read_weights,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _diffusers_rules(cfg: PriorConfig) -> list[Rule]:
    rules = [
        *linear_rules("time_embedding.linear_1", ("time_embed_in",)),
        *linear_rules("time_embedding.linear_2", ("time_embed_out",)),
        *linear_rules("proj_in", ("noisy_embed_proj",)),
        *linear_rules("embedding_proj", ("text_embed_proj",)),
        Rule("positional_embedding", "copy", (("position_embed",),)),
        *norm_rules("norm_out", ("output_norm",)),
        *linear_rules("proj_to_clip_embeddings", ("output_proj",)),
        Rule("clip_mean", "copy", (("clip_mean",),)),
        Rule("clip_std", "copy", (("clip_std",),)),
    ]
    if cfg.embedding_proj_norm_type is not None:
        rules += norm_rules("embedding_proj_norm", ("text_embed_norm",))
    if cfg.encoder_hid_proj_type is not None:
        rules += linear_rules("encoder_hidden_states_proj", ("text_tokens_proj",))
    if cfg.added_emb_type is not None:
        rules.append(Rule("prd_embedding", "copy", (("query_embed",),)))
    if cfg.norm_in_type is not None:
        rules += norm_rules("norm_in", ("input_norm",))
    for i in range(cfg.num_layers):
        src, dst = f"transformer_blocks.{i}.", (f"block_{i}",)
        rules += [
            *norm_rules(f"{src}norm1", dst + ("attn_norm",)),
            *linear_rules(f"{src}attn1.to_q", dst + ("attn", "query")),
            *linear_rules(f"{src}attn1.to_k", dst + ("attn", "key")),
            *linear_rules(f"{src}attn1.to_v", dst + ("attn", "value")),
            *linear_rules(f"{src}attn1.to_out.0", dst + ("attn", "out")),
            *norm_rules(f"{src}norm3", dst + ("mlp_norm",)),
            *linear_rules(f"{src}ff.net.0.proj", dst + ("mlp", "fc1")),
            *linear_rules(f"{src}ff.net.2", dst + ("mlp", "fc2")),
        ]
    return rules


_PRIOR_KINDS = {
    "int": POSITIVE_INT,
    "float": NUMBER,
    "str": STR,
    "str | None": optional(STR),
    "int | None": optional(POSITIVE_INT),
}
_PRIOR_COUNTS = {"additional_embeddings"}  # may be 0


def prior_config(config: dict[str, Any], source: str = "config.json") -> PriorConfig:
    """A PriorConfig from a diffusers `PriorTransformer` config.json dict, each field's type
    checked (an InputError naming `source` and the field otherwise)."""
    fields = Fields(config, source)
    values = {}
    for field in dataclasses.fields(PriorConfig):
        if field.name == "encoder_hidden_dim" or field.name not in fields:
            continue
        kind = COUNT if field.name in _PRIOR_COUNTS else _PRIOR_KINDS[str(field.type)]
        values[field.name] = fields.get(field.name, None, kind)
    try:
        return prior_config_from_diffusers(values)
    except ValueError as error:
        raise fields.error(str(error)) from None


def load_prior(
    path: str | Path, dtype: Any = jnp.float32
) -> tuple[PriorTransformer, dict[str, Any]]:
    """(module, params) from a diffusers `PriorTransformer` directory (the one holding
    config.json, e.g. a pipeline's `prior/`); params are plain float32 arrays. A damaged or
    mismatched directory raises an InputError naming the file.

    `module.apply(params, hidden_states, timestep, proj_embedding, encoder_hidden_states,
    attention_mask)` then returns diffusers' `predicted_image_embedding`, and
    `module.apply(params, x, method=PriorTransformer.post_process_latents)` its
    `post_process_latents(x)`.
    """
    path = Path(path)
    config_path = path / "config.json"
    config = read_json_object(config_path, "a diffusers PriorTransformer config")
    class_name = config.get("_class_name", "PriorTransformer")
    if class_name != "PriorTransformer":
        raise InputError(
            f"{config_path} describes a {class_name}, not a PriorTransformer (for a pipeline, "
            "pass its prior/ subfolder)"
        )
    module = PriorTransformer(prior_config(config, str(config_path)), dtype=dtype)
    tensors, source, origins = read_weights(path, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    return module, _fill(module, tensors, source, origins)


def load_prior_state_dict(
    path: str | Path, module: PriorTransformer, base_params: dict[str, Any]
) -> dict[str, Any]:
    """{"params": ...} of `module` from a `PriorTransformer` state dict saved with
    `torch.save`, such as pOps' `learned_prior.pth` (its operators' weights, saved without
    `clip_mean` and `clip_std`: those come from `base_params`, the variables or params of
    the prior it was fine-tuned from). Read with `weights_only=True`; a file holding
    anything but tensors is refused."""
    tensors = read_torch_state_dict(path, "a PriorTransformer state dict (pOps' learned_prior.pth)")
    base = base_params.get("params", base_params)
    for name in ("clip_mean", "clip_std"):
        tensors.setdefault(name, np.asarray(base[name]).reshape(1, -1))
    return _fill(module, tensors, str(path))


def _fill(
    module: PriorTransformer,
    tensors: dict[str, Any],
    source: str,
    origins: dict[str, str] | None = None,
) -> dict[str, Any]:
    abstract = jax.eval_shape(lambda rng: nn.meta.unbox(init_prior(module, rng)), jax.random.key(0))
    return fill_params(
        abstract["params"],
        _diffusers_rules(module.config),
        tensors,
        lambda key: False,
        source,
        f"PriorTransformer({module.config})",
        origins,
    )
