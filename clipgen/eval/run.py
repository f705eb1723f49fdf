"""`clipgen eval` and `clipgen fid-stats`: run the configured evaluators against the
configured generator and write OUT/eval.json and TensorBoard scalars; build FID reference
statistics.

Generators (`config.generator.type`), each `generate(captions, seed) -> uint8 (N, H, W, 3)`:
- `unclip`: the text-to-image cascade, through `unclip_generator(config)`;
- `real`: the real images of the captions (a sanity check: its FID against a reference
  made from the same images is ~0; use it to calibrate);
- `noise`: uniform random images (a floor).
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from clipgen.errors import InputError

if TYPE_CHECKING:  # importing the registry imports JAX, which `validate` runs before
    from clipgen.eval.registry import Generator

GENERATOR_TYPES = ("unclip", "real", "noise")
DEFAULT_BATCH = 64
REUSE_BYTES = 1 << 30  # generated images kept for other evaluators asking the same batch


def validate(config: ml_collections.ConfigDict) -> None:
    """Fail on a config that cannot run, naming the key, before anything heavy is imported."""
    problems = []
    if config.generator.type not in GENERATOR_TYPES:
        problems.append(
            f"config.generator.type={config.generator.type!r}; expected one of {GENERATOR_TYPES}"
        )
    if config.generator.type in ("real", "noise") and config.generator.resolution < 16:
        problems.append(f"config.generator.resolution must be >= 16: {config.generator.resolution}")
    for name in config.evals:
        if not config.evals[name].get("type"):
            problems.append(f"config.evals.{name}.type is empty: name an evaluator type")
    if problems:
        raise InputError("bad eval config: " + "; ".join(problems))


# --- generators -----------------------------------------------------------------------------


def unclip_generator(config: ml_collections.ConfigDict) -> Generator:
    """The unCLIP cascade as a generator: `clipgen.pipelines.unclip.load_pipeline(
    config.generator).generate`."""
    from clipgen.pipelines import unclip

    return unclip.load_pipeline(config.generator).generate


class RealImages:
    """The `real` generator: for each caption, a real image that caption came with, from the
    evaluators' caption sources, at `resolution`. A caption with several images gives them
    in row order, cycling; `rewind()` before each evaluator makes a pass over a source's
    captions (or a prefix of them) return exactly that source's images."""

    def __init__(self, sources: Sequence[Any], resolution: int):
        self.resolution = resolution
        self._images: dict[str, dict[tuple, tuple[Any, int]]] = {}
        for source in sources:
            for row, caption in enumerate(source.captions):
                self._images.setdefault(caption, {}).setdefault(
                    source.image_key(row), (source, row)
                )
        self._served: dict[str, int] = {}

    def rewind(self) -> None:
        self._served = {}

    def __call__(self, captions: list[str], seed: int) -> np.ndarray:
        del seed
        images = []
        for caption in captions:
            if caption not in self._images:
                raise ValueError(
                    f"the real generator has no image for caption {caption!r} (it knows only "
                    "the captions of the configured evaluators' sources)"
                )
            choices = list(self._images[caption].values())
            served = self._served.get(caption, 0)
            self._served[caption] = served + 1
            source, row = choices[served % len(choices)]
            images.append(source.real_images([row], self.resolution)[0])
        return np.stack(images)


def noise_generator(resolution: int) -> Generator:
    """Uniform random uint8 images, seeded."""

    def generate(captions: list[str], seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (len(captions), resolution, resolution, 3), dtype=np.uint8)

    return generate


class ReusedGenerations:
    """A deterministic generator that remembers its batches by (captions, seed), so that
    evaluators asking for the same captions with the same seed (the oracle and the CLIP
    score on one split) share one generation. Keeps at most `max_bytes` of images, dropping
    the oldest batches first."""

    def __init__(self, generate: Generator, max_bytes: int = REUSE_BYTES):
        self.generate = generate
        self.max_bytes = max_bytes
        self.reused = 0
        self._batches: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    def __call__(self, captions: list[str], seed: int) -> np.ndarray:
        key = (tuple(captions), int(seed))
        if key in self._batches:
            self.reused += len(captions)
            return self._batches[key].copy()
        images = np.asarray(self.generate(captions, seed))
        self._batches[key] = images
        self._bytes += images.nbytes
        while self._bytes > self.max_bytes and self._batches:
            _, dropped = self._batches.popitem(last=False)
            self._bytes -= dropped.nbytes
        return images.copy()


