"""The machinery every checkpoint converter shares: a name map of `Rule`s from checkpoint
tensors to clipgen parameters, a safetensors reader, and a strict filler that refuses a
checkpoint unless every tensor lands in a parameter and every parameter is filled."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from clipgen.data.json_input import OBJECT, Fields, read_json_object
from clipgen.errors import InputError

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


# safetensors dtypes -> numpy (little-endian, as the format stores them).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
_DAMAGED = "the file is damaged or not safetensors: re-download it or re-save the model"


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 and float8 through
    ml_dtypes). The header is checked before any data is read: its length against the
    file's, JSON, each tensor's dtype, shape and data_offsets (inside the data, of the size
    shape x itemsize, not overlapping another's); a file that fails any check raises an
    InputError naming the file (and the tensor)."""
    path = Path(path)
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"safetensors file {path} {where}")
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            header, data_start = _safetensors_header(file, size, path)
            entries = _safetensors_entries(header, size - data_start, path)
            tensors = {}
            for key, dtype, shape, begin, _ in entries:
                array = np.empty(shape, dtype)
                file.seek(data_start + begin)
                if file.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                    raise InputError(f"{path}: tensor {key!r} ends early; {_DAMAGED}")
                tensors[key] = array
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error.strerror or error})") from None
    return tensors


def _safetensors_header(file: BinaryIO, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The header object and where the data starts."""
    if size < 8:
        raise InputError(
            f"{path} is {size} bytes, too short for a safetensors file (8 bytes of header "
            f"length come first); {_DAMAGED}"
        )
    (length,) = struct.unpack("<Q", file.read(8))
    if length > size - 8:
        raise InputError(
            f"{path}: the header length {length} runs past the end of the {size}-byte file "
            f"(truncated, or not safetensors); {_DAMAGED}"
        )
    if length > _MAX_HEADER:
        raise InputError(
            f"{path}: the header length {length} is beyond safetensors' limit of "
            f"{_MAX_HEADER} bytes; {_DAMAGED}"
        )
    raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as error:
        raise InputError(
            f"{path}: the header is not JSON ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:120]}); {_DAMAGED}"
        ) from None
    if not isinstance(header, dict):
        raise InputError(
            f"{path}: the header is a {type(header).__name__}, not an object; {_DAMAGED}"
        )
    return header, 8 + length


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _safetensors_entries(
    header: dict[str, Any], data_size: int, path: Path
) -> list[tuple[str, np.dtype, tuple[int, ...], int, int]]:
    """(key, dtype, shape, begin, end) of every tensor, checked, in the order of the data."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: __metadata__ is not an object; {_DAMAGED}")
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict):
            raise InputError(f"{where}: its header entry is not an object; {_DAMAGED}")
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            known = ", ".join(_SAFETENSORS_DTYPES)
            raise InputError(f"{where} has dtype {dtype!r}, which clipgen reads not ({known})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _non_negative_ints(shape):
            raise InputError(f"{where}: shape {shape!r} is not a list of sizes >= 0; {_DAMAGED}")
        if not _non_negative_ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise InputError(
                f"{where}: data_offsets {offsets!r} are not [begin, end] with begin <= end; "
                f"{_DAMAGED}"
            )
        begin, end = offsets
        if end > data_size:
            raise InputError(
                f"{where} ends at byte {end} of the data, which holds {data_size} (the file is "
                f"truncated); {_DAMAGED}"
            )
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise InputError(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} "
                f"of {dtype} takes {nbytes}; {_DAMAGED}"
            )
        entries.append((key, _SAFETENSORS_DTYPES[dtype], tuple(shape), begin, end))
    entries.sort(key=lambda entry: (entry[3], entry[4]))
    for before, after in zip(entries, entries[1:], strict=False):
        if after[3] < before[4]:
            raise InputError(
                f"{path}: the data of tensors {before[0]!r} and {after[0]!r} overlap; {_DAMAGED}"
            )
    return entries


def _non_negative_ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def read_weights(
    directory: str | Path, name: str, index_name: str
) -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
    """A `save_pretrained` directory's tensors: file `name`, or the shards that
    `index_name` (a sharded checkpoint's index: {"weight_map": {key: shard file}}) names.
    Returns (tensors, the source to name in errors, key -> the file it came from)."""
    directory = Path(directory)
    single, index = directory / name, directory / index_name
    if single.is_file():
        tensors = read_safetensors(single)
        return tensors, str(single), dict.fromkeys(tensors, str(single))
    if index.exists():
        return _read_sharded(directory, index)
    stem = name.split(".")[0]
    others = sorted(p.name for p in directory.glob(f"{stem}*")) if directory.is_dir() else []
    hint = (
        f" (found {', '.join(others)}: clipgen reads safetensors only; re-save with "
        "save_pretrained(..., safe_serialization=True))"
        if others
        else ""
    )
    where = directory if directory.is_dir() else f"{directory} (no such directory)"
    raise InputError(f"{where} has no {name} or {index_name}{hint}")


