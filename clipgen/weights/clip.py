"""CLIP weights from transformers (`save_pretrained` of `CLIPModel`,
`CLIPVisionModelWithProjection`, `CLIPTextModelWithProjection`) and from the OpenAI /
open_clip state-dict layout, read from safetensors into clipgen's `CLIP` params.

Loading is strict: every checkpoint tensor must land in a clipgen parameter and every
parameter must be filled, with matching, finite, floating-point values; otherwise an
InputError names the file and the keys. A config field of the wrong type is an InputError
naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipgen.data.json_input import (
    INT,
    NUMBER,
    POSITIVE_INT,
    STR,
    Fields,
    optional,
    read_json_object,
)
from clipgen.errors import InputError
from clipgen.models.clip import CLIP, TextConfig, VisionConfig, init_clip
from clipgen.weights.convert import Rule, fill_params, norm_rules, read_safetensors, read_weights

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Buffers transformers and OpenAI store beside the weights; they hold no learned values.
_HF_IGNORED_SUFFIXES = ("position_ids",)
_OPENAI_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_IGNORED_SUFFIXES = ("attn_mask",)


# --- configs -------------------------------------------------------------------------------


def _vision_from_hf(cfg: Fields) -> VisionConfig:
    return _config(
        VisionConfig,
        cfg,
        image_size=cfg.get("image_size", 224, POSITIVE_INT),
        patch_size=cfg.get("patch_size", 32, POSITIVE_INT),
        width=cfg.get("hidden_size", 768, POSITIVE_INT),
        layers=cfg.get("num_hidden_layers", 12, POSITIVE_INT),
        heads=cfg.get("num_attention_heads", 12, POSITIVE_INT),
        mlp_dim=cfg.get("intermediate_size", 3072, POSITIVE_INT),
        act=cfg.get("hidden_act", "quick_gelu", STR),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5, NUMBER),
        channels=cfg.get("num_channels", 3, POSITIVE_INT),
    )


def _text_from_hf(cfg: Fields) -> TextConfig:
    return _config(
        TextConfig,
        cfg,
        vocab_size=cfg.get("vocab_size", 49408, POSITIVE_INT),
        context_length=cfg.get("max_position_embeddings", 77, POSITIVE_INT),
        width=cfg.get("hidden_size", 512, POSITIVE_INT),
        layers=cfg.get("num_hidden_layers", 12, POSITIVE_INT),
        heads=cfg.get("num_attention_heads", 8, POSITIVE_INT),
        mlp_dim=cfg.get("intermediate_size", 2048, POSITIVE_INT),
        act=cfg.get("hidden_act", "quick_gelu", STR),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5, NUMBER),
        eos_token_id=cfg.get("eos_token_id", 49407, INT),
        pad_token_id=cfg.get("pad_token_id", 1, optional(INT)),
    )


def _config(cls: type, cfg: Fields, **values: Any) -> Any:
    """cls(**values), its own checks (heads dividing the width, ...) failing as InputErrors
    naming the file."""
    try:
        return cls(**values)
    except ValueError as error:
        raise cfg.error(str(error)) from None


def clip_config_from_hf(
    config: dict[str, Any], source: str = "config.json"
) -> tuple[VisionConfig | None, TextConfig | None, int, float]:
    """(vision, text, projection_dim, logit_scale_init) from a transformers CLIP config.json
    dict of model_type "clip", "clip_vision_model" or "clip_text_model"; missing fields take
    transformers' defaults, and a field of the wrong type raises an InputError naming
    `source` (the file) and the field."""
    fields = Fields(config, source)
    model_type = fields.get("model_type", None, optional(STR))
    if model_type is None:
        model_type = "clip" if "vision_config" in config or "text_config" in config else ""
    projection_dim = fields.get("projection_dim", 512, POSITIVE_INT)
    logit_scale_init = float(fields.get("logit_scale_init_value", math.log(1 / 0.07), NUMBER))
    if model_type == "clip":
        vision = fields.section("vision_config", "vision_config_dict")
        text = fields.section("text_config", "text_config_dict")
        return _vision_from_hf(vision), _text_from_hf(text), projection_dim, logit_scale_init
    if model_type == "clip_vision_model":
        return _vision_from_hf(fields), None, projection_dim, logit_scale_init
    if model_type == "clip_text_model":
        return None, _text_from_hf(fields), projection_dim, logit_scale_init
    raise InputError(
        f"{source} has model_type {model_type!r}; expected 'clip', 'clip_vision_model' or "
        "'clip_text_model' (a transformers CLIP checkpoint)"
    )


# --- name maps ----------------------------------------------------------------------------


def _hf_block_rules(prefix: str, tower: str, layers: int) -> Iterable[Rule]:
    for i in range(layers):
        src, dst = f"{prefix}encoder.layers.{i}.", (tower, f"block_{i}")
        for hf_norm, norm in (("layer_norm1", "attn_norm"), ("layer_norm2", "mlp_norm")):
            yield Rule(f"{src}{hf_norm}.weight", "copy", (dst + (norm, "scale"),))
            yield Rule(f"{src}{hf_norm}.bias", "copy", (dst + (norm, "bias"),))
        linears = (
            ("self_attn.q_proj", ("attn", "query")),
            ("self_attn.k_proj", ("attn", "key")),
            ("self_attn.v_proj", ("attn", "value")),
            ("self_attn.out_proj", ("attn", "out")),
            ("mlp.fc1", ("mlp", "fc1")),
            ("mlp.fc2", ("mlp", "fc2")),
        )
        for hf_linear, linear in linears:
            yield Rule(f"{src}{hf_linear}.weight", "linear", (dst + linear + ("kernel",),))
            yield Rule(f"{src}{hf_linear}.bias", "copy", (dst + linear + ("bias",),))


def _hf_rules(vision: VisionConfig | None, text: TextConfig | None) -> list[Rule]:
    rules: list[Rule] = []
    if vision is not None:
        v, tower = "vision_model.", ("vision_tower",)
        embeddings = f"{v}embeddings."
        patch_kernel = tower + ("patch_embed", "kernel")
        rules += [
            Rule(f"{embeddings}patch_embedding.weight", "conv", (patch_kernel,)),
            Rule(f"{embeddings}class_embedding", "copy", (tower + ("class_embed",),)),
            Rule(f"{embeddings}position_embedding.weight", "copy", (tower + ("position_embed",),)),
            *norm_rules(f"{v}pre_layrnorm", tower + ("pre_norm",)),
            *_hf_block_rules(v, "vision_tower", vision.layers),
            *norm_rules(f"{v}post_layernorm", tower + ("post_norm",)),
            Rule("visual_projection.weight", "linear", (("visual_projection", "kernel"),)),
        ]
    if text is not None:
        t, tower = "text_model.", ("text_tower",)
        embeddings = f"{t}embeddings."
        token_embed = tower + ("token_embed", "embedding")
        rules += [
            Rule(f"{embeddings}token_embedding.weight", "copy", (token_embed,)),
            Rule(f"{embeddings}position_embedding.weight", "copy", (tower + ("position_embed",),)),
            *_hf_block_rules(t, "text_tower", text.layers),
            *norm_rules(f"{t}final_layer_norm", tower + ("final_norm",)),
            Rule("text_projection.weight", "linear", (("text_projection", "kernel"),)),
        ]
    if vision is not None and text is not None:
        rules.append(Rule("logit_scale", "copy", (("logit_scale",),)))
    return rules


def _openai_block_rules(prefix: str, tower: str, layers: int) -> Iterable[Rule]:
    for i in range(layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", (tower, f"block_{i}")
        attn = dst + ("attn",)
        qkv = ("query", "key", "value")
        yield from norm_rules(f"{src}ln_1", dst + ("attn_norm",))
        yield Rule(f"{src}attn.in_proj_weight", "in_proj", tuple(attn + (n, "kernel") for n in qkv))
        yield Rule(f"{src}attn.in_proj_bias", "in_proj", tuple(attn + (n, "bias") for n in qkv))
        yield Rule(f"{src}attn.out_proj.weight", "linear", (attn + ("out", "kernel"),))
        yield Rule(f"{src}attn.out_proj.bias", "copy", (attn + ("out", "bias"),))
        yield from norm_rules(f"{src}ln_2", dst + ("mlp_norm",))
        for openai_linear, linear in (("c_fc", "fc1"), ("c_proj", "fc2")):
            yield Rule(
                f"{src}mlp.{openai_linear}.weight", "linear", (dst + ("mlp", linear, "kernel"),)
            )
            yield Rule(f"{src}mlp.{openai_linear}.bias", "copy", (dst + ("mlp", linear, "bias"),))


def _openai_rules(vision: VisionConfig | None, text: TextConfig | None) -> list[Rule]:
    rules: list[Rule] = []
    if vision is not None:
        tower = ("vision_tower",)
        rules += [
            Rule("visual.conv1.weight", "conv", (tower + ("patch_embed", "kernel"),)),
            Rule("visual.class_embedding", "copy", (tower + ("class_embed",),)),
            Rule("visual.positional_embedding", "copy", (tower + ("position_embed",),)),
            *norm_rules("visual.ln_pre", tower + ("pre_norm",)),
            *_openai_block_rules("visual.", "vision_tower", vision.layers),
            *norm_rules("visual.ln_post", tower + ("post_norm",)),
            Rule("visual.proj", "copy", (("visual_projection", "kernel"),)),
        ]
    if text is not None:
        tower = ("text_tower",)
        rules += [
            Rule("token_embedding.weight", "copy", (tower + ("token_embed", "embedding"),)),
            Rule("positional_embedding", "copy", (tower + ("position_embed",),)),
            *_openai_block_rules("", "text_tower", text.layers),
            *norm_rules("ln_final", tower + ("final_norm",)),
            Rule("text_projection", "copy", (("text_projection", "kernel"),)),
        ]
    if vision is not None and text is not None:
        rules.append(Rule("logit_scale", "copy", (("logit_scale",),)))
    return rules


# --- loading -------------------------------------------------------------------------------


def _fill_clip(
    module: CLIP,
    rules: list[Rule],
    tensors: dict,
    ignored: Callable[[str], bool],
    source: str,
    origins: dict[str, str] | None = None,
) -> dict[str, Any]:
    abstract = jax.eval_shape(lambda rng: nn.meta.unbox(init_clip(module, rng)), jax.random.key(0))
    target = (
        f"CLIP(vision={module.vision}, text={module.text}, projection_dim={module.projection_dim})"
    )
    return fill_params(abstract["params"], rules, tensors, ignored, source, target, origins)


def load_clip(path: str | Path, dtype: Any = jnp.float32) -> tuple[CLIP, dict[str, Any]]:
    """(module, params) from a transformers CLIP directory (config.json, model.safetensors
    or a sharded checkpoint's model.safetensors.index.json); params are plain float32 arrays
    shaped like `nn.meta.unbox(init_clip(module, rng))`. A damaged or mismatched directory
    raises an InputError naming the file."""
    path = Path(path)
    config_path = path / "config.json"
    config = read_json_object(config_path, "a transformers CLIP config (save_pretrained)")
    vision, text, projection_dim, logit_scale_init = clip_config_from_hf(config, str(config_path))
    module = CLIP(vision, text, projection_dim, logit_scale_init, dtype=dtype)
    tensors, source, origins = read_weights(path, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    params = _fill_clip(
        module,
        _hf_rules(vision, text),
        tensors,
        lambda key: key.endswith(_HF_IGNORED_SUFFIXES),
        source,
        origins,
    )
    return module, params


def load_clip_towers(
    text_path: str | Path, vision_path: str | Path, dtype: Any = jnp.float32
) -> tuple[CLIP, dict[str, Any]]:
    """(module, params) of one CLIP from the separate towers a pipeline keeps (Kandinsky
    2.2's `text_encoder`, a CLIPTextModelWithProjection, and `image_encoder`, a
    CLIPVisionModelWithProjection), which must project to one width. The logit scale,
    which neither holds, is CLIP's initial log(1 / 0.07)."""
    text_module, text_params = load_clip(text_path, dtype)
    vision_module, vision_params = load_clip(vision_path, dtype)
    if text_module.text is None or vision_module.vision is None:
        raise InputError(f"{text_path} must hold a CLIP text tower and {vision_path} a vision one")
    if text_module.projection_dim != vision_module.projection_dim:
        raise InputError(
            f"the towers project to {text_module.projection_dim} ({text_path}) and "
            f"{vision_module.projection_dim} ({vision_path}) dimensions; one CLIP needs one"
        )
    module = CLIP(vision_module.vision, text_module.text, text_module.projection_dim, dtype=dtype)
    params = {**text_params["params"], **vision_params["params"]}
    params["logit_scale"] = jnp.asarray(module.logit_scale_init, jnp.float32)
    return module, {"params": params}


def load_openai_clip(
    safetensors_path: str | Path,
    vision: VisionConfig | None,
    text: TextConfig | None,
    projection_dim: int,
    dtype: Any = jnp.float32,
) -> tuple[CLIP, dict[str, Any]]:
    """(module, params) from an OpenAI / open_clip CLIP state dict saved as safetensors.

    OpenAI pools text at argmax(input_ids), its eos id 49407 being the largest; clipgen's
    first-eos pooling agrees when `text.eos_token_id` is `vocab_size - 1`, and the legacy id 2
    selects argmax itself, so any other eos id is refused."""
    if text is not None and text.eos_token_id not in (2, text.vocab_size - 1):
        raise ValueError(
            f"OpenAI CLIP pools text at argmax(input_ids); TextConfig.eos_token_id "
            f"{text.eos_token_id} would pool elsewhere: use vocab_size - 1 "
            f"({text.vocab_size - 1}, OpenAI's eos id) or 2"
        )
    module = CLIP(vision, text, projection_dim, dtype=dtype)
    path = Path(safetensors_path)
    params = _fill_clip(
        module,
        _openai_rules(vision, text),
        read_safetensors(path),
        lambda key: key in _OPENAI_IGNORED_KEYS or key.endswith(_OPENAI_IGNORED_SUFFIXES),
        str(path),
    )
    return module, params
