"""The machinery every checkpoint converter shares: a name map of `Rule`s from checkpoint
tensors to clipgen parameters, a safetensors reader, and a strict filler that refuses a
checkpoint unless every tensor lands in a parameter and every parameter is filled."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import traverse_util

ParamPath = tuple[str, ...]
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Rule:
    """One checkpoint tensor and the clipgen parameter(s) it fills, by layout:
    "copy" as is, "linear" torch (out, in) -> (in, out), "conv" (out, in, kh, kw) ->
    (kh, kw, in, out), "in_proj" rows [q; k; v] split over three targets (weights transposed)."""

    key: str
    layout: str
    targets: tuple[ParamPath, ...]


def source_shape(rule: Rule, target_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the checkpoint tensor must have to fill targets of these shapes."""
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


def convert(rule: Rule, tensor: np.ndarray) -> list[np.ndarray]:
    """The checkpoint tensor in clipgen's layout, one array per target."""
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


def norm_rules(key: str, path: ParamPath) -> list[Rule]:
    """A torch LayerNorm/GroupNorm (weight, bias) into a flax norm (scale, bias)."""
    return [
        Rule(f"{key}.weight", "copy", (path + ("scale",),)),
        Rule(f"{key}.bias", "copy", (path + ("bias",),)),
    ]


def linear_rules(key: str, path: ParamPath, bias: bool = True) -> list[Rule]:
    """A torch Linear (weight, bias) into a flax Dense (kernel, bias)."""
    rules = [Rule(f"{key}.weight", "linear", (path + ("kernel",),))]
    return rules + ([Rule(f"{key}.bias", "copy", (path + ("bias",),))] if bias else [])


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 through ml_dtypes)."""
    path = Path(path)
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


def read_torch_state_dict(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """A flat state dict saved with `torch.save`, as numpy arrays, read with
    `weights_only=True` (tensors only: no code is unpickled); anything but a dict of tensors
    is refused, naming `what` was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    import pickle

    import torch  # only this path needs torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds more than tensors and was refused (clipgen never unpickles "
            f"objects; expected {what}): {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors (expected {what})")
    return {
        key: (value.float() if value.dtype == torch.bfloat16 else value).detach().cpu().numpy()
        for key, value in state.items()
    }


def listing(items: list[str]) -> str:
    """At most 20 items, comma-separated, with the count when there are more."""
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def fill_params(
    abstract_params: Any,
    rules: list[Rule],
    tensors: dict[str, np.ndarray],
    ignored: Callable[[str], bool],
    source: str,
    target: str,
) -> dict[str, Any]:
    """{"params": ...} filled from `tensors` by `rules`, float32.

    `abstract_params` is the module's (unboxed) parameter tree, e.g. from `jax.eval_shape`;
    `ignored(key)` names checkpoint buffers that hold no learned values. Raises ValueError
    naming unexpected, missing and mis-shaped keys, and `source` and `target` (a description
    of the clipgen module), if the checkpoint does not fit exactly.
    """
    expected = traverse_util.flatten_dict(abstract_params)
    covered = [path for rule in rules for path in rule.targets]
    if sorted(covered) != sorted(expected):
        stray = sorted(set(covered) ^ set(expected))
        raise AssertionError(
            f"clipgen's name map for {target} does not match its parameters: {stray[:5]}"
        )

    by_key = {rule.key: rule for rule in rules}
    unknown = sorted(key for key in tensors if key not in by_key and not ignored(key))
    missing = sorted(key for key in by_key if key not in tensors)
    mismatched = []
    flat: dict[ParamPath, np.ndarray] = {}
    for key, rule in by_key.items():
        if key not in tensors:
            continue
        want = source_shape(rule, [tuple(expected[t].shape) for t in rule.targets])
        got = tuple(tensors[key].shape)
        if got != want:
            mismatched.append(f"{key}: checkpoint {got}, expected {want}")
            continue
        for path, value in zip(rule.targets, convert(rule, tensors[key]), strict=True):
            flat[path] = np.asarray(value, np.float32)
    problems = []
    if unknown:
        problems.append(f"unexpected keys (no clipgen parameter takes them): {listing(unknown)}")
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not fit clipgen {target}: " + "; ".join(problems))
    params = jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(flat))
    return {"params": params}
