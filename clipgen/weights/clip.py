"""CLIP weights from transformers (`save_pretrained` of `CLIPModel`,
`CLIPVisionModelWithProjection`, `CLIPTextModelWithProjection`) and from the OpenAI /
open_clip state-dict layout, read from safetensors into clipgen's `CLIP` params.

Loading is strict: every checkpoint tensor must land in a clipgen parameter and every
parameter must be filled, with matching shapes; otherwise a ValueError names the keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util

from clipgen.models.clip import CLIP, TextConfig, VisionConfig, init_clip

ParamPath = tuple[str, ...]

# Buffers transformers and OpenAI store beside the weights; they hold no learned values.
_HF_IGNORED_SUFFIXES = ("position_ids",)
_OPENAI_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_IGNORED_SUFFIXES = ("attn_mask",)
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One checkpoint tensor and the clipgen parameter(s) it fills, by layout:
    "copy" as is, "linear" torch (out, in) -> (in, out), "conv" (out, in, kh, kw) ->
    (kh, kw, in, out), "in_proj" rows [q; k; v] split over three targets (weights transposed)."""

    key: str
    layout: str
    targets: tuple[ParamPath, ...]


def _source_shape(rule: _Rule, target_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    first = target_shapes[0]
    if rule.layout == "copy":
        return first
    if rule.layout == "linear":
        return tuple(reversed(first))
    if rule.layout == "conv":
        kh, kw, cin, cout = first
        return (cout, cin, kh, kw)
    if rule.layout == "in_proj":
        if len(first) == 2:
            return (sum(shape[1] for shape in target_shapes), first[0])
        return (sum(shape[0] for shape in target_shapes),)
    raise AssertionError(rule.layout)


def _convert(rule: _Rule, tensor: np.ndarray) -> list[np.ndarray]:
    if rule.layout == "copy":
        return [tensor]
    if rule.layout == "linear":
        return [tensor.T]
    if rule.layout == "conv":
        return [tensor.transpose(2, 3, 1, 0)]
    if rule.layout == "in_proj":
        parts = np.split(tensor, len(rule.targets), axis=0)
        return [part.T if part.ndim == 2 else part for part in parts]
    raise AssertionError(rule.layout)


# --- configs -------------------------------------------------------------------------------


def _vision_from_hf(cfg: dict[str, Any]) -> VisionConfig:
    return VisionConfig(
        image_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 32),
        width=cfg.get("hidden_size", 768),
        layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 12),
        mlp_dim=cfg.get("intermediate_size", 3072),
        act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        channels=cfg.get("num_channels", 3),
    )


def _text_from_hf(cfg: dict[str, Any]) -> TextConfig:
    return TextConfig(
        vocab_size=cfg.get("vocab_size", 49408),
        context_length=cfg.get("max_position_embeddings", 77),
        width=cfg.get("hidden_size", 512),
        layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 8),
        mlp_dim=cfg.get("intermediate_size", 2048),
        act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        eos_token_id=cfg.get("eos_token_id", 49407),
        pad_token_id=cfg.get("pad_token_id", 1),
    )


def clip_config_from_hf(
    config: dict[str, Any],
) -> tuple[VisionConfig | None, TextConfig | None, int, float]:
    """(vision, text, projection_dim, logit_scale_init) from a transformers CLIP config.json
    dict of model_type "clip", "clip_vision_model" or "clip_text_model"; missing fields take
    transformers' defaults."""
    model_type = config.get("model_type")
    if model_type is None:
        model_type = "clip" if "vision_config" in config or "text_config" in config else ""
    projection_dim = int(config.get("projection_dim", 512))
    logit_scale_init = float(config.get("logit_scale_init_value", math.log(1 / 0.07)))
    if model_type == "clip":
        vision = config.get("vision_config") or config.get("vision_config_dict") or {}
        text = config.get("text_config") or config.get("text_config_dict") or {}
        return _vision_from_hf(vision), _text_from_hf(text), projection_dim, logit_scale_init
    if model_type == "clip_vision_model":
        return _vision_from_hf(config), None, projection_dim, logit_scale_init
    if model_type == "clip_text_model":
        return None, _text_from_hf(config), projection_dim, logit_scale_init
    raise ValueError(
        f"config.json has model_type {model_type!r}; expected 'clip', 'clip_vision_model' or "
        "'clip_text_model' (a transformers CLIP checkpoint)"
    )


# --- name maps ----------------------------------------------------------------------------


