"""Blocks shared by clipgen's networks."""

from __future__ import annotations

import math

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
