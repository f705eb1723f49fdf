"""`fid`: Inception FID (and optionally KID) of generated images against reference
statistics from an npz (`clipgen fid-stats`), refusing references whose weights or resize
mode differ."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from clipgen.eval import batching, fid_reference, registry
from clipgen.eval import fid as fid_lib
from clipgen.eval.captions import caption_source
from clipgen.eval.coco import COCO_RESOLUTION


class Evaluator(registry.Evaluator):
    """Inception FID (and KID) of generated images against reference statistics.

    The reference npz must record the same weights hash and resize mode (checked when the
    evaluator is built, before anything is generated). With `build_reference` a missing
    reference is made from the caption source's real images and saved at that path."""

    DEFAULTS = {
        "captions": None,
        "inception_weights": "",
        "reference_stats": "",
        "resize_mode": "tf1_bilinear",
        "image_size": 299,
        "batch_size": 64,
        "seed": 0,  # of the generator (see generation_seed); the captions have their own
        "kid": False,
        "kid_subsets": 100,
        "kid_subset_size": 1000,
        "optional": False,
        "build_reference": False,  # make a missing reference from the captions' real images
        "reference_resolution": COCO_RESOLUTION,  # their size when it does
    }

    def __init__(self, name: str, config: Mapping[str, Any], **kwargs: Any):
        super().__init__(name, config, **kwargs)
        options, where = self.settings, f"evals.{name}"
        if not options["inception_weights"]:
            message = (
                "no Inception weights: set inception_weights to pt_inception-2015-12-05 as "
                ".safetensors (`clipgen convert inception` makes one from the .pth)"
            )
            if options["optional"]:
                raise registry.Skipped(message)
            raise ValueError(f"{where}.inception_weights is empty: {message}")
        if not options["reference_stats"]:
            raise ValueError(
                f"{where}.reference_stats is empty: give an npz made by `clipgen fid-stats`"
            )
        self.reference_path = Path(options["reference_stats"])
        if not self.reference_path.is_file() and not options["build_reference"]:
            raise FileNotFoundError(
                f"{where}: reference statistics {self.reference_path} not found; make them with "
                "`clipgen fid-stats --inception WEIGHTS --out STATS.npz (--coco-dir DIR | "
                "--shapes-split SPLIT)`"
            )
        self.captions = caption_source(f"{where}.captions", options["captions"])
        self.caption_sources = [self.captions]
        self.inception = fid_reference.load_inception_features(
            options["inception_weights"], options["resize_mode"], self.mesh, options["image_size"]
        )
        self.reference: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None
        if self.reference_path.is_file():
            self.reference = self._load_reference()

    def _expected_metadata(self) -> dict[str, Any]:
        return {
            "weights_sha256": self.inception.weights_sha256,
            "resize_mode": self.inception.resize_mode,
        }

    def _load_reference(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mu, sigma, metadata = fid_lib.load_stats(self.reference_path)
        try:
            fid_lib.check_comparable(metadata, self._expected_metadata())
        except ValueError as error:
            raise ValueError(
                f"evals.{self.name}: reference {self.reference_path} does not fit this "
                f"evaluation ({error}); rebuild it with `clipgen fid-stats` using the same "
                f"weights and --resize-mode {self.inception.resize_mode}"
            ) from None
        if self.settings["kid"]:
            features_path = fid_reference.reference_features_path(self.reference_path)
            if not features_path.is_file():
                raise FileNotFoundError(
                    f"evals.{self.name}.kid needs the reference features {features_path}; "
                    "write them with `clipgen fid-stats ... --save-features`"
                )
            features_metadata = fid_reference.load_features(features_path, metadata_only=True)[1]
            try:
                fid_lib.check_comparable(features_metadata, self._expected_metadata())
            except ValueError as error:
                raise ValueError(f"evals.{self.name}: {features_path}: {error}") from None
        return mu, sigma, metadata

    def _build_reference(self) -> None:
        logging.info("building FID reference statistics %s", self.reference_path)
        fid_reference.write_reference_stats(
            self.reference_path,
            self.captions,
            self.inception,
            int(self.settings["reference_resolution"]),
            int(self.settings["batch_size"]),
            save_features=bool(self.settings["kid"]),
        )
        batching.wait_for_process_zero("FID reference written")
        self.reference = self._load_reference()

    def __call__(self, generate: registry.Generator) -> dict[str, float]:
        options = self.settings
        if self.reference is None:
            self._build_reference()
        ref_mu, ref_sigma, ref_metadata = self.reference
        generated_resolution: list[int] = []
        generate_rows = batching.generated_rows(
            generate, self.captions.captions, options["seed"], self.name
        )

        def rows_to_inputs(number: int, rows: np.ndarray) -> np.ndarray:
            images = generate_rows(number, rows)
            generated_resolution.append(images.shape[1])
            return self.inception.inputs(images)

        few_samples = len(self.captions) <= ref_mu.shape[0]
        stats, features = batching.sharded_features(
            rows_to_inputs,
            len(self.captions),
            self.inception.feature_fn,
            int(options["batch_size"]),
            keep_features=bool(options["kid"]) or few_samples,
            desc=f"{self.name}: generate + Inception",
        )
        mu, sigma = stats.mean_cov()
        if few_samples:
            fid = fid_lib.frechet_distance_few_samples(features, ref_mu, ref_sigma)
        else:
            fid = fid_lib.frechet_distance(mu, sigma, ref_mu, ref_sigma)
        metrics = {"fid": fid}
        resolution = generated_resolution[0]
        if resolution != ref_metadata.get("resolution"):
            logging.warning(
                "%s: generated images are %d px, the reference was built at %s px",
                self.name,
                resolution,
                ref_metadata.get("resolution"),
            )
        if options["kid"]:
            ref_features, _ = fid_reference.load_features(
                fid_reference.reference_features_path(self.reference_path)
            )
            kid = fid_lib.kid(
                features,
                ref_features,
                int(options["kid_subsets"]),
                int(options["kid_subset_size"]),
                seed=int(options["seed"]),
            )
            metrics["kid"], metrics["kid_std"] = kid["kid_mean"], kid["kid_std"]
        metadata = {
            **self._expected_metadata(),
            "resolution": resolution,
            "num_samples": stats.count,
            "split": self.captions.describe().get("split"),
            "seed": options["seed"],
            "captions": self.captions.describe(),
        }
        if self.output_dir is not None and jax.process_index() == 0:
            fid_lib.save_stats(self.output_dir / f"{self.name}_generated.npz", mu, sigma, metadata)
        self.extras = {
            "generated": metadata,
            "reference_stats": str(self.reference_path),
            "reference": ref_metadata,
            "image_size": self.inception.image_size,
            "fid_mode": f"{self.inception.resize_mode} resize, Inception pt_inception-2015-12-05",
            "distance": "N x N eigenvalues (N <= d)" if few_samples else "scipy sqrtm",
        }
        return metrics