def _read_sharded(
    directory: Path, index: Path
) -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
    fields = Fields(read_json_object(index, "a sharded checkpoint's index"), str(index))
    weight_map = fields.get("weight_map", None, OBJECT)
    if not weight_map:
        raise fields.error("no weight_map (or an empty one) names the shards")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            fields.fail(f"weight_map.{key}", f"is {shard!r}, not a file name in {directory}")
    tensors: dict[str, np.ndarray] = {}
    origins: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not path.is_file():
            raise InputError(f"{index} names the shard {shard}, which is missing from {directory}")
        for key, value in read_safetensors(path).items():
            if key in tensors:
                raise InputError(f"{path}: tensor {key!r} is also in {origins[key]}")
            tensors[key], origins[key] = value, str(path)
    for key, shard in weight_map.items():
        if origins.get(key) != str(directory / shard):
            found = f"it is in {origins[key]}" if key in origins else "no shard holds it"
            raise InputError(f"{index}: tensor {key!r} should be in {shard}, but {found}")
    return tensors, str(index), origins


def read_torch_state_dict(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """A flat state dict saved with `torch.save`, as numpy arrays, read with
    `weights_only=True` (tensors only: no code is unpickled); anything but a dict of tensors,
    and a file torch cannot read, are refused with an InputError naming `what` was
    expected."""
    path = Path(path)
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"{path} {where}; expected {what} there")
    import pickle

    import torch  # only this path needs torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{path} holds more than tensors and was refused (clipgen never unpickles "
            f"objects; expected {what}): {str(error).splitlines()[0]}"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch's errors for a damaged file vary
        detail = (str(error).splitlines() or [""])[0][:160]
        raise InputError(
            f"{path} is not a readable torch file ({type(error).__name__}: {detail}); "
            f"expected {what}: re-download it"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{path} is not a flat state dict of tensors (expected {what})")
    arrays = {}
    for key, value in state.items():
        try:
            arrays[key] = (value.float() if value.is_floating_point() else value).detach().numpy()
        except (TypeError, RuntimeError) as error:
            raise InputError(
                f"{path}: tensor {key!r} of {value.dtype} has no numpy form ({error}); "
                f"expected {what}"
            ) from None
    return arrays


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
    origins: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """{"params": ...} filled from `tensors` by `rules`, float32.

    `abstract_params` is the module's (unboxed) parameter tree, e.g. from `jax.eval_shape`;
    `ignored(key)` names checkpoint buffers that hold no learned values. Raises InputError
    naming `source` (and, per key, the file `origins` says it came from), `target` (a
    description of the clipgen module) and the keys that are unexpected, missing,
    mis-shaped, not floating point or not finite (NaN, inf, or beyond float32's range), if
    the checkpoint does not fit exactly.
    """
    expected = traverse_util.flatten_dict(abstract_params)
    covered = [path for rule in rules for path in rule.targets]
    if sorted(covered) != sorted(expected):
        stray = sorted(set(covered) ^ set(expected))
        raise AssertionError(
            f"clipgen's name map for {target} does not match its parameters: {stray[:5]}"
        )

    origins = origins or {}

    def named(key: str, detail: str) -> str:
        origin = origins.get(key, source)
        return f"{key} ({detail}{'' if origin == source else f', in {origin}'})"

    by_key = {rule.key: rule for rule in rules}
    unknown = sorted(key for key in tensors if key not in by_key and not ignored(key))
    missing = sorted(key for key in by_key if key not in tensors)
    mismatched, not_float, not_finite = [], [], []
    flat: dict[ParamPath, np.ndarray] = {}
    for key, rule in by_key.items():
        if key not in tensors:
            continue
        tensor = np.asarray(tensors[key])
        want = source_shape(rule, [tuple(expected[t].shape) for t in rule.targets])
        got = tuple(tensor.shape)
        if got != want:
            mismatched.append(f"{key}: checkpoint {got}, expected {want}")
            continue
        if not is_floating(tensor.dtype):
            not_float.append(named(key, str(tensor.dtype)))
            continue
        with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
            values = tensor.astype(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(values.size - np.count_nonzero(finite))
            not_finite.append(named(key, f"{bad} of {values.size} values"))
            continue
        for path, value in zip(rule.targets, convert(rule, values), strict=True):
            flat[path] = np.asarray(value, np.float32)
    problems = []
    if unknown:
        problems.append(f"unexpected keys (no clipgen parameter takes them): {listing(unknown)}")
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {listing(mismatched)}")
    if not_float:
        problems.append(f"tensors that are not floating point: {listing(not_float)}")
    if not_finite:
        problems.append(f"tensors holding NaN or inf (as float32): {listing(not_finite)}")
    if problems:
        fix = (
            "re-download or re-save the checkpoint"
            if not (unknown or missing or mismatched)
            else "check that the config describes these weights, or re-save the model"
        )
        raise InputError(
            f"{source} does not fit clipgen {target}: " + "; ".join(problems) + f"; {fix}"
        )
    params = jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(flat))
    return {"params": params}


def is_floating(dtype: np.dtype) -> bool:
    """numpy's floats and ml_dtypes' (bfloat16, float8): not integers or booleans."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    if dtype.kind != "V":  # integers, booleans, complex numbers, strings
        return False
    try:
        ml_dtypes.finfo(dtype)
    except (ValueError, TypeError):
        return False
    return True
