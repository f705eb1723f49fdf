"""Input pipeline: random-access example sources read per host into global batches.

A source is anything with `len()` and `source[i] -> dict` (a tfds `as_data_source`, the
procedural shapes stream, embedding shards). Batch number k of a run is a fixed set of
example indices (a seeded permutation per epoch), and each process reads only its rows of
it, so a run resumes exactly from a batch number and any process count reads the same
global batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from clipgen.data import shapes

Example = dict[str, Any]


class Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Example: ...


class ProceduralShapes:
    """The shapes world drawn on demand: example i is the scene from rng([seed, split, i]),
    rendered at each resolution (uint8), with its caption, JSON scene and id. `length` is
    nominal (the stream can be indexed anywhere); tfds builds give the same examples."""

    def __init__(
        self, resolutions: tuple[int, ...], split: str = "train", seed: int = 0, length: int = 10**9
    ):
        if split not in shapes.SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {shapes.SPLITS}")
        self.resolutions = tuple(resolutions)
        self.split = split
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        rng = np.random.default_rng([self.seed, shapes.SPLITS.index(self.split), int(index)])
        return example_of(shapes.sample_scene(rng, self.split), self.resolutions, index)


def example_of(scene: shapes.Scene, resolutions: Sequence[int], index: int) -> Example:
    """A shapes-world example: `scene` rendered at each resolution, its caption, JSON and id."""
    example: Example = {f"image_{r}": shapes.render(scene, r) for r in resolutions}
    example["caption"] = shapes.caption(scene)
    example["scene"] = shapes.scene_to_json(scene)
    example["id"] = int(index)
    return example


def renders(split: str, ids: Sequence[int], resolution: int, seed: int = 0) -> np.ndarray:
    """The shapes-world renders (uint8 NHWC) of examples `ids` of a split at `resolution`."""
    source = ProceduralShapes((resolution,), split, seed)
    return np.stack([source[int(i)][f"image_{resolution}"] for i in ids])


def decode_text(value: Any) -> str:
    """tfds Text features come back as bytes without TensorFlow."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def permute(positions: np.ndarray, length: int, key: Sequence[int]) -> np.ndarray:
    """A seeded bijection of [0, length), evaluated only at `positions`: a 4-round Feistel
    network over the smallest even power of two >= length, cycle-walked back into range.
    Memory and time do not grow with `length`, so it suits sources of any size."""
    bits = max(2, int(length - 1).bit_length())
    bits += bits % 2
    half = bits // 2
    low_mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng(key).integers(0, 2**63, size=4, dtype=np.uint64)

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & low_mask
        for round_key in keys:
            mixed = (right ^ round_key) * np.uint64(0x9E3779B97F4A7C15)
            mixed ^= mixed >> np.uint64(29)
            left, right = right, left ^ (mixed & low_mask)
        return (left << np.uint64(half)) | right

    x = np.asarray(positions, dtype=np.uint64)
    out = rounds(x)
    outside = out >= length
    while outside.any():
        out[outside] = rounds(out[outside])
        outside = out >= length
    return out.astype(np.int64)


def batch_indices(
    length: int, batch_number: int, global_batch_size: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """The source indices of global batch `batch_number`: consecutive slices of one seeded
    permutation per epoch (the last, partial batch of an epoch wraps into the next)."""
    start = batch_number * global_batch_size
    positions = np.arange(start, start + global_batch_size)
    epochs, offsets = np.divmod(positions, length)
    if not shuffle:
        return offsets
    out = np.empty_like(offsets)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = permute(offsets[chosen], length, (seed, int(epoch)))
    return out


def host_batches(
    source: Source,
    transform: Callable[[list[Example]], dict[str, np.ndarray]],
    first_batch: int,
    global_batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    process: tuple[int, int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of consecutive global batches from `first_batch` on, each turned
    into arrays by `transform` (a list of examples -> a dict of stacked arrays).
    `process` is (index, count), by default JAX's."""
    if process is None:
        import jax

        process = (jax.process_index(), jax.process_count())
    index, count = process
    if global_batch_size % count:
        raise ValueError(f"global batch {global_batch_size} does not divide over {count} hosts")
    per_host = global_batch_size // count
    number = first_batch
    while True:
        indices = batch_indices(len(source), number, global_batch_size, seed, shuffle)
        rows = indices[index * per_host : (index + 1) * per_host]
        yield transform([source[int(i)] for i in rows])
        number += 1
