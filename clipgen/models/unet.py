"""The ADM/GLIDE UNet in Flax linen, channels-last (NHWC), shared by the decoder and the
upsamplers.

ResBlocks (GroupNorm-SiLU-conv, timestep embedding added or applied as scale-shift on the
second norm, dropout, zero-initialised output conv, 1x1 skip when the width changes),
up/down-sampling inside ResBlocks (BigGAN style) or by convolutions, multi-head attention
at chosen resolutions whose keys and values can include extra encoder tokens through their
own projections (GLIDE's `encoder_kv`), and a middle block of ResBlock-attention-ResBlock.

Parameters are float32; `dtype` sets the compute precision. `init_unet` returns boxed
variables whose kernels carry logical axis names (conv output channels are "conv_out");
`flax.linen.meta.unbox` gives plain arrays.

With `UNetConfig.scan` each run of ResBlocks (and their attention) within a level whose
inputs have one shape (`block_runs`) is one `nn.scan`: XLA compiles its body once instead
of once per block. A run's params are its blocks' stacked, under "down2_run1" for the run
from the second block of the third level down; `stack_runs` and `unstack_runs` convert
between the two layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipgen.models.layers import dot_product_attention, timestep_embedding


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Shape of an ADM UNet.

    `attention_resolutions` are downsampling factors, not pixel sizes: 1 is the input
    resolution, 2 half of it, and so on (a 64 px decoder with attention at 32, 16 and 8 px
    has (2, 4, 8)). Heads are `channels // head_channels` at each width, or `num_heads`
    when `head_channels` is None. `out_channels` is twice the image channels when the
    variance is learned. `encoder_dim` is the width of the extra tokens attention layers
    may read (None: self-attention only).
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    mid_attention: bool = True
    head_channels: int | None = 64
    num_heads: int = 1
    dropout: float = 0.0
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-5
    attention_norm: bool = True
    encoder_dim: int | None = None
    time_embed_dim: int | None = None
    remat: bool = False
    scan: bool = False  # runs of identically shaped ResBlocks as one nn.scan each
    # The original DDPM's conventions (diffusers' UNet2DModel fields of the same names):
    # [sin | cos] timestep features with frequency shift 1, and strided-conv downsampling
    # padded by one on the right and bottom only (downsample_padding 0) instead of both sides.
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1

    def __post_init__(self):
        # Configs from ml_collections arrive with lists; tuples keep the dataclass hashable.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig: channel_mult {self.channel_mult} must be positive ints")
        if self.downsample_padding not in (0, 1):
            raise ValueError(
                f"UNetConfig: downsample_padding {self.downsample_padding} must be 1 (both "
                "sides) or 0 (right and bottom only, the original DDPM)"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig: num_res_blocks {self.num_res_blocks} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig: dropout {self.dropout} must be in [0, 1)")
        factors = [2**level for level in range(len(self.channel_mult))]
        for factor in self.attention_resolutions:
            if factor not in factors:
                raise ValueError(
                    f"UNetConfig: attention_resolutions holds downsampling factors; {factor} is "
                    f"not one of this UNet's {factors} (a factor, not a pixel size)"
                )
        for mult in self.channel_mult:
            width = self.channels * mult
            if width % self.norm_groups:
                raise ValueError(
                    f"UNetConfig: width {width} (channels {self.channels} x {mult}) is not "
                    f"divisible by norm_groups {self.norm_groups}"
                )
        attended = [self.channels * self.channel_mult[-1]] if self.mid_attention else []
        attended += [
            self.channels * self.channel_mult[f.bit_length() - 1]
            for f in self.attention_resolutions
        ]
        for width in attended:
            self.heads(width)

    @property
    def embed_dim(self) -> int:
        """Width of the timestep embedding (ADM: 4 x channels)."""
        return self.time_embed_dim or 4 * self.channels

    @property
    def downsampling(self) -> int:
        """Total downsampling factor; input height and width must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads(self, width: int) -> int:
        """Attention heads at this channel width."""
        if self.head_channels is not None:
            if width % self.head_channels:
                raise ValueError(
                    f"UNetConfig: width {width} is not divisible by head_channels "
                    f"{self.head_channels}"
                )
            return width // self.head_channels
        if width % self.num_heads:
            raise ValueError(f"UNetConfig: width {width} not divisible by {self.num_heads} heads")
        return self.num_heads