def _hf_block_rules(prefix: str, tower: str, layers: int) -> Iterable[_Rule]:
    for i in range(layers):
        src, dst = f"{prefix}encoder.layers.{i}.", (tower, f"block_{i}")
        for hf_norm, norm in (("layer_norm1", "attn_norm"), ("layer_norm2", "mlp_norm")):
            yield _Rule(f"{src}{hf_norm}.weight", "copy", (dst + (norm, "scale"),))
            yield _Rule(f"{src}{hf_norm}.bias", "copy", (dst + (norm, "bias"),))
        linears = (
            ("self_attn.q_proj", ("attn", "query")),
            ("self_attn.k_proj", ("attn", "key")),
            ("self_attn.v_proj", ("attn", "value")),
            ("self_attn.out_proj", ("attn", "out")),
            ("mlp.fc1", ("mlp", "fc1")),
            ("mlp.fc2", ("mlp", "fc2")),
        )
        for hf_linear, linear in linears:
            yield _Rule(f"{src}{hf_linear}.weight", "linear", (dst + linear + ("kernel",),))
            yield _Rule(f"{src}{hf_linear}.bias", "copy", (dst + linear + ("bias",),))


def _norm_rules(key: str, path: ParamPath) -> Iterable[_Rule]:
    yield _Rule(f"{key}.weight", "copy", (path + ("scale",),))
    yield _Rule(f"{key}.bias", "copy", (path + ("bias",),))


def _hf_rules(vision: VisionConfig | None, text: TextConfig | None) -> list[_Rule]:
    rules: list[_Rule] = []
    if vision is not None:
        v, tower = "vision_model.", ("vision_tower",)
        embeddings = f"{v}embeddings."
        patch_kernel = tower + ("patch_embed", "kernel")
        rules += [
            _Rule(f"{embeddings}patch_embedding.weight", "conv", (patch_kernel,)),
            _Rule(f"{embeddings}class_embedding", "copy", (tower + ("class_embed",),)),
            _Rule(f"{embeddings}position_embedding.weight", "copy", (tower + ("position_embed",),)),
            *_norm_rules(f"{v}pre_layrnorm", tower + ("pre_norm",)),
            *_hf_block_rules(v, "vision_tower", vision.layers),
            *_norm_rules(f"{v}post_layernorm", tower + ("post_norm",)),
            _Rule("visual_projection.weight", "linear", (("visual_projection", "kernel"),)),
        ]
    if text is not None:
        t, tower = "text_model.", ("text_tower",)
        embeddings = f"{t}embeddings."
        token_embed = tower + ("token_embed", "embedding")
        rules += [
            _Rule(f"{embeddings}token_embedding.weight", "copy", (token_embed,)),
            _Rule(f"{embeddings}position_embedding.weight", "copy", (tower + ("position_embed",),)),
            *_hf_block_rules(t, "text_tower", text.layers),
            *_norm_rules(f"{t}final_layer_norm", tower + ("final_norm",)),
            _Rule("text_projection.weight", "linear", (("text_projection", "kernel"),)),
        ]
    if vision is not None and text is not None:
        rules.append(_Rule("logit_scale", "copy", (("logit_scale",),)))
    return rules


