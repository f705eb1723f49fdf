"""Evaluators by name, as big_vision's: `config.evals.<name> = {"type": T, ...settings}`
builds `clipgen.eval.evaluators.<T>.Evaluator`, one module per type. This file keeps the
registration and building only.

Two kinds, by what an evaluator is called with (its `INPUT`):
- "generator": a text-to-image generator `generate(captions: list[str], seed: int) ->
  uint8 images (N, H, W, 3)` (fid, clip_score, shapes_oracle; `clipgen eval` runs them);
- "params": a trained stage's parameters, built for the stage config it is given
  (clip_retrieval, prior_retrieval, decoder_oracle, upsampler_psnr; `clipgen train` and the
  demo hand them to the training loop through `training_evaluators`).
An evaluator returns {metric: float}; afterwards its `extras` hold JSON-able details
(conventions, sample counts, statistics provenance).
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

Generator = Callable[[list[str], int], np.ndarray]
INPUTS = ("generator", "params")


class Skipped(Exception):  # noqa: N818 - an outcome, not an error
    """An optional evaluator lacks what it needs (say, Inception weights); the message says
    what, and the report records it instead of a score."""


class Evaluator:
    """Scores a generator or a stage's parameters: `evaluator(subject) -> {metric: float}`.
    Subclasses declare their settings with defaults in `DEFAULTS`, what they are called
    with in `INPUT`, and list their `caption_sources` (real images the `real` generator of
    `clipgen eval` serves)."""

    DEFAULTS: dict[str, Any] = {}
    INPUT = "generator"

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any],
        *,
        mesh: Mesh | None = None,
        output_dir: str | Path | None = None,
        stage_config: ml_collections.ConfigDict | None = None,
    ):
        self.name = name
        self.settings = merge_settings(f"evals.{name}", config, self.DEFAULTS)
        self.mesh = mesh if mesh is not None else default_mesh()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.stage_config = stage_config
        self.caption_sources: list = []
        self.extras: dict[str, Any] = {}
        if self.INPUT == "params" and stage_config is None:
            raise ValueError(f"evals.{name}: a stage evaluator needs the stage's config")

    def __call__(self, subject: Any) -> dict[str, float]:
        raise NotImplementedError


class StageEvaluator(Evaluator):
    """An evaluator of a trained stage's parameters (see the module docstring); with
    READS_EMBEDDINGS it scores against the stage's embedding shards and is skipped for a
    stage trained on synthetic ones."""

    INPUT = "params"
    DEFAULTS: dict[str, Any] = {"use_ema": True}
    READS_EMBEDDINGS = False

    def __init__(self, name: str, config: Mapping[str, Any], **kwargs: Any):
        super().__init__(name, config, **kwargs)
        if self.READS_EMBEDDINGS and self.stage_config.data.embeddings == "synthetic":
            raise Skipped(f"{name}: the stage trains on synthetic embeddings; nothing to score")


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


def evaluator_types() -> tuple[str, ...]:
    """The evaluator types there are: the modules of clipgen.eval.evaluators."""
    from clipgen.eval import evaluators

    return tuple(sorted(module.name for module in pkgutil.iter_modules(evaluators.__path__)))


def evaluator_class(where: str, type_name: Any) -> type[Evaluator]:
    """The `Evaluator` of module clipgen.eval.evaluators.<type_name>, or of an importable
    module called `type_name` (an evaluator of one's own)."""
    if type_name in evaluator_types():
        return importlib.import_module(f"clipgen.eval.evaluators.{type_name}").Evaluator
    if isinstance(type_name, str) and type_name:
        try:
            return importlib.import_module(type_name).Evaluator
        except ModuleNotFoundError as error:
            if error.name not in (type_name, type_name.split(".")[0]):
                raise
    raise ValueError(
        f"{where}.type={type_name!r} is not an evaluator type; there are: "
        f"{', '.join(evaluator_types())} (or name a module with an Evaluator class)"
    )


def build(
    name: str,
    eval_config: Mapping[str, Any],
    *,
    mesh: Mesh | None = None,
    output_dir: str | Path | None = None,
    stage_config: ml_collections.ConfigDict | None = None,
) -> Evaluator:
    """The evaluator `eval_config.type` configured by `eval_config`; raises `Skipped` for an
    optional one that cannot run here, ValueError for a bad config (naming the key).
    Features are computed on `mesh` (default: all devices on 'data'); files go under
    `output_dir` if given; a stage evaluator is built for `stage_config`."""
    type_name = eval_config.get("type") if eval_config is not None else None
    cls = evaluator_class(f"evals.{name}", type_name)
    return cls(name, eval_config, mesh=mesh, output_dir=output_dir, stage_config=stage_config)


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


def training_evaluators(
    config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> dict[str, Callable[[Any], dict[str, float]]]:
    """The evaluators of a stage config's `evals` as the training loop calls them:
    evaluate(train state) -> scalars, each scoring the state's first EMA (or, with
    `use_ema` False, its parameters). A generator evaluator here raises ValueError: no
    stage trains a text-to-image generator."""
    evaluators, _ = build_all(config.get("evals", {}), mesh=mesh, stage_config=config)
    for name, evaluator in evaluators.items():
        if evaluator.INPUT != "params":
            raise ValueError(
                f"evals.{name} ({config.evals[name].type}) scores a text-to-image generator, "
                f"which the {config.stage} stage is not; run it with `clipgen eval`"
            )

    def on_state(evaluator: Evaluator) -> Callable[[Any], dict[str, float]]:
        def evaluate(state: Any) -> dict[str, float]:
            use_ema = evaluator.settings.get("use_ema", True)
            return evaluator(next(iter(state.ema.values())) if use_ema else state.params)

        return evaluate

    return {name: on_state(evaluator) for name, evaluator in evaluators.items()}
