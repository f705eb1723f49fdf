"""Evaluators of a text-to-image generator, built by name from config.

A generator is `generate(captions: list[str], seed: int) -> uint8 images (N, H, W, 3)`. An
evaluator is called with one and returns {metric: float}; afterwards its `extras` hold
JSON-able details (conventions, sample counts, statistics provenance). Types:

- `fid`: Inception FID (and optionally KID) of generated images against reference
  statistics from an npz (`clipgen fid-stats`), refusing references whose weights or
  resize mode differ.
- `clip_score`: CLIP score of generated images against their captions, with the
  conventions declared, and the Frechet distance to the real images in CLIP's image space.
- `shapes_oracle`: the shapes-world oracle's whole-caption and per-attribute accuracy.

Generation and feature extraction run in global batches (`batch_size`, a multiple of the
devices and processes): each process generates its rows of a batch, the features are
computed sharded over the mesh, and padded rows of the last batch are masked. Batch k is
generated with seed `generation_seed(seed, k, process)`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from clipgen.data import shapes
from clipgen.data.pipeline import ProceduralShapes
from clipgen.data.preprocess import clip_preprocess
from clipgen.eval import fid as fid_lib
from clipgen.eval.clip_score import CLAMP_PLACES, clip_frechet_distance, clip_score
from clipgen.eval.coco import COCO_RESOLUTION, CocoVal
from clipgen.eval.resize import RESIZE_MODES, resize

Generator = Callable[[list[str], int], np.ndarray]

_EVALUATORS: dict[str, type[Evaluator]] = {}


class Skipped(Exception):  # noqa: N818 - an outcome, not an error
    """An optional evaluator lacks what it needs (say, Inception weights); the message says
    what, and the report records it instead of a score."""


def register(type_name: str) -> Callable[[type[Evaluator]], type[Evaluator]]:
    """Class decorator: make an `Evaluator` subclass buildable as `evals.<name>.type`."""

    def decorate(cls: type[Evaluator]) -> type[Evaluator]:
        if type_name in _EVALUATORS and _EVALUATORS[type_name] is not cls:
            raise ValueError(f"evaluator type {type_name!r} is already registered")
        _EVALUATORS[type_name] = cls
        return cls

    return decorate


def registered_types() -> tuple[str, ...]:
    return tuple(sorted(_EVALUATORS))


def build(
    name: str,
    eval_config: Mapping[str, Any],
    *,
    mesh: Mesh | None = None,
    output_dir: str | Path | None = None,
) -> Evaluator:
    """The evaluator `eval_config.type` configured by `eval_config`; raises `Skipped` for an
    optional one that cannot run here, ValueError for a bad config (naming the key).
    Features are computed on `mesh` (default: all devices on 'data'); files go under
    `output_dir` if given."""
    type_name = eval_config.get("type") if eval_config is not None else None
    if type_name not in _EVALUATORS:
        raise ValueError(
            f"evals.{name}.type={type_name!r} is not an evaluator type; "
            f"registered: {', '.join(registered_types())}"
        )
    return _EVALUATORS[type_name](name, eval_config, mesh=mesh, output_dir=output_dir)


def build_all(
    evals_config: Mapping[str, Any], **kwargs: Any
) -> tuple[dict[str, Evaluator], dict[str, str]]:
    """({name: evaluator}, {name: reason skipped}) for every entry of `config.evals`."""
    evaluators, skipped = {}, {}
    for name in evals_config:
        try:
            evaluators[name] = build(name, evals_config[name], **kwargs)
        except Skipped as reason:
            logging.warning("evaluator %s skipped: %s", name, reason)
            skipped[name] = str(reason)
    return evaluators, skipped


class Evaluator:
    """Scores a generator: `evaluator(generate) -> {metric: float}`. Subclasses declare
    their settings with defaults in `DEFAULTS` and list their `caption_sources`."""

    DEFAULTS: dict[str, Any] = {}

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any],
        *,
        mesh: Mesh | None = None,
        output_dir: str | Path | None = None,
    ):
        self.name = name
        self.settings = merge_settings(f"evals.{name}", config, self.DEFAULTS)
        self.mesh = mesh if mesh is not None else default_mesh()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.caption_sources: list[CaptionSource] = []
        self.extras: dict[str, Any] = {}

    def __call__(self, generate: Generator) -> dict[str, float]:
        raise NotImplementedError


def merge_settings(where: str, config: Mapping[str, Any] | None, defaults: dict[str, Any]) -> dict:
    """`config` over `defaults` as a plain dict; unknown keys raise ValueError naming them."""
    if config is None:
        given: dict[str, Any] = {}
    elif hasattr(config, "to_dict"):
        given = config.to_dict()
    else:
        given = dict(config)
    given.pop("type", None)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


@functools.cache
def default_mesh() -> Mesh:
    """All devices on the 'data' axis."""
    from clipgen import parallel

    return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


# --- caption sources ------------------------------------------------------------------------


class ImageSet(Protocol):
    """Real images addressed by row: `len()`, `real_images(rows, resolution)` (uint8 NHWC),
    `image_key(row)` (equal for the same image in any set) and `describe()` (provenance)."""

    def __len__(self) -> int: ...
    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray: ...
    def image_key(self, row: int) -> tuple: ...
    def describe(self) -> dict[str, Any]: ...


class CaptionSource(ImageSet, Protocol):
    """An ImageSet whose row i also has a caption, `captions[i]`."""

    captions: list[str]


class ShapesCaptions:
    """The first `count` examples of a shapes-world split: captions, and their scenes
    rendered as the real images."""

    def __init__(self, split: str = "test", count: int = 1000, seed: int = 0):
        stream = ProceduralShapes((), split, seed)
        examples = [stream[i] for i in range(count)]
        self.split, self.count, self.seed = split, count, seed
        self.captions = [example["caption"] for example in examples]
        self.scenes = [shapes.scene_from_json(example["scene"]) for example in examples]

    def __len__(self) -> int:
        return self.count

    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray:
        return np.stack([shapes.render(self.scenes[int(row)], resolution) for row in rows])

    def image_key(self, row: int) -> tuple:
        return ("shapes", self.split, self.seed, int(row))

    def describe(self) -> dict[str, Any]:
        return {"source": "shapes", "split": self.split, "count": self.count, "seed": self.seed}


class CocoCaptions:
    """COCO 2014 val captions drawn by the COCO-30K protocol (clipgen.eval.coco); the real
    image of row i is the image caption i describes, centre-cropped and resized."""

    def __init__(self, coco_dir: str, num: int, seed: int = 0):
        self.coco = _coco_val(str(Path(coco_dir).resolve()))
        self.coco_dir, self.num, self.seed = str(coco_dir), num, seed
        self.drawn = self.coco.draw_captions(num, seed)
        self.captions = [drawn.caption for drawn in self.drawn]

    def __len__(self) -> int:
        return self.num

    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray:
        return self.coco.load_images([self.drawn[int(row)].image_id for row in rows], resolution)

    def image_key(self, row: int) -> tuple:
        return ("coco", str(self.coco.root.resolve()), self.drawn[int(row)].image_id)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "coco",
            "coco_dir": self.coco_dir,
            "split": "val2014",
            "count": self.num,
            "seed": self.seed,
            "draw": "images without replacement, one random caption each (clipgen.eval.coco)",
            "crop_resize": "centre square crop, PIL bicubic",
        }


class CocoImages:
    """COCO 2014 val images as a reference set: all captioned images by id, or the images of
    the first `num` drawn captions."""

    def __init__(self, coco_dir: str, num: int | None = None, seed: int = 0):
        self.coco = _coco_val(str(Path(coco_dir).resolve()))
        self.coco_dir, self.seed = str(coco_dir), seed
        self.subset = "all captioned images" if num is None else f"images of {num} drawn captions"
        self.image_ids = (
            list(self.coco.image_ids) if num is None else self.coco.drawn_image_ids(num, seed)
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray:
        return self.coco.load_images([self.image_ids[int(row)] for row in rows], resolution)

    def image_key(self, row: int) -> tuple:
        return ("coco", str(self.coco.root.resolve()), self.image_ids[int(row)])

    def describe(self) -> dict[str, Any]:
        return {
            "source": "coco",
            "coco_dir": self.coco_dir,
            "split": "val2014",
            "subset": self.subset,
            "count": len(self),
            "seed": self.seed,
            "crop_resize": "centre square crop, PIL bicubic",
        }


@functools.lru_cache(maxsize=4)
def _coco_val(coco_dir: str) -> CocoVal:
    return CocoVal(coco_dir)


CAPTION_DEFAULTS = {"source": "", "split": "test", "count": 1000, "seed": 0, "coco_dir": ""}


def caption_source(where: str, config: Mapping[str, Any]) -> CaptionSource:
    """`{"source": "shapes", "split", "count", "seed"}` or `{"source": "coco", "coco_dir",
    "count", "seed"}`."""
    options = merge_settings(where, config, CAPTION_DEFAULTS)
    if options["source"] == "shapes":
        return ShapesCaptions(options["split"], int(options["count"]), int(options["seed"]))
    if options["source"] == "coco":
        if not options["coco_dir"]:
            raise ValueError(f"{where}.coco_dir is empty: give the COCO 2014 directory")
        return CocoCaptions(options["coco_dir"], int(options["count"]), int(options["seed"]))
    raise ValueError(f"{where}.source={options['source']!r}; expected 'shapes' or 'coco'")


# --- batching over devices and processes ----------------------------------------------------


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


def _generate_rows(
    generate: Generator, captions: Sequence[str], seed: int, where: str
) -> Callable[[int, np.ndarray], np.ndarray]:
    def rows_to_images(number: int, rows: np.ndarray) -> np.ndarray:
        chosen = [captions[int(row)] for row in rows]
        images = generate(chosen, generation_seed(seed, number, jax.process_index()))
        return checked_images(images, len(chosen), where)

    return rows_to_images


# --- FID ------------------------------------------------------------------------------------


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
    import clipgen

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
    from clipgen.data.files import atomic_write

    def write(file):
        buffer = io.BytesIO()
        np.savez(
            buffer,
            features=features.astype(np.float32),
            metadata=np.array(json.dumps(metadata, sort_keys=True)),
        )
        file.write(buffer.getvalue())

    atomic_write(path, write)


def _load_features(path: Path, metadata_only: bool = False) -> tuple[Any, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        metadata = json.loads(str(data["metadata"]))
        return (None if metadata_only else data["features"].astype(np.float64)), metadata


@register("fid")
class FIDEvaluator(Evaluator):
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
                raise Skipped(message)
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
        self.inception = load_inception_features(
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
            features_path = reference_features_path(self.reference_path)
            if not features_path.is_file():
                raise FileNotFoundError(
                    f"evals.{self.name}.kid needs the reference features {features_path}; "
                    "write them with `clipgen fid-stats ... --save-features`"
                )
            features_metadata = _load_features(features_path, metadata_only=True)[1]
            try:
                fid_lib.check_comparable(features_metadata, self._expected_metadata())
            except ValueError as error:
                raise ValueError(f"evals.{self.name}: {features_path}: {error}") from None
        return mu, sigma, metadata

    def _build_reference(self) -> None:
        logging.info("building FID reference statistics %s", self.reference_path)
        write_reference_stats(
            self.reference_path,
            self.captions,
            self.inception,
            int(self.settings["reference_resolution"]),
            int(self.settings["batch_size"]),
            save_features=bool(self.settings["kid"]),
        )
        _wait_for_process_zero("FID reference written")
        self.reference = self._load_reference()

    def __call__(self, generate: Generator) -> dict[str, float]:
        options = self.settings
        if self.reference is None:
            self._build_reference()
        ref_mu, ref_sigma, ref_metadata = self.reference
        generated_resolution: list[int] = []
        generate_rows = _generate_rows(generate, self.captions.captions, options["seed"], self.name)

        def rows_to_inputs(number: int, rows: np.ndarray) -> np.ndarray:
            images = generate_rows(number, rows)
            generated_resolution.append(images.shape[1])
            return self.inception.inputs(images)

        few_samples = len(self.captions) <= ref_mu.shape[0]
        stats, features = sharded_features(
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
            ref_features, _ = _load_features(reference_features_path(self.reference_path))
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


# --- CLIP score -----------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedCLIP:
    """A CLIP ready to embed: its tokenizer, jitted image and text embedders over the
    mesh, the image size it takes, and a description of its backbone."""

    tokenizer: Any
    image_features: fid_lib.FeatureFn
    text_features: fid_lib.FeatureFn
    image_size: int
    backbone: str


@dataclasses.dataclass(frozen=True)
class _CLIPMethod:
    """`apply(variables, inputs)` of one CLIP method, the shape `make_feature_fn` runs."""

    module: Any
    method: str

    def apply(self, variables: Any, inputs: Any) -> Any:
        if self.method == "encode_text":  # ids and mask arrive stacked on the last axis
            return self.module.apply(variables, inputs[..., 0], inputs[..., 1], method=self.method)
        return self.module.apply(variables, inputs, method=self.method)


CLIP_DEFAULTS = {"source": "clipgen", "preset": "demo", "workdir": "", "path": "", "tokenizer": ""}


def load_clip_for_eval(where: str, config: Mapping[str, Any], mesh: Mesh) -> LoadedCLIP:
    """`{"source": "clipgen", "preset", "workdir"}` (a clipgen CLIP run, configs/clip.py
    preset, EMA weights) or `{"source": "transformers", "path", "tokenizer"}` (a
    save_pretrained directory; the tokenizer is that directory, an OpenAI .txt.gz vocab or a
    clipgen tokenizer .json)."""
    options = merge_settings(where, config, CLIP_DEFAULTS)
    if options["source"] == "clipgen":
        from clipgen.embed import load_trained_clip
        from clipgen.train.config import load_preset

        workdir = Path(options["workdir"])
        if not options["workdir"] or not (workdir / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"{where}.workdir: no CLIP run at {str(workdir)!r} (no checkpoints/ in it); train "
                f"one with `clipgen train --config configs/clip.py:{options['preset']} "
                f"--workdir DIR` (or `clipgen demo`)"
            )
        config = load_preset("clip", options["preset"])
        tokenizer, module, params, step = load_trained_clip(config, workdir)
        vision = module.vision
        backbone = (
            f"clipgen CLIP {options['preset']} (ViT {vision.image_size}px/{vision.patch_size}, "
            f"width {vision.width} x {vision.layers}) at {workdir}, step {step}, EMA"
        )
    elif options["source"] == "transformers":
        from clipgen.weights.clip import load_clip

        path = Path(options["path"])
        if not options["path"] or not path.is_dir():
            raise FileNotFoundError(f"{where}.path: no transformers CLIP directory {str(path)!r}")
        module, params = load_clip(path)
        tokenizer = _load_tokenizer(where, options["tokenizer"] or str(path), module)
        vision = module.vision
        backbone = (
            f"transformers CLIP at {path} (ViT {vision.image_size}px/{vision.patch_size}, "
            f"width {vision.width} x {vision.layers})"
        )
    else:
        raise ValueError(f"{where}.source={options['source']!r}; expected clipgen or transformers")
    variables = params if "params" in params else {"params": params}
    return LoadedCLIP(
        tokenizer,
        fid_lib.make_feature_fn(_CLIPMethod(module, "encode_image"), variables, mesh),
        fid_lib.make_feature_fn(_CLIPMethod(module, "encode_text"), variables, mesh),
        module.vision.image_size,
        backbone,
    )


def _load_tokenizer(where: str, spec: str, module: Any) -> Any:
    from clipgen.data.tokenizer import Tokenizer

    path, length = Path(spec), module.text.context_length
    if path.is_dir():
        tokenizer = Tokenizer.from_hf_directory(path, length)
    elif path.name.endswith(".txt.gz"):
        tokenizer = Tokenizer.from_bpe_vocab(path, length)
    elif path.suffix == ".json" and path.is_file():
        tokenizer = Tokenizer.load(path)
    else:
        raise FileNotFoundError(
            f"{where}.tokenizer: {spec!r} is not a tokenizer directory, .txt.gz vocab or .json"
        )
    if tokenizer.context_length > length or tokenizer.vocab_size > module.text.vocab_size:
        raise ValueError(
            f"{where}.tokenizer {spec}: context {tokenizer.context_length} / vocabulary "
            f"{tokenizer.vocab_size} exceed the model's {length} / {module.text.vocab_size}"
        )
    if module.text.eos_token_id not in (2, tokenizer.end_id):
        raise ValueError(
            f"{where}.tokenizer {spec}: its end token id {tokenizer.end_id} is not the model's "
            f"eos_token_id {module.text.eos_token_id}, so text pooling would be wrong"
        )
    return tokenizer


@register("clip_score")
class CLIPScoreEvaluator(Evaluator):
    """CLIP score of generated images against their captions (conventions declared in the
    extras), and with `clip_fd` the Frechet distance between the CLIP image embeddings of
    the generated and the real images of the same captions."""

    DEFAULTS = {
        "captions": None,
        "clip": None,
        "backbone": "",
        "scale": 100.0,
        "clamp": "mean",
        "caption_prefix": "",
        "clip_fd": True,
        "batch_size": 64,
        "seed": 0,
        "optional": False,
    }

    def __init__(self, name: str, config: Mapping[str, Any], **kwargs: Any):
        super().__init__(name, config, **kwargs)
        where, options = f"evals.{name}", self.settings
        if options["clamp"] not in CLAMP_PLACES:
            raise ValueError(f"{where}.clamp={options['clamp']!r}; expected one of {CLAMP_PLACES}")
        self.captions = caption_source(f"{where}.captions", options["captions"])
        self.caption_sources = [self.captions]
        clip_options = options["clip"] or {}
        if options["optional"] and not (clip_options.get("workdir") or clip_options.get("path")):
            raise Skipped("no CLIP given: set clip.path (transformers) or clip.workdir (clipgen)")
        self.clip = load_clip_for_eval(f"{where}.clip", clip_options, self.mesh)

    def _embed_images(self, rows_to_images, desc: str) -> np.ndarray:
        _, embeds = sharded_features(
            lambda number, rows: clip_preprocess(
                rows_to_images(number, rows), self.clip.image_size
            ),
            len(self.captions),
            self.clip.image_features,
            int(self.settings["batch_size"]),
            keep_features=True,
            desc=desc,
        )
        return embeds

    def __call__(self, generate: Generator) -> dict[str, float]:
        options = self.settings
        captions = self.captions.captions
        resolutions: list[int] = []
        generate_rows = _generate_rows(generate, captions, options["seed"], self.name)

        def generated(number: int, rows: np.ndarray) -> np.ndarray:
            images = generate_rows(number, rows)
            resolutions.append(images.shape[1])
            return images

        image_embeds = self._embed_images(generated, f"{self.name}: generate + CLIP")
        prefix = options["caption_prefix"]

        def tokens(_, rows: np.ndarray) -> np.ndarray:
            ids, mask = self.clip.tokenizer.encode([prefix + captions[int(row)] for row in rows])
            return np.stack([ids, mask], axis=-1)

        _, text_embeds = sharded_features(
            tokens,
            len(captions),
            self.clip.text_features,
            int(options["batch_size"]),
            keep_features=True,
            desc=f"{self.name}: captions",
        )
        score = clip_score(
            image_embeds,
            text_embeds,
            backbone=options["backbone"] or self.clip.backbone,
            scale=float(options["scale"]),
            clamp=options["clamp"],
            caption_prefix=prefix,
        )
        metrics = {"clip_score": score["clip_score"]}
        self.extras = {
            key: score[key] for key in ("backbone", "scale", "clamp", "caption_prefix")
        } | {
            "num_samples": score["num_samples"],
            "per_sample_std": float(np.std(score["per_sample"])),
            "captions": self.captions.describe(),
        }
        if options["clip_fd"]:
            resolution = resolutions[0]
            real_embeds = self._embed_images(
                lambda _, rows: self.captions.real_images(rows, resolution),
                f"{self.name}: real images + CLIP",
            )
            metrics["clip_fd"] = clip_frechet_distance(real_embeds, image_embeds)
            self.extras["clip_fd"] = {
                "space": "CLIP image embeddings as projected, unnormalised (clean-fid CLIP-FID)",
                "real_images": f"the captions' real images at the generated {resolution} px",
            }
        return metrics


# --- shapes-world oracle --------------------------------------------------------------------

_ORACLE_KEYS = ("whole", *shapes.ATTRIBUTES, "background", "count")


@register("shapes_oracle")
class ShapesOracleEvaluator(Evaluator):
    """The oracle's accuracy on generated shapes-world images: for each split, whole-caption
    and per-attribute accuracy of `oracle(image)` against `parse(caption)`, over all
    captions and over the single-object ones (metric keys `<split>/<all|single>/<what>`)."""

    DEFAULTS = {
        "splits": ("test", "heldout"),
        "count": 200,
        "data_seed": 0,
        "seed": 0,
        "batch_size": 32,
    }

    def __init__(self, name: str, config: Mapping[str, Any], **kwargs: Any):
        super().__init__(name, config, **kwargs)
        options = self.settings
        self.sources = {
            split: ShapesCaptions(split, int(options["count"]), int(options["data_seed"]))
            for split in options["splits"]
        }
        self.caption_sources = list(self.sources.values())

    def __call__(self, generate: Generator) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.extras = {"counts": {}, "captions": {}}
        for split, source in self.sources.items():
            for subset, tally in self._tally(generate, split, source).items():
                tally = _sum_over_processes(tally)
                self.extras["counts"][f"{split}/{subset}"] = int(tally[0])
                if tally[0]:
                    for key, matches in zip(_ORACLE_KEYS, tally[1:], strict=True):
                        metrics[f"{split}/{subset}/{key}"] = float(matches / tally[0])
            self.extras["captions"][split] = source.describe()
        return metrics

    def _tally(
        self, generate: Generator, split: str, source: ShapesCaptions
    ) -> dict[str, np.ndarray]:
        """{"all" | "single": [captions, matches of each of _ORACLE_KEYS]} over this
        process's rows."""
        options = self.settings
        targets = [shapes.parse(caption) for caption in source.captions]
        tallies = {subset: np.zeros(1 + len(_ORACLE_KEYS)) for subset in ("all", "single")}
        generate_rows = _generate_rows(generate, source.captions, options["seed"], self.name)
        batches = process_batches(len(source), int(options["batch_size"]))
        show = jax.process_index() == 0
        for number, rows, real in tqdm(
            batches, desc=f"{self.name}: {split}", unit="batch", disable=not show
        ):
            for image, row in zip(generate_rows(number, rows)[real], rows[real], strict=True):
                target = targets[int(row)]
                correct = shapes.attribute_accuracy(shapes.oracle(image), target)
                counts = np.array([1.0] + [float(correct[key]) for key in _ORACLE_KEYS])
                tallies["all"] += counts
                if len(target.objects) == 1:
                    tallies["single"] += counts
        return tallies


def _wait_for_process_zero(what: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(what)


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