def _openai_block_rules(prefix: str, tower: str, layers: int) -> Iterable[_Rule]:
    for i in range(layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", (tower, f"block_{i}")
        attn = dst + ("attn",)
        qkv = ("query", "key", "value")
        yield from _norm_rules(f"{src}ln_1", dst + ("attn_norm",))
        yield _Rule(
            f"{src}attn.in_proj_weight", "in_proj", tuple(attn + (n, "kernel") for n in qkv)
        )
        yield _Rule(f"{src}attn.in_proj_bias", "in_proj", tuple(attn + (n, "bias") for n in qkv))
        yield _Rule(f"{src}attn.out_proj.weight", "linear", (attn + ("out", "kernel"),))
        yield _Rule(f"{src}attn.out_proj.bias", "copy", (attn + ("out", "bias"),))
        yield from _norm_rules(f"{src}ln_2", dst + ("mlp_norm",))
        for openai_linear, linear in (("c_fc", "fc1"), ("c_proj", "fc2")):
            yield _Rule(
                f"{src}mlp.{openai_linear}.weight", "linear", (dst + ("mlp", linear, "kernel"),)
            )
            yield _Rule(f"{src}mlp.{openai_linear}.bias", "copy", (dst + ("mlp", linear, "bias"),))


def _openai_rules(vision: VisionConfig | None, text: TextConfig | None) -> list[_Rule]:
    rules: list[_Rule] = []
    if vision is not None:
        tower = ("vision_tower",)
        rules += [
            _Rule("visual.conv1.weight", "conv", (tower + ("patch_embed", "kernel"),)),
            _Rule("visual.class_embedding", "copy", (tower + ("class_embed",),)),
            _Rule("visual.positional_embedding", "copy", (tower + ("position_embed",),)),
            *_norm_rules("visual.ln_pre", tower + ("pre_norm",)),
            *_openai_block_rules("visual.", "vision_tower", vision.layers),
            *_norm_rules("visual.ln_post", tower + ("post_norm",)),
            _Rule("visual.proj", "copy", (("visual_projection", "kernel"),)),
        ]
    if text is not None:
        tower = ("text_tower",)
        rules += [
            _Rule("token_embedding.weight", "copy", (tower + ("token_embed", "embedding"),)),
            _Rule("positional_embedding", "copy", (tower + ("position_embed",),)),
            *_openai_block_rules("", "text_tower", text.layers),
            *_norm_rules("ln_final", tower + ("final_norm",)),
            _Rule("text_projection", "copy", (("text_projection", "kernel"),)),
        ]
    if vision is not None and text is not None:
        rules.append(_Rule("logit_scale", "copy", (("logit_scale",),)))
    return rules


# --- loading -------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 through ml_dtypes)."""
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    try:
        return safetensors.numpy.load_file(str(path))
    except TypeError:
        pass  # numpy knows no bfloat16: read the (simple) file format directly
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = (8 + header_size + offset for offset in info["data_offsets"])
        tensors[key] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"])
    return tensors


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def _fill_params(
    module: CLIP,
    rules: list[_Rule],
    tensors: dict[str, np.ndarray],
    ignored: Callable[[str], bool],
    source: str,
) -> dict[str, Any]:
    abstract = jax.eval_shape(lambda rng: nn.meta.unbox(init_clip(module, rng)), jax.random.key(0))
    expected = traverse_util.flatten_dict(abstract["params"])
    covered = [target for rule in rules for target in rule.targets]
    if sorted(covered) != sorted(expected):
        raise AssertionError("clipgen's CLIP name map does not match the module's parameters")

    by_key = {rule.key: rule for rule in rules}
    unknown = sorted(key for key in tensors if key not in by_key and not ignored(key))
    missing = sorted(key for key in by_key if key not in tensors)
    mismatched = []
    flat: dict[ParamPath, np.ndarray] = {}
    for key, rule in by_key.items():
        if key not in tensors:
            continue
        want = _source_shape(rule, [tuple(expected[t].shape) for t in rule.targets])
        got = tuple(tensors[key].shape)
        if got != want:
            mismatched.append(f"{key}: checkpoint {got}, expected {want}")
            continue
        for target, value in zip(rule.targets, _convert(rule, tensors[key]), strict=True):
            flat[target] = np.asarray(value, np.float32)
    problems = []
    if unknown:
        problems.append(f"unexpected keys (no clipgen parameter takes them): {_listing(unknown)}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise ValueError(
            f"{source} does not fit clipgen CLIP(vision={module.vision}, text={module.text}, "
            f"projection_dim={module.projection_dim}): " + "; ".join(problems)
        )
    params = jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(flat))
    return {"params": params}


def load_clip(path: str | Path, dtype: Any = jnp.float32) -> tuple[CLIP, dict[str, Any]]:
    """(module, params) from a transformers CLIP directory (config.json, model.safetensors);
    params are plain float32 arrays shaped like `nn.meta.unbox(init_clip(module, rng))`."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json (expected a save_pretrained directory)")
    vision, text, projection_dim, logit_scale_init = clip_config_from_hf(
        json.loads(config_path.read_text())
    )
    module = CLIP(vision, text, projection_dim, logit_scale_init, dtype=dtype)
    weights_path = path / "model.safetensors"
    params = _fill_params(
        module,
        _hf_rules(vision, text),
        _read_safetensors(weights_path),
        lambda key: key.endswith(_HF_IGNORED_SUFFIXES),
        str(weights_path),
    )
    return module, params


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
    params = _fill_params(
        module,
        _openai_rules(vision, text),
        _read_safetensors(path),
        lambda key: key in _OPENAI_IGNORED_KEYS or key.endswith(_OPENAI_IGNORED_SUFFIXES),
        str(path),
    )
    return module, params
