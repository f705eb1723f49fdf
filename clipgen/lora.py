"""LoRA adapters for any clipgen network: for each kernel whose "/"-joined parameter path
matches a pattern, a low-rank update W + (alpha / rank) * A @ B (a 3x3 convolution's
kernel taken as a (9 * C_in, C_out) matrix). B starts at zero, so a fresh adapter leaves
the network as it was; training the adapters alone (the base frozen) makes small edit and
operator files and drops the base's optimizer state."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util


def targets(params: Any, pattern: str) -> list[tuple[str, ...]]:
    """The paths of the kernels (rank >= 2) whose "/"-joined path fully matches `pattern`."""
    flat = traverse_util.flatten_dict(params)
    compiled = re.compile(pattern)
    return [
        path
        for path, value in flat.items()
        if path[-1] == "kernel" and jnp.ndim(value) >= 2 and compiled.fullmatch("/".join(path))
    ]


def init(params: Any, pattern: str, rank: int, rng: jax.Array) -> dict[str, Any]:
    """Adapters for the kernels `pattern` names, nested like `params`: A ~ N(0, 1 / fan_in)
    of shape (fan_in, rank), B zeros (rank, fan_out)."""
    paths = targets(params, pattern)
    if not paths:
        raise ValueError(f"LoRA pattern {pattern!r} matches no kernel of the network")
    flat = traverse_util.flatten_dict(params)
    adapters = {}
    for index, path in enumerate(paths):
        shape = jnp.shape(flat[path])
        fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
        key = jax.random.fold_in(rng, index)
        adapters[path] = {
            "a": jax.random.normal(key, (fan_in, rank), jnp.float32) / math.sqrt(fan_in),
            "b": jnp.zeros((rank, fan_out), jnp.float32),
        }
    return traverse_util.unflatten_dict(adapters)


def merge(params: Any, adapters: Any, alpha: float) -> Any:
    """`params` with each adapted kernel W replaced by W + (alpha / rank) * A @ B."""
    flat = dict(traverse_util.flatten_dict(params))
    for path, pair in traverse_util.flatten_dict(adapters, is_leaf=_is_pair).items():
        kernel = flat[path]
        rank = pair["a"].shape[-1]
        update = (pair["a"] @ pair["b"]).reshape(kernel.shape) * (alpha / rank)
        flat[path] = kernel + update.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def _is_pair(_, value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"a", "b"}