def _conv(
    features: int,
    kernel: int,
    dtype: Any,
    name: str,
    zero_init: bool = False,
    stride: int = 1,
    padding: Any = None,
) -> nn.Conv:
    pad = kernel // 2
    kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, None, "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _dense(
    features: int,
    names: tuple[str | None, str | None],
    dtype: Any,
    name: str,
    zero_init: bool = False,
) -> nn.Dense:
    kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        name=name,
    )


def _group_norm(config: UNetConfig, dtype: Any, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=config.norm_groups,
        epsilon=config.norm_eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def upsample_nearest(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_average(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, C), 2x2 average pooling."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """ADM residual block, optionally resampling ("up"/"down") both paths after the first
    norm; the output conv starts at zero so the block starts as its skip path."""

    out_channels: int
    config: UNetConfig
    resample: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool = True) -> jax.Array:
        """x (B, H, W, C_in), emb (B, embed_dim) -> (B, H', W', out_channels)."""
        cfg, width = self.config, self.out_channels
        h = nn.silu(_group_norm(cfg, self.dtype, "norm1")(x))
        if self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == "down":
            h, x = downsample_average(h), downsample_average(x)
        h = _conv(width, 3, self.dtype, "conv1")(h)
        emb_width = 2 * width if cfg.use_scale_shift_norm else width
        emb_out = _dense(emb_width, (None, "conv_out"), self.dtype, "emb_proj")(nn.silu(emb))
        emb_out = emb_out[:, None, None, :]
        if cfg.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = _group_norm(cfg, self.dtype, "norm2")(h) * (1 + scale) + shift
        else:
            h = _group_norm(cfg, self.dtype, "norm2")(h + emb_out)
        h = nn.Dropout(cfg.dropout)(nn.silu(h), deterministic=deterministic)
        h = _conv(width, 3, self.dtype, "conv2", zero_init=True)(h)
        if x.shape[-1] != width:
            x = _conv(width, 1, self.dtype, "skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels with a residual connection; encoder tokens,
    when given, get their own key/value projections and are attended beside the pixels."""

    config: UNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoder_tokens: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
    ) -> jax.Array:
        """x (B, H, W, C); encoder_tokens (B, L, encoder_dim); encoder_mask (B, L) bool,
        True = attend. Pixels are always attended, so no row is ever fully masked."""
        cfg = self.config
        batch, height, width, channels = x.shape
        heads = cfg.heads(channels)
        head_dim = channels // heads
        h = x.reshape(batch, height * width, channels)
        if cfg.attention_norm:
            h = _group_norm(cfg, self.dtype, "norm")(h)

        def project(name: str, inputs: jax.Array) -> jax.Array:
            out = _dense(channels, ("embed", "heads"), self.dtype, name)(inputs)
            return out.reshape(batch, inputs.shape[1], heads, head_dim)

        query, key, value = project("query", h), project("key", h), project("value", h)
        mask = None
        if encoder_tokens is not None:
            if cfg.encoder_dim is None:
                raise ValueError("encoder tokens were given to a UNet whose encoder_dim is None")
            tokens = encoder_tokens.astype(self.dtype)
            key = jnp.concatenate([project("encoder_key", tokens), key], axis=1)
            value = jnp.concatenate([project("encoder_value", tokens), value], axis=1)
            if encoder_mask is not None:
                pixels = jnp.ones((batch, height * width), bool)
                mask = jnp.concatenate([jnp.asarray(encoder_mask, bool), pixels], axis=1)
                mask = mask[:, None, None, :]
        attended = dot_product_attention(query, key, value, mask=mask, dtype=self.dtype)
        out = _dense(channels, ("heads", "embed"), self.dtype, "out", zero_init=True)(attended)
        return x + out.reshape(x.shape)


def block_runs(config: UNetConfig) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """Each level's ResBlocks, down path ("down", level) and up path ("up", level), as
    (first, count) runs of consecutive blocks whose inputs have the same width (and so the
    same parameter shapes); `scan` makes each run of two or more one `nn.scan`."""
    widths = [config.channels * mult for mult in config.channel_mult]
    last = len(widths) - 1
    blocks = config.num_res_blocks
    inputs: dict[tuple[str, int], list[Any]] = {}
    skip_widths = [widths[0]]  # conv_in's output, then what each down block pushes
    for level, width in enumerate(widths):
        entering = widths[level - 1] if level else widths[0]
        inputs["down", level] = [entering] + [width] * (blocks - 1)
        skip_widths += [width] * blocks + ([width] if level < last else [])
    h_width = widths[-1]
    for level in reversed(range(len(widths))):
        inputs["up", level] = []
        for _ in range(blocks + 1):
            inputs["up", level].append((h_width, skip_widths.pop()))
            h_width = widths[level]
    runs = {}
    for key, shapes in inputs.items():
        runs[key] = []
        for index, shape in enumerate(shapes):
            if index and shape == shapes[index - 1]:
                first, count = runs[key][-1]
                runs[key][-1] = (first, count + 1)
            else:
                runs[key].append((index, 1))
    return runs


def _scanned_runs(config: UNetConfig):
    """(names of the unrolled blocks, name of the run, has attention) per run of 2+."""
    for (path, level), runs in block_runs(config).items():
        attention = 2**level in config.attention_resolutions
        for first, count in runs:
            if count > 1:
                blocks = [f"{path}{level}_{{}}{i}" for i in range(first, first + count)]
                yield blocks, f"{path}{level}_run{first}", attention


def stack_runs(params: dict[str, Any], config: UNetConfig) -> dict[str, Any]:
    """A UNet's unrolled params (e.g. converted public weights) in the layout of the same
    UNet built with `scan`: each run's blocks stacked on a leading axis."""
    params = dict(params)
    for blocks, run, attention in _scanned_runs(config):
        parts = ("res", "attn") if attention else ("res",)
        params[run] = {
            part: jax.tree_util.tree_map(
                lambda *leaves: jnp.stack(leaves),
                *[params.pop(block.format(part)) for block in blocks],
            )
            for part in parts
        }
    return params


def unstack_runs(params: dict[str, Any], config: UNetConfig) -> dict[str, Any]:
    """A scanned UNet's params in the unrolled layout (`stack_runs` undone)."""
    params = dict(params)
    for blocks, run, _ in _scanned_runs(config):
        stacked = params.pop(run)
        for part, tree in stacked.items():
            for index, block in enumerate(blocks):
                params[block.format(part)] = jax.tree_util.tree_map(
                    lambda x, index=index: x[index], tree
                )
    return params


class _RunBody(nn.Module):
    """One step of a scanned run: the skip (up path) joined, a ResBlock, its attention.
    Returns (h, h) on the down path, where every output is a skip, else (h, None)."""

    out_channels: int
    config: UNetConfig
    attention: bool
    up: bool
    deterministic: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, skip, emb, encoder_tokens, encoder_mask):
        if self.up:
            h = jnp.concatenate([h, skip], axis=-1)
        h = ResBlock(self.out_channels, self.config, None, self.dtype, name="res")(
            h, emb, self.deterministic
        )
        if self.attention:
            h = AttentionBlock(self.config, self.dtype, name="attn")(
                h, encoder_tokens, encoder_mask
            )
        return h, None if self.up else h


