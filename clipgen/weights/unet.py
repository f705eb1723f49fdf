"""diffusers UNets (`save_pretrained` directories: config.json and
diffusion_pytorch_model.safetensors) into clipgen modules.

- `UNet2DConditionModel` (Karlo's decoder), together with the `UnCLIPTextProjModel` directory
  beside it, becomes a `Decoder` reading frozen CLIP text encodings.
- `UNet2DModel` (Karlo's `super_res_first` / `super_res_last`, or an unconditional DDPM such
  as google/ddpm-celebahq-256, DiffusionCLIP's backbones; see `unet2d.py` for the layouts)
  becomes an `Upsampler` with diffusers' bicubic resize when its input holds an image and a
  low-resolution image (in_channels = 2 x image channels), otherwise a plain `UNet`, called
  as `UNet.apply(params, x_nhwc, t)` where diffusers calls `unet(sample=x, timestep=t)`.

Call convention (clipgen is NHWC, diffusers NCHW). Where the UnCLIP pipeline calls
    hidden, time_add = text_proj(image_embeddings=e, prompt_embeds=p,
                                 text_encoder_hidden_states=h, do_classifier_free_guidance=cfg)
    decoder(sample=x, timestep=t, encoder_hidden_states=hidden, class_labels=time_add,
            attention_mask=F.pad(text_mask, (4, 0), value=True))
clipgen calls `Decoder.apply(params, x.permute(0, 2, 3, 1), t, e, h, text_mask, p,
drop_image=...)` and gets `out.permute(0, 2, 3, 1)`: the text_proj step happens inside, and the
pipeline's guidance batch (null image embedding first, then e) is `image_embed` = [e, e] with
`drop_image` = [True..., False...]. Where the pipeline calls
    super_res(sample=torch.cat([x, interpolate(low, bicubic, antialias=True)], 1), timestep=t)
clipgen calls `Upsampler.apply(params, x_nhwc, t, low_nhwc)`, which does the resize itself.

Loading is strict: every tensor must land in a parameter and every parameter be filled, with
matching shapes and finite floating-point values, and any configuration value of the wrong
type or that clipgen cannot express raises an InputError naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from clipgen.data.json_input import (
    BOOL,
    NUMBER,
    POSITIVE_INT,
    STR,
    Fields,
    either,
    list_of,
    optional,
)
from clipgen.errors import InputError
from clipgen.models.decoder import Decoder, DecoderConfig, init_decoder
from clipgen.models.unet import UNet, UNetConfig, init_unet, stack_runs, unstack_runs
from clipgen.models.upsampler import Upsampler, UpsamplerConfig, init_upsampler
from clipgen.weights.convert import Rule, fill_params, linear_rules, norm_rules, read_weights
from clipgen.weights.unet2d import (
    attention_levels,
    channels,
    check_fields,
    make_unet_config,
    read_config,
    unet2d_config_from_diffusers,
    uniform,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

_RESNET_DOWN, _RESNET_UP = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
_ATTENTION_DOWN, _ATTENTION_UP = "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D"

# Fields with no effect on these block types (or on float32 numerics).
# diffusers' defaults for the structural fields a config may leave out.
_DECODER_DEFAULTS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
}
_DECODER_IGNORED = {
    "sample_size",
    "downsample_padding",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "dual_cross_attention",
    "use_linear_projection",
    "upcast_attention",
    "attention_type",
    "addition_time_embed_dim",
    "addition_embed_type_num_heads",
    "projection_class_embeddings_input_dim",
}
# Fields that must hold one of these values (absent fields take diffusers' default, first).
_DECODER_FIXED = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DSimpleCrossAttn",),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "class_embed_type": ("identity",),
    "addition_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
_PER_LEVEL_INT = either(POSITIVE_INT, list_of(POSITIVE_INT, 1))
_BLOCKS = list_of(STR, 1)
_DECODER_USED = {
    "in_channels": POSITIVE_INT,
    "out_channels": POSITIVE_INT,
    "down_block_types": _BLOCKS,
    "up_block_types": _BLOCKS,
    "only_cross_attention": either(BOOL, list_of(BOOL, 1)),
    "block_out_channels": list_of(POSITIVE_INT, 1),
    "layers_per_block": _PER_LEVEL_INT,
    "dropout": NUMBER,
    "norm_num_groups": optional(POSITIVE_INT),
    "norm_eps": NUMBER,
    "cross_attention_dim": _PER_LEVEL_INT,
    "attention_head_dim": either(optional(POSITIVE_INT), list_of(POSITIVE_INT, 1)),
    "time_embedding_dim": optional(POSITIVE_INT),
}

_TEXT_PROJ_FIELDS = {
    "clip_extra_context_tokens": POSITIVE_INT,
    "clip_embeddings_dim": POSITIVE_INT,
    "time_embed_dim": POSITIVE_INT,
    "cross_attention_dim": POSITIVE_INT,
}

# diffusers' UnCLIPTextProjModel -> clipgen's Decoder "conditioning".
_CONDITIONING_RULES = [
    Rule("learned_classifier_free_guidance_embeddings", "copy", (("null_image_embed",),)),
    *linear_rules("clip_image_embeddings_project_to_time_embeddings", ("image_to_time",)),
    *linear_rules("embedding_proj", ("text_to_time",)),
    *linear_rules("clip_extra_context_tokens_proj", ("image_to_tokens",)),
    *linear_rules("encoder_hidden_states_proj", ("text_to_tokens",)),
    *norm_rules("text_encoder_hidden_states_norm", ("text_norm",)),
]

# clipgen UNet module names -> diffusers module names.
_UNET_TOP_LEVEL = {
    "time_embed_1": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "conv_in": "conv_in",
    "mid_res0": "mid_block.resnets.0",
    "mid_attn": "mid_block.attentions.0",
    "mid_res1": "mid_block.resnets.1",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}
_UNET_BLOCK = re.compile(r"(down|up)(\d+)_(res|attn|resample)(\d*)")
_UNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "emb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
    "norm": "group_norm",
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "encoder_key": "add_k_proj",
    "encoder_value": "add_v_proj",
    "out": "to_out.0",
}


# --- configs -------------------------------------------------------------------------------


def decoder_config_from_diffusers(
    unet_config: dict[str, Any],
    text_proj_config: dict[str, Any],
    source: str = "config.json",
    text_proj_source: str = "text_proj config.json",
) -> DecoderConfig:
    """A clipgen DecoderConfig from the config.json dicts of a Karlo-style
    `UNet2DConditionModel` (`source`) and its `UnCLIPTextProjModel` (`text_proj_source`);
    anything clipgen cannot read or express raises an InputError naming the file and the
    field."""
    given = check_fields(unet_config, _DECODER_USED, _DECODER_FIXED, _DECODER_IGNORED, source)
    cfg = Fields({**_DECODER_DEFAULTS, **unet_config}, source)
    down = list(cfg.raw("down_block_types"))
    up = list(cfg.raw("up_block_types"))
    levels = len(down)
    if len(up) != levels or len(cfg.raw("block_out_channels")) != levels:
        raise given.error(
            "down_block_types, up_block_types and block_out_channels differ in length"
        )
    for field, blocks, allowed in (
        ("down_block_types", down, (_RESNET_DOWN, _ATTENTION_DOWN)),
        ("up_block_types", up, (_RESNET_UP, _ATTENTION_UP)),
    ):
        for block in blocks:
            if block not in allowed:
                given.fail(field, f"has the unsupported entry {block!r}; use {allowed}")
    attended = attention_levels(cfg, down, up, _ATTENTION_DOWN, _ATTENTION_UP)
    if uniform(cfg, "only_cross_attention", False, levels):
        given.fail("only_cross_attention", "is true; clipgen supports false")
    layers = uniform(cfg, "layers_per_block", 2, levels)
    head_dim = uniform(cfg, "attention_head_dim", 8, levels)
    cross_dim = uniform(cfg, "cross_attention_dim", 1280, levels)
    groups = cfg.raw("norm_num_groups", 32)
    eps = cfg.raw("norm_eps", 1e-5)
    if groups is None:
        given.fail("norm_num_groups", "is null; clipgen needs a group count")
    if head_dim is None:
        given.fail("attention_head_dim", "is null; clipgen needs a head width")
    if eps != 1e-5:
        # diffusers' simple cross-attention layers normalise with eps 1e-5 whatever norm_eps says.
        given.fail("norm_eps", f"is {eps}; clipgen supports 1e-05")
    base, mult = channels(cfg)
    for level in [*attended, levels - 1]:
        width = base * mult[level]
        if width % head_dim:
            given.fail("attention_head_dim", f"{head_dim} does not divide the width {width}")
    unet = make_unet_config(
        given,
        in_channels=cfg.raw("in_channels", 4),
        out_channels=cfg.raw("out_channels", 4),
        channels=base,
        channel_mult=mult,
        num_res_blocks=layers,
        attention_resolutions=tuple(2**level for level in attended),
        mid_attention=True,
        head_channels=head_dim,
        dropout=cfg.raw("dropout", 0.0),
        resblock_updown=True,
        use_scale_shift_norm=cfg.raw("resnet_time_scale_shift", "default") == "scale_shift",
        norm_groups=groups,
        norm_eps=eps,
        attention_norm=True,
        encoder_dim=cross_dim,
        time_embed_dim=cfg.raw("time_embedding_dim"),
    )

    proj = check_fields(text_proj_config, _TEXT_PROJ_FIELDS, {}, set(), text_proj_source)
    for field, expected in (
        ("time_embed_dim", unet.embed_dim),
        ("cross_attention_dim", cross_dim),
    ):
        if proj.raw(field) != expected:
            proj.fail(field, f"is {proj.raw(field)!r}; it must match the decoder UNet's {expected}")
    clip_dim = proj.raw("clip_embeddings_dim", 768)
    return DecoderConfig(
        unet=unet,
        clip_embed_dim=clip_dim,
        clip_extra_tokens=proj.raw("clip_extra_context_tokens", 4),
        text_width=clip_dim,
        text_embed_dim=clip_dim,
    )


# --- name maps ----------------------------------------------------------------------------


def _diffusers_module(name: str, levels: int) -> str:
    if name in _UNET_TOP_LEVEL:
        return _UNET_TOP_LEVEL[name]
    match = _UNET_BLOCK.fullmatch(name)
    if match is None:
        raise AssertionError(f"clipgen UNet module {name!r} has no diffusers name")
    path, level, kind, index = match.groups()
    block = int(level) if path == "down" else levels - 1 - int(level)
    if kind == "resample":
        return f"{path}_blocks.{block}.{path}samplers.0"
    return f"{path}_blocks.{block}.{'resnets' if kind == 'res' else 'attentions'}.{index}"


def unet_rules(abstract_params: dict[str, Any], levels: int) -> list[Rule]:
    """Rules from a diffusers UNet state dict to the clipgen UNet parameters given (a tree of
    arrays or shape structs, e.g. from `jax.eval_shape`) with `levels` resolution levels."""
    modules: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in traverse_util.flatten_dict(abstract_params).items():
        modules.setdefault(path[:-1], {})[path[-1]] = leaf
    rules: list[Rule] = []
    for path, leaves in modules.items():
        key = ".".join([_diffusers_module(path[0], levels), *(_UNET_PARTS[p] for p in path[1:])])
        if len(path) == 1 and path[0].endswith("_resample"):
            key += ".conv"  # a convolution resampler: diffusers' Downsample2D / Upsample2D
        if "scale" in leaves:
            rules += norm_rules(key, path)
        elif len(leaves["kernel"].shape) == 4:
            rules += [
                Rule(f"{key}.weight", "conv", (path + ("kernel",),)),
                Rule(f"{key}.bias", "copy", (path + ("bias",),)),
            ]
        else:
            rules += linear_rules(key, path)
    return rules


# --- loading -------------------------------------------------------------------------------


def _abstract_params(init_fn: Any) -> dict[str, Any]:
    abstract = jax.eval_shape(lambda rng: nn.meta.unbox(init_fn(rng)), jax.random.key(0))
    return abstract["params"]


def _fill_unet(abstract: dict[str, Any], cfg: UNetConfig, directory: Path) -> dict[str, Any]:
    """The UNet's params from the directory's tensors, converted in the unrolled layout and
    stacked when `cfg.scan` builds runs of blocks as scans."""
    if cfg.scan:
        abstract = jax.eval_shape(lambda params: unstack_runs(params, cfg), abstract)
    rules = unet_rules(abstract, len(cfg.channel_mult))
    tensors, source, origins = read_weights(directory, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    filled = fill_params(
        abstract, rules, tensors, lambda key: False, source, f"UNet {cfg}", origins
    )["params"]
    return stack_runs(filled, cfg) if cfg.scan else filled


def load_unet(
    path: str | Path,
    dtype: Any = jnp.float32,
    text_proj_path: str | Path | None = None,
    scan: bool = False,
) -> tuple[Decoder | Upsampler | UNet, dict[str, Any]]:
    """(module, params) from a diffusers UNet directory; params are plain float32 arrays.
    A damaged or mismatched directory raises an InputError naming the file.

    `UNet2DConditionModel` -> `Decoder`, its conditioning read from `text_proj_path`
    (default: the sibling directory `text_proj`, as in a Karlo pipeline folder);
    `UNet2DModel` -> `Upsampler` (bicubic resize) when in_channels is twice the image
    channels (out_channels or half of it), else `UNet`. See the module docstring for the
    call convention. With `scan` the module scans its UNet's runs of identical blocks
    (`UNetConfig.scan`) and their weights come stacked."""
    path = Path(path)
    config = read_config(path)
    class_name = config.get("_class_name")
    source = str(path / "config.json")

    if class_name == "UNet2DConditionModel":
        proj_dir = Path(text_proj_path) if text_proj_path is not None else path.parent / "text_proj"
        if not (proj_dir / "config.json").is_file():
            raise InputError(
                f"the decoder at {path} needs its UnCLIPTextProjModel: no config.json in "
                f"{proj_dir}; pass text_proj_path"
            )
        proj_config = read_config(proj_dir)
        proj_source = str(proj_dir / "config.json")
        proj_class = proj_config.get("_class_name", "UnCLIPTextProjModel")
        if proj_class != "UnCLIPTextProjModel":
            raise InputError(
                f"{proj_source} describes a {proj_class!r}, not an UnCLIPTextProjModel"
            )
        decoder_config = decoder_config_from_diffusers(config, proj_config, source, proj_source)
        unet_config = dataclasses.replace(decoder_config.unet, scan=scan)
        decoder_config = dataclasses.replace(decoder_config, unet=unet_config)
        module = Decoder(decoder_config, dtype)
        size = decoder_config.unet.downsampling
        abstract = _abstract_params(lambda rng: init_decoder(module, rng, size))
        unet_params = _fill_unet(abstract["unet"], decoder_config.unet, path)
        tensors, proj_weights, origins = read_weights(proj_dir, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
        conditioning = fill_params(
            abstract["conditioning"],
            _CONDITIONING_RULES,
            tensors,
            lambda key: False,
            proj_weights,
            "Decoder conditioning (UnCLIPTextProjModel)",
            origins,
        )["params"]
        return module, {"params": {"unet": unet_params, "conditioning": conditioning}}

    if class_name == "UNet2DModel":
        unet2d = dataclasses.replace(unet2d_config_from_diffusers(config, source), scan=scan)
        size = unet2d.downsampling
        half = unet2d.in_channels // 2
        if unet2d.in_channels % 2 == 0 and unet2d.out_channels in (half, 2 * half):
            module = Upsampler(UpsamplerConfig(unet2d, resize="bicubic"), dtype)
            abstract = _abstract_params(lambda rng: init_upsampler(module, rng, size, size))
            return module, {"params": {"unet": _fill_unet(abstract["unet"], unet2d, path)}}
        module = UNet(unet2d, dtype)
        abstract = _abstract_params(lambda rng: init_unet(module, rng, size))
        return module, {"params": _fill_unet(abstract, unet2d, path)}

    raise InputError(
        f"{source}: _class_name {class_name!r} is not a UNet clipgen loads; expected "
        "'UNet2DConditionModel' (Karlo decoder) or 'UNet2DModel' (Karlo super-resolution, "
        "or an unconditional DDPM)"
    )
