"""Blocks shared by clipgen's networks."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, [cos | sin] halves as in
    ADM/GLIDE's `timestep_embedding`; shape (batch, dim)."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(t, jnp.float32)[:, None] * frequencies[None, :]
    features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
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
    (B, Lk, H, D) -> (B, Lq, H * D). Scores are float32; `bias` (broadcastable to
    (B, H, Lq, Lk)) is added to them, and where boolean `mask` is False they are set to the
    finite float32 minimum (as transformers' eager attention: a fully masked row turns
    uniform). The softmax weights are cast to `dtype` before they meet the values."""
    batch, length, heads, head_dim = query.shape
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return attended.reshape(batch, length, heads * head_dim)
