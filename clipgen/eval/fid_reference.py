"""FID reference statistics: the Inception loaded for a resize mode, and the statistics
(and, for KID, the features) of a set of real images written with their provenance."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

import clipgen
from clipgen.data.files import atomic_write
from clipgen.eval import fid as fid_lib
from clipgen.eval.batching import sharded_features
from clipgen.eval.captions import ImageSet
from clipgen.eval.resize import RESIZE_MODES, resize


def reference_features_path(stats_path: str | Path) -> Path:
    """Where the reference features for KID live beside a statistics file."""
    path = Path(stats_path)
    return path.with_name(path.name.removesuffix(".npz") + ".features.npz")


@dataclasses.dataclass
class InceptionFeatures:
    """The FID Inception loaded for one resize mode, jitted over the mesh."""

    weights: str
    resize_mode: str
    image_size: int
    weights_sha256: str
    feature_fn: fid_lib.FeatureFn

    def inputs(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> the network's float input (resized by the resize mode)."""
        return resize(images, self.image_size, self.resize_mode)


def load_inception_features(
    weights: str | Path, resize_mode: str, mesh: Mesh, image_size: int = 299
) -> InceptionFeatures:
    """The Inception from `weights` (.safetensors or .pth), its input scaling matched to
    `resize_mode`, ready to run over `mesh`."""
    from clipgen.weights.inception import load_inception, params_sha256

    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"Inception weights {weights} not found (pt_inception-2015-12-05 as .safetensors; "
            "`clipgen convert inception --pth FILE --out FILE.safetensors` makes one)"
        )
    scaling = fid_lib.INPUT_SCALING_BY_RESIZE_MODE[resize_mode]
    module, params = load_inception(weights, input_scaling=scaling)
    feature_fn = fid_lib.make_feature_fn(module, params, mesh)
    return InceptionFeatures(
        str(weights), resize_mode, image_size, params_sha256(params), feature_fn
    )


def write_reference_stats(
    out: str | Path,
    images: ImageSet,
    inception: InceptionFeatures,
    resolution: int,
    batch_size: int,
    *,
    save_features: bool = False,
) -> dict[str, Any]:
    """Inception statistics of the real images of `images` at `resolution`, written to
    `out` (npz, atomically) with full metadata; with `save_features`, the features too
    (`reference_features_path(out)`, for KID). Returns the metadata."""
    stats, features = sharded_features(
        lambda _, rows: inception.inputs(images.real_images(rows, resolution)),
        len(images),
        inception.feature_fn,
        batch_size,
        keep_features=save_features,
        desc="reference features",
    )
    described = images.describe()
    metadata = {
        "weights_sha256": inception.weights_sha256,
        "weights_file": Path(inception.weights).name,
        "resize_mode": inception.resize_mode,
        "inception_image_size": inception.image_size,
        "resolution": resolution,
        "num_samples": stats.count,
        "split": described.get("split"),
        "seed": described.get("seed"),
        "source": described,
        "clipgen_version": clipgen.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    mean, cov = stats.mean_cov()
    if jax.process_index() == 0:
        fid_lib.save_stats(out, mean, cov, metadata)
        if save_features:
            _save_features(reference_features_path(out), features, metadata)
    return metadata


def _save_features(path: Path, features: np.ndarray, metadata: dict[str, Any]) -> None:
    def write(file):
        buffer = io.BytesIO()
        np.savez(
            buffer,
            features=features.astype(np.float32),
            metadata=np.array(json.dumps(metadata, sort_keys=True)),
        )
        file.write(buffer.getvalue())

    atomic_write(path, write)


def load_features(path: Path, metadata_only: bool = False) -> tuple[Any, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        metadata = json.loads(str(data["metadata"]))
        return (None if metadata_only else data["features"].astype(np.float64)), metadata
