"""diffusers `UNet2DModel` configs (config.json) into clipgen `UNetConfig`s, and the config
checks every diffusers UNet converter shares.

Two layouts of `UNet2DModel` are clipgen UNets:
- Karlo's super-resolution UNets: `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`
  (resampling inside ResBlocks), no attention but the middle one;
- the original DDPM's (google/ddpm-celebahq-256, -church-256, -bedroom-256 and the
  CIFAR-10 / LSUN ones: DiffusionCLIP's CelebA-HQ, church and bedroom backbones):
  `DownBlock2D` / `AttnDownBlock2D` and `UpBlock2D` / `AttnUpBlock2D` (strided-conv
  downsampling padded right and bottom, nearest upsampling then a conv), attention at the
  levels the Attn blocks sit on, additive time embedding, [sin | cos] timestep features
  with frequency shift 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipgen.data.json_input import (
    BOOL,
    NUMBER,
    POSITIVE_INT,
    STR,
    Fields,
    Kind,
    list_of,
    optional,
    read_json_object,
)
from clipgen.models.unet import UNetConfig

_RESNET_DOWN, _RESNET_UP = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
_CONV_DOWN, _CONV_UP = "DownBlock2D", "UpBlock2D"
_ATTN_DOWN, _ATTN_UP = "AttnDownBlock2D", "AttnUpBlock2D"

_UNET2D_DEFAULTS = {
    "down_block_types": ["DownBlock2D"] + ["AttnDownBlock2D"] * 3,
    "up_block_types": ["AttnUpBlock2D"] * 3 + ["UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
}
_UNET2D_IGNORED = {"sample_size", "num_train_timesteps"}
_UNET2D_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "downsample_type": ("conv", "resnet"),
    "upsample_type": ("conv", "resnet"),
    "downsample_padding": (1, 0),
    "flip_sin_to_cos": (True, False),
    "freq_shift": (0, 1),
}
_BLOCKS = list_of(STR, 1)
_UNET2D_USED = {
    "in_channels": POSITIVE_INT,
    "out_channels": POSITIVE_INT,
    "down_block_types": _BLOCKS,
    "up_block_types": _BLOCKS,
    "block_out_channels": list_of(POSITIVE_INT, 1),
    "layers_per_block": POSITIVE_INT,
    "dropout": NUMBER,
    "attention_head_dim": optional(POSITIVE_INT),
    "norm_num_groups": optional(POSITIVE_INT),
    "attn_norm_num_groups": optional(POSITIVE_INT),
    "norm_eps": NUMBER,
    "add_attention": BOOL,
    "time_embedding_dim": optional(POSITIVE_INT),
}


def read_config(directory: Path) -> dict[str, Any]:
    """The config.json of a diffusers save_pretrained directory."""
    return read_json_object(directory / "config.json", "a diffusers model config (save_pretrained)")


def check_fields(
    config: dict[str, Any],
    used: dict[str, Kind],
    fixed: dict[str, tuple],
    ignored: set[str],
    source: str,
) -> Fields:
    """The config as Fields, refused (InputError naming `source` and the field) if it has a
    field clipgen does not know, a used field of the wrong kind, or a fixed field of another
    value than those clipgen supports (an absent fixed field takes the first allowed value,
    diffusers' default)."""
    fields = Fields(config, source)
    unknown = sorted(
        key
        for key in config
        if not key.startswith("_") and key not in set(used) | set(fixed) | ignored
    )
    if unknown:
        raise fields.error(f"config fields clipgen does not know: {', '.join(unknown)}")
    for field, kind in used.items():
        fields.get(field, None, kind)
    for field, allowed in fixed.items():
        value = config.get(field, allowed[0])
        if not any(_same(value, option) for option in allowed):
            fields.fail(field, f"is {value!r}; clipgen supports {list(allowed)}")
    return fields


def _same(value: Any, option: Any) -> bool:
    """value == option, a boolean never equal to a number."""
    return value == option and isinstance(value, bool) == isinstance(option, bool)


def uniform(fields: Fields, field: str, default: Any, levels: int) -> Any:
    """A field diffusers allows per level, required to be one value for all levels."""
    value = fields.raw(field, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels or len(set(value)) != 1:
            fields.fail(
                field, f"is {value!r}, varying by level; clipgen needs one value for all {levels}"
            )
        value = value[0]
    return value


def channels(fields: Fields) -> tuple[int, tuple[int, ...]]:
    """(base channels, channel_mult) from block_out_channels."""
    block_out = list(fields.raw("block_out_channels"))
    if any(c % block_out[0] for c in block_out):
        fields.fail(
            "block_out_channels",
            f"{block_out} are not multiples of the first; clipgen's UNet needs integer "
            "channel multipliers",
        )
    return block_out[0], tuple(c // block_out[0] for c in block_out)


def make_unet_config(fields: Fields, **values: Any) -> UNetConfig:
    """UNetConfig(**values), its errors InputErrors naming the file."""
    try:
        return UNetConfig(**values)
    except ValueError as error:
        raise fields.error(str(error)) from None


def attention_levels(
    fields: Fields, down: list[str], up: list[str], attention_down: str, attention_up: str
) -> list[int]:
    """The levels whose down block is `attention_down`, which the up path must mirror with
    `attention_up` blocks (clipgen's UNet attends at the same resolutions on both paths)."""
    levels = len(down)
    attended = [level for level in range(levels) if down[level] == attention_down]
    mirrored = [level for level in range(levels) if up[levels - 1 - level] == attention_up]
    if attended != mirrored:
        fields.fail(
            "up_block_types",
            f"{up} do not mirror down_block_types {down}; clipgen's UNet attends at the same "
            "resolutions on both paths",
        )
    return attended


def _resampling(fields: Fields, down: list[str], up: list[str]) -> bool:
    """True when every level resamples inside a ResBlock, False when by convolutions."""
    kinds = set()
    for blocks, resnet, conv, attn, field, kind_field in (
        (down, _RESNET_DOWN, _CONV_DOWN, _ATTN_DOWN, "down_block_types", "downsample_type"),
        (up, _RESNET_UP, _CONV_UP, _ATTN_UP, "up_block_types", "upsample_type"),
    ):
        for block in blocks:
            if block == resnet:
                kinds.add("resnet")
            elif block == conv:
                kinds.add("conv")
            elif block == attn:
                kinds.add(fields.raw(kind_field, "conv"))
            else:
                fields.fail(
                    field,
                    f"has the unsupported entry {block!r}; clipgen supports "
                    f"{', '.join((resnet, conv, attn))}",
                )
    if len(kinds) > 1:
        raise fields.error(
            f"blocks {down} / {up} mix ResBlock and convolution resampling; clipgen's UNet "
            "resamples one way at every level"
        )
    return kinds == {"resnet"}


def unet2d_config_from_diffusers(config: dict[str, Any], source: str = "config.json") -> UNetConfig:
    """A clipgen UNetConfig from the config.json dict of a `UNet2DModel` in Karlo's
    super-resolution layout or the original DDPM's (see the module docstring); anything
    clipgen cannot read or express raises an InputError naming the file and the field."""
    given = check_fields(config, _UNET2D_USED, _UNET2D_FIXED, _UNET2D_IGNORED, source)
    cfg = Fields({**_UNET2D_DEFAULTS, **config}, source)
    down, up = list(cfg.raw("down_block_types")), list(cfg.raw("up_block_types"))
    levels = len(down)
    if len(up) != levels or len(cfg.raw("block_out_channels")) != levels:
        raise given.error(
            "down_block_types, up_block_types and block_out_channels differ in length"
        )
    resblock_updown = _resampling(cfg, down, up)
    attended = attention_levels(cfg, down, up, _ATTN_DOWN, _ATTN_UP)
    base, mult = channels(cfg)
    groups = cfg.raw("norm_num_groups", 32)
    if groups is None:
        given.fail("norm_num_groups", "is null; clipgen needs a group count")
    scale_shift = cfg.raw("resnet_time_scale_shift", "default") == "scale_shift"
    mid_attention = cfg.raw("add_attention", True)
    # diffusers' middle attention has a GroupNorm only with the "default" time embedding norm,
    # unless attn_norm_num_groups names one; the Attn blocks' attentions always have one.
    attention_groups = cfg.raw("attn_norm_num_groups")
    if attention_groups not in (None, groups):
        given.fail(
            "attn_norm_num_groups",
            f"is {attention_groups}; clipgen supports null or norm_num_groups ({groups})",
        )
    attention_norm = attention_groups is not None or not scale_shift
    if attended and not attention_norm:
        given.fail(
            "resnet_time_scale_shift",
            "is 'scale_shift', so the middle attention has no GroupNorm but the Attn blocks' "
            "have; clipgen's attention layers all have one or none",
        )
    head_dim = cfg.raw("attention_head_dim", 8)
    for level in [*attended, *([levels - 1] if mid_attention else [])]:
        width = base * mult[level]
        if head_dim is not None and width % head_dim:
            given.fail("attention_head_dim", f"{head_dim} does not divide the width {width}")
    return make_unet_config(
        given,
        in_channels=cfg.raw("in_channels", 3),
        out_channels=cfg.raw("out_channels", 3),
        channels=base,
        channel_mult=mult,
        num_res_blocks=cfg.raw("layers_per_block", 2),
        attention_resolutions=tuple(2**level for level in attended),
        mid_attention=mid_attention,
        # attention_head_dim None: one head as wide as the layer, as diffusers does.
        head_channels=head_dim,
        num_heads=1,
        dropout=cfg.raw("dropout", 0.0),
        resblock_updown=resblock_updown,
        use_scale_shift_norm=scale_shift,
        norm_groups=groups,
        norm_eps=cfg.raw("norm_eps", 1e-5),
        attention_norm=attention_norm,
        encoder_dim=None,
        time_embed_dim=cfg.raw("time_embedding_dim"),
        flip_sin_to_cos=cfg.raw("flip_sin_to_cos", True),
        freq_shift=cfg.raw("freq_shift", 0),
        downsample_padding=cfg.raw("downsample_padding", 1),
    )