def make_generator(config: ml_collections.ConfigDict, caption_sources: Sequence[Any]) -> Generator:
    """The generator `config.generator.type` names."""
    kind = config.generator.type
    if kind == "unclip":
        return ReusedGenerations(unclip_generator(config))
    if kind == "real":
        return RealImages(caption_sources, int(config.generator.resolution))
    if kind == "noise":
        return noise_generator(int(config.generator.resolution))
    raise ValueError(f"config.generator.type={kind!r}; expected one of {GENERATOR_TYPES}")


# --- clipgen eval ---------------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Run every evaluator of `config.evals` against the configured generator; write
    `workdir/eval.json` (atomically) and the scalars to TensorBoard. Returns the report."""
    import jax
    from clu import metric_writers

    import clipgen
    from clipgen.data.files import atomic_write
    from clipgen.eval import registry

    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    needs_sources = config.generator.type == "real"
    generate = None if needs_sources else make_generator(config, [])  # fail before loading
    evaluators, skipped = registry.build_all(config.evals, output_dir=workdir)
    for name, evaluator in evaluators.items():
        if evaluator.INPUT != "generator":
            raise ValueError(
                f"config.evals.{name} ({config.evals[name].type}) scores a trained stage's "
                "parameters, not a generator: it runs in `clipgen train` (config.evals of a "
                "stage config)"
            )
    if needs_sources:
        sources = [source for e in evaluators.values() for source in e.caption_sources]
        generate = make_generator(config, sources)
    writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0
    )
    results: dict[str, Any] = {
        name: {"type": config.evals[name].type, "skipped": reason}
        for name, reason in skipped.items()
    }
    try:
        for name, evaluator in evaluators.items():
            if isinstance(generate, RealImages):
                generate.rewind()
            started = time.perf_counter()
            metrics = evaluator(generate)
            results[name] = {
                "type": config.evals[name].type,
                "metrics": metrics,
                "extras": evaluator.extras,
                "seconds": round(time.perf_counter() - started, 3),
            }
            writer.write_scalars(0, {f"{name}/{key}": value for key, value in metrics.items()})
            logging.info("%s: %s", name, metrics)
    finally:
        writer.flush()
    report = {
        "clipgen_version": clipgen.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "generator": config.generator.to_dict(),
        "evals": {name: results[name] for name in config.evals if name in results},
        "config": json.loads(config.to_json_best_effort()),
    }
    if jax.process_index() == 0:
        encoded = json.dumps(report, indent=2, default=_json_default).encode()
        atomic_write(workdir / "eval.json", lambda file: file.write(encoded))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- clipgen fid-stats ----------------------------------------------------------------------


def fid_stats(
    inception: str | Path,
    out: str | Path,
    *,
    coco_dir: str | None = None,
    shapes_split: str | None = None,
    num: int | None = None,
    resolution: int = 256,
    resize_mode: str = "tf1_bilinear",
    seed: int = 0,
    batch_size: int | None = None,
    save_features: bool = False,
) -> dict[str, Any]:
    """Write Inception reference statistics of real images to `out` and return their
    metadata. COCO: all captioned val2014 images, or with `num` the images of the first
    `num` drawn captions (seed); shapes: the first `num` (default 2048) renders of a split."""
    from clipgen.eval import captions, fid_reference, registry

    if (coco_dir is None) == (shapes_split is None):
        raise ValueError("give exactly one of coco_dir and shapes_split")
    if coco_dir is not None:
        images = captions.CocoImages(coco_dir, num, seed)
    else:
        images = captions.ShapesCaptions(shapes_split, 2048 if num is None else num, seed)
    mesh = registry.default_mesh()
    features = fid_reference.load_inception_features(inception, resize_mode, mesh)
    divisor = features.feature_fn.batch_divisor
    if batch_size is None:
        batch_size = -(-DEFAULT_BATCH // divisor) * divisor
    return fid_reference.write_reference_stats(
        out, images, features, resolution, batch_size, save_features=save_features
    )


def describe_stats(path: str | Path) -> str:
    """One line about a statistics file, for the command's output."""
    from clipgen.eval.fid import load_stats

    mu, _, metadata = load_stats(path)
    shown = {k: metadata.get(k) for k in ("num_samples", "resolution", "resize_mode", "split")}
    return f"{path}: {mu.shape[0]}-d statistics, " + ", ".join(f"{k}={v}" for k, v in shown.items())
