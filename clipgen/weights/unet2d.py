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

import json
from pathlib import Path
from typing import Any

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
_UNET2D_USED = {
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "dropout",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "add_attention",
    "time_embedding_dim",
}


def read_config(directory: Path) -> dict[str, Any]:
    """The config.json of a diffusers save_pretrained directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json (expected a diffusers save_pretrained directory)"
        )
    return json.loads(config_path.read_text())


def check_fields(
    config: dict[str, Any],
    used: set[str],
    fixed: dict[str, tuple],
    ignored: set[str],
    source: str,
) -> None:
    """Refuse fields clipgen does not know and fixed fields with values it cannot express
    (an absent fixed field takes the first allowed value, diffusers' default)."""
    unknown = sorted(
        key for key in config if not key.startswith("_") and key not in used | set(fixed) | ignored
    )
    if unknown:
        raise ValueError(f"{source}: config fields clipgen does not know: {', '.join(unknown)}")
    for field, allowed in fixed.items():
        value = config.get(field, allowed[0])
        if value not in allowed:
            raise ValueError(
                f"{source}: unsupported {field}={value!r}; clipgen supports {list(allowed)}"
            )


def uniform(config: dict[str, Any], field: str, default: Any, levels: int, source: str) -> Any:
    """A field diffusers allows per level, required to be one value for all levels."""
    value = config.get(field, default)
    if isinstance(value, (list, tuple)):
        if len(value) != levels or len(set(value)) != 1:
            raise ValueError(
                f"{source}: {field}={value!r} varies by level; clipgen needs one value for all "
                f"{levels} levels"
            )
        value = value[0]
    return value


def channels(config: dict[str, Any], source: str) -> tuple[int, tuple[int, ...]]:
    """(base channels, channel_mult) from block_out_channels."""
    block_out = [int(c) for c in config["block_out_channels"]]
    if any(c % block_out[0] for c in block_out):
        raise ValueError(
            f"{source}: block_out_channels {block_out} are not multiples of the first; "
            "clipgen's UNet needs integer channel multipliers"
        )
    return block_out[0], tuple(c // block_out[0] for c in block_out)


def make_unet_config(source: str, **fields: Any) -> UNetConfig:
    """UNetConfig(**fields), its errors naming `source`."""
    try:
        return UNetConfig(**fields)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def attention_levels(
    down: list[str], up: list[str], attention_down: str, attention_up: str, source: str
) -> list[int]:
    """The levels whose down block is `attention_down`, which the up path must mirror with
    `attention_up` blocks (clipgen's UNet attends at the same resolutions on both paths)."""
    levels = len(down)
    attended = [level for level in range(levels) if down[level] == attention_down]
    mirrored = [level for level in range(levels) if up[levels - 1 - level] == attention_up]
    if attended != mirrored:
        raise ValueError(
            f"{source}: up_block_types {up} do not mirror down_block_types {down}; clipgen's "
            "UNet attends at the same resolutions on both paths"
        )
    return attended


def _resampling(down: list[str], up: list[str], config: dict[str, Any], source: str) -> bool:
    """True when every level resamples inside a ResBlock, False when by convolutions."""
    kinds = set()
    for blocks, resnet, conv, attn, field in (
        (down, _RESNET_DOWN, _CONV_DOWN, _ATTN_DOWN, "downsample_type"),
        (up, _RESNET_UP, _CONV_UP, _ATTN_UP, "upsample_type"),
    ):
        for block in blocks:
            if block == resnet:
                kinds.add("resnet")
            elif block == conv:
                kinds.add("conv")
            elif block == attn:
                kinds.add(config.get(field, "conv"))
            else:
                raise ValueError(
                    f"{source}: unsupported block type {block!r}; clipgen supports "
                    f"{', '.join((resnet, conv, attn))}"
                )
    if len(kinds) > 1:
        raise ValueError(
            f"{source}: blocks {down} / {up} mix ResBlock and convolution resampling; "
            "clipgen's UNet resamples one way at every level"
        )
    return kinds == {"resnet"}


def unet2d_config_from_diffusers(config: dict[str, Any], source: str = "config.json") -> UNetConfig:
    """A clipgen UNetConfig from the config.json dict of a `UNet2DModel` in Karlo's
    super-resolution layout or the original DDPM's (see the module docstring)."""
    check_fields(config, _UNET2D_USED, _UNET2D_FIXED, _UNET2D_IGNORED, source)
    cfg = {**_UNET2D_DEFAULTS, **config}
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    levels = len(down)
    if len(up) != levels or len(cfg["block_out_channels"]) != levels:
        raise ValueError(f"{source}: down_block_types, up_block_types, block_out_channels differ")
    resblock_updown = _resampling(down, up, cfg, source)
    attended = attention_levels(down, up, _ATTN_DOWN, _ATTN_UP, source)
    base, mult = channels(cfg, source)
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError(f"{source}: unsupported norm_num_groups=None")
    scale_shift = cfg.get("resnet_time_scale_shift", "default") == "scale_shift"
    mid_attention = bool(cfg.get("add_attention", True))
    # diffusers' middle attention has a GroupNorm only with the "default" time embedding norm,
    # unless attn_norm_num_groups names one; the Attn blocks' attentions always have one.
    attention_groups = cfg.get("attn_norm_num_groups")
    if attention_groups not in (None, groups):
        raise ValueError(
            f"{source}: unsupported attn_norm_num_groups={attention_groups}; clipgen supports "
            f"None or norm_num_groups ({groups})"
        )
    attention_norm = attention_groups is not None or not scale_shift
    if attended and not attention_norm:
        raise ValueError(
            f"{source}: with resnet_time_scale_shift='scale_shift' the middle attention has no "
            "GroupNorm but the Attn blocks' have; clipgen's attention layers all have one or none"
        )
    head_dim = cfg.get("attention_head_dim", 8)
    for level in [*attended, *([levels - 1] if mid_attention else [])]:
        width = base * mult[level]
        if head_dim is not None and width % head_dim:
            raise ValueError(
                f"{source}: attention_head_dim {head_dim} does not divide the width {width}"
            )
    return make_unet_config(
        source,
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        channels=base,
        channel_mult=mult,
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=tuple(2**level for level in attended),
        mid_attention=mid_attention,
        # attention_head_dim None: one head as wide as the layer, as diffusers does.
        head_channels=head_dim,
        num_heads=1,
        dropout=cfg.get("dropout", 0.0),
        resblock_updown=resblock_updown,
        use_scale_shift_norm=scale_shift,
        norm_groups=groups,
        norm_eps=cfg.get("norm_eps", 1e-5),
        attention_norm=attention_norm,
        encoder_dim=None,
        time_embed_dim=cfg.get("time_embedding_dim"),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=cfg.get("downsample_padding", 1),
    )
