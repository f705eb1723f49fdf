"""FID and KID: streaming float64 feature statistics, the Frechet distance as TTUR /
pytorch-fid / ADM compute it, the kernel inception distance, statistics files that carry
their provenance, and a feature extractor over a batch sharded on a device mesh."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import scipy.linalg
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from clipgen.data.files import atomic_write
from clipgen.eval.resize import RESIZE_MODES, resize

# What a statistics file must record, and what must agree before two are compared.
REQUIRED_METADATA = ("weights_sha256", "resize_mode", "resolution", "num_samples", "split", "seed")
COMPARED_METADATA = ("weights_sha256", "resize_mode")
# The network input normalisation each reference pairs with its resize.
INPUT_SCALING_BY_RESIZE_MODE = {"tf1_bilinear": "tf", "clean": "tf", "pytorch_fid": "pytorch_fid"}
_BATCH_AXES = ("data", "fsdp")


# --- statistics ----------------------------------------------------------------------------


class FeatureStats:
    """Running count, sum and sum of outer products of features, in float64 on the host.

    Sums are taken about a shift (the first batch's mean) so that features far from the
    origin keep their covariance digits."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def update(self, features: Any, valid_mask: Any | None = None) -> None:
        """Add the rows of `features` (B, dim) where `valid_mask` (B,) is true (all if None)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got shape {features.shape}")
        if valid_mask is not None:
            valid_mask = np.asarray(valid_mask, bool)
            if valid_mask.shape != (features.shape[0],):
                raise ValueError(
                    f"valid_mask has shape {valid_mask.shape}; expected ({features.shape[0]},)"
                )
            features = features[valid_mask]
        if not len(features):
            return
        if self._shift is None:
            self._shift = features.mean(axis=0)
        centred = features - self._shift
        self.count += len(features)
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (dim,), covariance (dim, dim)) in float64, the covariance with N - 1 as
        `np.cov(rowvar=False)`; warns when N < dim (a singular covariance)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples; have {self.count}")
        if self.count < self.dim:
            warnings.warn(
                f"{self.count} samples for {self.dim}-d features: the covariance is singular "
                "and the Frechet distance is biased (use at least as many samples as dimensions)",
                stacklevel=2,
            )
        centred_mean = self._sum / self.count
        cov = (self._outer - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)
        return self._shift + centred_mean, cov


def mean_cov(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of gathered features (N, d) in float64."""
    stats = FeatureStats(np.shape(features)[-1])
    stats.update(features)
    return stats.mean_cov()


def save_stats(
    path: str | Path, mean: np.ndarray, cov: np.ndarray, metadata: dict[str, Any]
) -> Path:
    """Write `mu`, `sigma` and JSON `metadata` to an npz file, atomically; the metadata must
    name at least `REQUIRED_METADATA` (weights hash, resize mode, resolution, N, split, seed)."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"statistics metadata lacks {missing}; required: {REQUIRED_METADATA}")
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
        raise ValueError(f"mean {mean.shape} and covariance {cov.shape} do not match")
    encoded = json.dumps(metadata, sort_keys=True)

    def write(file):
        buffer = io.BytesIO()
        np.savez(buffer, mu=mean, sigma=cov, metadata=np.array(encoded))
        file.write(buffer.getvalue())

    return atomic_write(path, write)


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mu, sigma, metadata) from an npz statistics file; files without metadata (TTUR's
    published statistics) give an empty dict."""
    with np.load(Path(path), allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {list(data.keys())})")
        metadata = json.loads(str(data["metadata"])) if "metadata" in data else {}
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), metadata


def check_comparable(
    metadata_a: dict[str, Any],
    metadata_b: dict[str, Any],
    keys: Sequence[str] = COMPARED_METADATA,
) -> None:
    """Raise ValueError unless both statistics record the same value for every key (by
    default the Inception weights hash and the resize mode)."""
    for key in keys:
        if key not in metadata_a or key not in metadata_b:
            raise ValueError(
                f"cannot compare statistics: {key!r} is not recorded on both sides "
                f"({metadata_a.get(key, '<missing>')!r} vs {metadata_b.get(key, '<missing>')!r}); "
                "pass keys=() to compare statistics of unknown provenance anyway"
            )
        if metadata_a[key] != metadata_b[key]:
            raise ValueError(
                f"cannot compare statistics with different {key!r}: "
                f"{metadata_a[key]!r} vs {metadata_b[key]!r}"
            )


