"""Batching evaluations over devices and processes: generation and feature extraction run
in global batches (a multiple of the devices and processes); each process generates its
rows of a batch, the features are computed sharded over the mesh, and padded rows of the
last batch are masked. Batch k is generated with seed `generation_seed(seed, k, process)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from clipgen.eval import fid as fid_lib
from clipgen.eval.registry import Generator


def generation_seed(seed: int, batch_number: int, process: int) -> int:
    """The seed a generator gets for this process's rows of global batch `batch_number`."""
    return int(np.random.default_rng([seed, batch_number, process]).integers(2**31 - 1))


def process_batches(
    count: int, global_batch: int, divisor: int = 1
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(batch number, this process's row indices, which are real) over `count` rows in global
    batches; the last batch is padded with the last row, marked not real."""
    processes = jax.process_count()
    if global_batch < 1 or global_batch % processes or global_batch % divisor:
        raise ValueError(
            f"batch_size {global_batch} must be a positive multiple of the {processes} "
            f"processes and of the {divisor} devices the batch is split over"
        )
    local = global_batch // processes
    offset = jax.process_index() * local
    for number, start in enumerate(range(0, count, global_batch)):
        rows = np.arange(start + offset, start + offset + local)
        yield number, np.minimum(rows, count - 1), rows < count


def checked_images(images: Any, count: int, where: str) -> np.ndarray:
    """`images` as uint8 (count, H, W, 3), or ValueError saying what came instead."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count:
        raise ValueError(
            f"{where}: expected uint8 images ({count}, H, W, 3), got {images.dtype} "
            f"{images.shape} (round floats with clipgen.eval.resize.to_uint8)"
        )
    if images.shape[-1] != 3:
        raise ValueError(f"{where}: expected RGB images (..., 3), got shape {images.shape}")
    return images


def sharded_features(
    rows_to_inputs: Callable[[int, np.ndarray], np.ndarray],
    count: int,
    feature_fn: fid_lib.FeatureFn,
    global_batch: int,
    *,
    keep_features: bool = False,
    desc: str = "features",
) -> tuple[fid_lib.FeatureStats, np.ndarray | None]:
    """Statistics (and, if `keep_features`, the features in row order) of
    `feature_fn(rows_to_inputs(batch_number, rows))` over `count` rows."""
    stats: fid_lib.FeatureStats | None = None
    kept = []
    batches = process_batches(count, global_batch, feature_fn.batch_divisor)
    show = jax.process_index() == 0
    total = math.ceil(count / global_batch)
    for number, rows, real in tqdm(batches, desc=desc, total=total, unit="batch", disable=not show):
        features, valid = feature_fn(rows_to_inputs(number, rows), real)
        if stats is None:
            stats = fid_lib.FeatureStats(features.shape[-1])
        stats.update(features, valid)
        if keep_features:
            kept.append(np.asarray(features[valid], np.float32))
    if stats is None:
        raise ValueError(f"{desc}: no rows to compute features of")
    return stats, (np.concatenate(kept) if keep_features else None)


def generated_rows(
    generate: Generator, captions: Sequence[str], seed: int, where: str
) -> Callable[[int, np.ndarray], np.ndarray]:
    """rows_to_images(batch number, rows): the generator's images of those rows' captions,
    seeded by `generation_seed`, checked to be uint8 RGB of one per caption."""

    def rows_to_images(number: int, rows: np.ndarray) -> np.ndarray:
        chosen = [captions[int(row)] for row in rows]
        images = generate(chosen, generation_seed(seed, number, jax.process_index()))
        return checked_images(images, len(chosen), where)

    return rows_to_images


def wait_for_process_zero(what: str) -> None:
    """A barrier across processes (what process 0 wrote is there for all after it)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(what)


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """`values` summed over all processes."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