class UNet(nn.Module):
    """The ADM UNet: timestep embedding, down path, middle, up path with skip connections,
    GroupNorm-SiLU and a zero-initialised output conv. Output is float32 NHWC."""

    config: UNetConfig
    dtype: Any = jnp.float32

    def _check_input(self, x: jax.Array) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"UNet expects NHWC input with {cfg.in_channels} channels, got shape {x.shape}"
            )
        if x.shape[1] % cfg.downsampling or x.shape[2] % cfg.downsampling:
            raise ValueError(
                f"UNet input {x.shape[1]}x{x.shape[2]} is not a multiple of its total "
                f"downsampling {cfg.downsampling}"
            )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        embedding: jax.Array | None = None,
        encoder_tokens: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """x (B, H, W, in_channels); timesteps (B,) or scalar; embedding (B, embed_dim) added
        to the timestep embedding; encoder_tokens (B, L, encoder_dim) with encoder_mask (B, L)
        (True = attend) -> (B, H, W, out_channels) float32."""
        cfg, dtype = self.config, self.dtype
        self._check_input(x)
        batch = x.shape[0]
        # Static argnums count `self` as 0: `deterministic` is ResBlock's third argument.
        res_block = nn.remat(ResBlock, static_argnums=(3,)) if cfg.remat else ResBlock
        attention_block = nn.remat(AttentionBlock) if cfg.remat else AttentionBlock

        def res(h, width, name, resample=None):
            return res_block(width, cfg, resample, dtype, name=name)(h, emb, deterministic)

        def attend(h, name):
            return attention_block(cfg, dtype, name=name)(h, encoder_tokens, encoder_mask)

        def run(h, run_skips, width, level, first, count, up):
            body = nn.remat(_RunBody) if cfg.remat else _RunBody
            scanned = nn.scan(
                body,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0 if up else nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=count,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            attention = 2**level in cfg.attention_resolutions
            path = "up" if up else "down"
            name = f"{path}{level}_run{first}"
            module = scanned(width, cfg, attention, up, deterministic, dtype, name=name)
            return module(h, run_skips, emb, encoder_tokens, encoder_mask)

        runs = block_runs(cfg)

        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        emb = timestep_embedding(
            t, cfg.channels, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        ).astype(dtype)
        emb = _dense(cfg.embed_dim, ("embed", "mlp"), dtype, "time_embed_1")(emb)
        emb = _dense(cfg.embed_dim, ("mlp", "embed"), dtype, "time_embed_2")(nn.silu(emb))
        if embedding is not None:
            emb = emb + embedding.astype(dtype)

        widths = [cfg.channels * mult for mult in cfg.channel_mult]
        last = len(widths) - 1
        h = _conv(widths[0], 3, dtype, "conv_in")(x.astype(dtype))
        skips = [h]
        for level, width in enumerate(widths):
            for first, count in runs["down", level]:
                if cfg.scan and count > 1:
                    h, outputs = run(h, None, width, level, first, count, up=False)
                    skips.extend(outputs[i] for i in range(count))
                    continue
                for i in range(first, first + count):
                    h = res(h, width, f"down{level}_res{i}")
                    if 2**level in cfg.attention_resolutions:
                        h = attend(h, f"down{level}_attn{i}")
                    skips.append(h)
            if level < last:
                if cfg.resblock_updown:
                    h = res(h, width, f"down{level}_resample", "down")
                else:
                    pad = (1, 1) if cfg.downsample_padding else (0, 1)
                    h = _conv(
                        width, 3, dtype, f"down{level}_resample", stride=2, padding=(pad, pad)
                    )(h)
                skips.append(h)

        h = res(h, widths[-1], "mid_res0")
        if cfg.mid_attention:
            h = attend(h, "mid_attn")
        h = res(h, widths[-1], "mid_res1")

        for level in reversed(range(len(widths))):
            width = widths[level]
            for first, count in runs["up", level]:
                if cfg.scan and count > 1:
                    taken = jnp.stack([skips.pop() for _ in range(count)])
                    h, _ = run(h, taken, width, level, first, count, up=True)
                    continue
                for i in range(first, first + count):
                    skip = skips.pop()
                    h = res(jnp.concatenate([h, skip], axis=-1), width, f"up{level}_res{i}")
                    if 2**level in cfg.attention_resolutions:
                        h = attend(h, f"up{level}_attn{i}")
            if level > 0:
                if cfg.resblock_updown:
                    h = res(h, width, f"up{level}_resample", "up")
                else:
                    h = _conv(width, 3, dtype, f"up{level}_resample")(upsample_nearest(h))

        h = nn.silu(_group_norm(cfg, dtype, "norm_out")(h))
        h = _conv(cfg.out_channels, 3, dtype, "conv_out", zero_init=True)(h)
        return h.astype(jnp.promote_types(dtype, jnp.float32))  # float64 stays float64


def image_shape(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from a size or a pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def init_unet(
    module: UNet,
    rng: jax.Array,
    image_size: int | tuple[int, int],
    batch_size: int = 1,
    encoder_length: int = 1,
) -> dict[str, Any]:
    """`module.init` on zeros of this size (and encoder tokens when `encoder_dim` is set, so
    their projections exist); returns the boxed variables."""
    cfg = module.config
    height, width = image_shape(image_size)
    x = jnp.zeros((batch_size, height, width, cfg.in_channels))
    t = jnp.zeros((batch_size,))
    tokens = mask = None
    if cfg.encoder_dim is not None:
        tokens = jnp.zeros((batch_size, encoder_length, cfg.encoder_dim))
        mask = jnp.ones((batch_size, encoder_length), bool)
    return module.init({"params": rng}, x, t, None, tokens, mask)