def fid_from_files(
    path_a: str | Path, path_b: str | Path, keys: Sequence[str] = COMPARED_METADATA
) -> float:
    """The Frechet distance between two statistics files, after `check_comparable`."""
    mu_a, sigma_a, metadata_a = load_stats(path_a)
    mu_b, sigma_b, metadata_b = load_stats(path_b)
    check_comparable(metadata_a, metadata_b, keys)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


# --- distances -----------------------------------------------------------------------------


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) in float64, as the references: scipy's
    sqrtm, retried with eps*I on both covariances if not finite; an imaginary diagonal above
    1e-3 raises ValueError, a smaller one is dropped."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"sigma {sigma1.shape} does not match mu {mu1.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a singular product is retried below
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"the covariance product is singular; adding {eps} to the diagonals", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > 1e-3:
            raise ValueError(f"the covariance square root has an imaginary component {largest}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_few_samples(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Frechet distance between N <= d samples (N, d) and (mu, sigma), exactly, from an
    N x N eigenproblem instead of a d x d square root.

    With A the centred samples, S_A = A'A / (N - 1) and Tr (S_A sigma)^1/2 is the sum of the
    square roots of the eigenvalues of A sigma A' / (N - 1), which has the same nonzero ones."""
    features = np.asarray(features, np.float64)
    centred = features - features.mean(axis=0)
    count = len(features)
    product = centred @ sigma @ centred.T / (count - 1)
    eigenvalues = np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)
    diff = features.mean(axis=0) - mu
    trace_samples = np.sum(centred * centred) / (count - 1)
    return float(diff @ diff + np.trace(sigma) + trace_samples - 2 * np.sum(np.sqrt(eigenvalues)))


def _unbiased_mmd2_cubic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets under k(a, b) = (a.b / d + 1)^3."""
    size, dim = x.shape
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(within / (size * (size - 1)) - 2 * k_xy.mean())


def kid(
    features1: Any,
    features2: Any,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Kernel inception distance: the unbiased MMD^2 with the cubic polynomial kernel over
    `num_subsets` random subsets (without replacement) of min(subset_size, N1, N2) rows
    from each set; returns {"kid_mean", "kid_std", "subset_size", "num_subsets"}."""
    features1 = np.asarray(features1, np.float64)
    features2 = np.asarray(features2, np.float64)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature sets differ in shape: {features1.shape} vs {features2.shape}")
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples; have {size}")
    rng = np.random.default_rng(seed)
    values = [
        _unbiased_mmd2_cubic(
            features1[rng.choice(len(features1), size, replace=False)],
            features2[rng.choice(len(features2), size, replace=False)],
        )
        for _ in range(num_subsets)
    ]
    return {
        "kid_mean": float(np.mean(values)),
        "kid_std": float(np.std(values)),
        "subset_size": size,
        "num_subsets": num_subsets,
    }


# --- sharded feature extraction ------------------------------------------------------------


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    axes = tuple(axis for axis in _BATCH_AXES if axis in mesh.axis_names)
    return axes or tuple(mesh.axis_names)


@dataclasses.dataclass(frozen=True)
class FeatureFn:
    """A module jitted over a batch sharded on the mesh's batch axes, parameters replicated.

    Call it with this process's rows of the global batch (and their validity); every process
    gets back the whole batch's features and validity as numpy arrays."""

    module: nn.Module
    mesh: Mesh
    batch_axes: tuple[str, ...]
    params: Any
    apply: Any

    @property
    def batch_divisor(self) -> int:
        """How many ways the batch dimension is split: global batches must be multiples."""
        return math.prod(self.mesh.shape[axis] for axis in self.batch_axes)

    def __call__(
        self, local_images: Any, local_valid: Any | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        local_images = np.asarray(local_images)
        if local_valid is None:
            local_valid = np.ones(local_images.shape[0], bool)
        images = _global_rows(local_images, self.mesh, self.batch_axes)
        valid = _global_rows(np.asarray(local_valid, bool), self.mesh, self.batch_axes)
        features, valid = self.apply(self.params, images, valid)
        return np.asarray(features), np.asarray(valid)


def _global_rows(local: np.ndarray, mesh: Mesh, batch_axes: tuple[str, ...]) -> jax.Array:
    spec = PartitionSpec(batch_axes, *([None] * (local.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def make_feature_fn(module: nn.Module, params: Any, mesh: Mesh) -> FeatureFn:
    """`module.apply(params, images)` (B, ...) -> (B, d) jitted over a batch sharded on the
    mesh's ('data', 'fsdp') axes (all its axes if it has neither), params replicated."""
    batch_axes = _batch_axes(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)

    def features_and_valid(params, images, valid):
        return module.apply(params, images), valid

    apply = jax.jit(features_and_valid, out_shardings=(replicated, replicated))
    return FeatureFn(module, mesh, batch_axes, params, apply)


def extract_features(
    images_iter: Iterable[Any],
    feature_fn: FeatureFn,
    global_batch: int,
    devices: int | Sequence[Any] | None = None,
    *,
    resize_mode: str | None = None,
    image_size: int = 299,
    keep_features: bool = False,
    progress: bool = False,
) -> tuple[FeatureStats, np.ndarray | None]:
    """Run `feature_fn` over image batches (NHWC, any batch sizes, this process's share) in
    global batches of `global_batch`, the last padded; only real rows reach the statistics.

    `devices` (a count or the devices) checks that the batch splits evenly (by default the
    mesh's batch axes do). With `resize_mode` images are resized on the host to `image_size`
    first, and the module's input scaling must be that mode's. Every process must supply
    the same number of images. Returns the statistics and, if `keep_features`, the valid
    features in order (for KID).
    """
    processes = jax.process_count()
    split = feature_fn.batch_divisor
    if devices is not None:
        split = devices if isinstance(devices, int) else len(devices)
    if global_batch % split or global_batch % feature_fn.batch_divisor or global_batch % processes:
        raise ValueError(
            f"global batch {global_batch} must be a multiple of the {split} devices it is split "
            f"over ({feature_fn.batch_divisor} on the mesh's batch axes) and of the "
            f"{processes} processes"
        )
    if resize_mode is not None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize_mode!r}; expected one of {RESIZE_MODES}")
        scaling = getattr(feature_fn.module, "input_scaling", None)
        expected = INPUT_SCALING_BY_RESIZE_MODE[resize_mode]
        if scaling is not None and scaling != expected:
            raise ValueError(
                f"resize mode {resize_mode!r} pairs with input_scaling {expected!r}; the "
                f"module has {scaling!r} (load_inception(..., input_scaling={expected!r}))"
            )
    local_batch = global_batch // processes
    stats: FeatureStats | None = None
    kept: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_rows = 0

    def run(batch: np.ndarray, valid_rows: int) -> None:
        nonlocal stats
        features, valid = feature_fn(batch, np.arange(local_batch) < valid_rows)
        if stats is None:
            stats = FeatureStats(features.shape[-1])
        stats.update(features, valid)
        if keep_features:
            kept.append(np.asarray(features[valid], np.float32))

    show = progress and jax.process_index() == 0
    for images in tqdm(images_iter, desc="features", unit="batch", disable=not show):
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"expected NHWC image batches, got shape {images.shape}")
        if resize_mode is not None:
            images = resize(images, image_size, resize_mode)
        pending.append(images)
        pending_rows += len(images)
        while pending_rows >= local_batch:
            rows = np.concatenate(pending)
            run(rows[:local_batch], local_batch)
            pending, pending_rows = [rows[local_batch:]], pending_rows - local_batch
    if pending_rows:
        rows = np.concatenate(pending)
        padding = np.zeros((local_batch - pending_rows, *rows.shape[1:]), rows.dtype)
        run(np.concatenate([rows, padding]), pending_rows)
    if stats is None:
        raise ValueError("extract_features was given no images")
    return stats, (np.concatenate(kept) if keep_features else None)
