"""Blocks shared by clipgen's networks."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


def timestep_embedding(
    t: jax.Array,
    dim: int,
    max_period: float = 10_000.0,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, shape (batch, dim): [cos | sin]
    halves with frequencies max_period^(-k / half) as in ADM/GLIDE's `timestep_embedding`
    (the defaults), or, as diffusers' `get_timestep_embedding` with its flip_sin_to_cos and
    downscale_freq_shift, [sin | cos] and max_period^(-k / (half - freq_shift)) (the
    original DDPM's: False, 1)."""
    half = dim // 2
    exponent = jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    frequencies = jnp.exp(-math.log(max_period) * exponent)
    angles = jnp.asarray(t, jnp.float32)[:, None] * frequencies[None, :]
    halves = [jnp.cos(angles), jnp.sin(angles)]
    features = jnp.concatenate(halves if flip_sin_to_cos else halves[::-1], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Multi-head scaled dot-product attention: query (B, Lq, H, D), key and value
    (B, Lk, H, D) -> (B, Lq, H * D). Scores are float32 (float64 when `dtype` is); `bias`
    (broadcastable to (B, H, Lq, Lk)) is added to them, and where boolean `mask` is False
    they are set to the finite minimum of their type (as transformers' eager attention: a
    fully masked row turns uniform). The softmax weights are cast to `dtype` before they
    meet the values."""
    batch, length, heads, head_dim = query.shape
    score_dtype = jnp.promote_types(dtype, jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(score_dtype) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(score_dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return attended.reshape(batch, length, heads * head_dim)


class _ScanBody(nn.Module):
    """One block as nn.scan's body: (carry, *broadcast inputs) -> (carry, None)."""

    block: Any
    kwargs: tuple[tuple[str, Any], ...]

    @nn.compact
    def __call__(self, x: jax.Array, *args: Any) -> tuple[jax.Array, None]:
        return self.block(**dict(self.kwargs), name="block")(x, *args), None


def make_layers(
    block: type[nn.Module],
    count: int,
    kwargs: dict[str, Any],
    *,
    scan: bool = False,
    remat: bool = False,
    static_argnums: tuple[int, ...] = (),
) -> list[nn.Module] | nn.Module:
    """`count` identical blocks for a module's setup, applied with `apply_layers`: a list
    named block_0, block_1, ... or, with `scan`, one `nn.scan` over the block (params
    stacked on a leading "layers" axis under "blocks": the step compiles the block once,
    whatever the depth). With `remat` each block's activations are recomputed in the
    backward pass; `static_argnums` are its call's static arguments (counting the block)."""
    body = nn.remat(block, static_argnums=static_argnums) if remat else block
    if not scan:
        return [body(**kwargs, name=f"block_{i}") for i in range(count)]
    return nn.scan(
        _ScanBody,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=count,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(body, tuple(sorted(kwargs.items())), name="blocks")


def apply_layers(layers: list[nn.Module] | nn.Module, x: jax.Array, *args: Any) -> jax.Array:
    """`x` through the blocks `make_layers` made, in order, each also given `args`."""
    if isinstance(layers, (list, tuple)):
        for layer in layers:
            x = layer(x, *args)
        return x
    x, _ = layers(x, *args)
    return x


def stack_layers(params: dict[str, Any], count: int) -> dict[str, Any]:
    """Unrolled params (block_0 ... block_{count-1}) in the scanned layout ("blocks"), e.g. to
    load converted public weights into a model built with `scan`."""
    blocks = [params[f"block_{i}"] for i in range(count)]
    rest = {k: v for k, v in params.items() if not k.startswith("block_")}
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *blocks)
    return {**rest, "blocks": {"block": stacked}}
