"""The demo's pOps segment: fine-tune the union and recolour operators from the demo's
prior on shapes-world operator data embedded with its CLIP, score them with the
`operator_retrieval` evaluator (rendering through the trained cascade), and draw
operators.png: held-out inputs, the operator's output, pOps' mean baseline and the truth,
and one chain (recolour an object, then unite it with another)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import ml_collections
import numpy as np

from clipgen import images, stages, train
from clipgen.data import operator_data, shapes
from clipgen.eval import registry
from clipgen.pipelines import embed, unclip
from clipgen.pipelines import operators as operator_pipeline

OPERATORS = ("union", "recolour")
SHOWN = 3  # held-out examples per operator in operators.png


def operator_config(
    workdir: Path, preset: str, name: str, prior: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The `preset` operator config for `name`, fine-tuning the demo's prior (whose
    `prior` config gives the model) on data embedded with the demo's CLIP, scored through
    the demo's cascade."""
    config = stages.get("operator").config(f"{preset},{name}")
    config.model = prior.model.to_dict()
    config.init.prior = str(workdir / "prior")
    config.data.update(
        embeddings=str(workdir / "operator_embeddings" / name),
        clip_workdir=str(workdir / "clip"),
        clip_preset=preset,
        normalize=bool(prior.data.normalize),
    )
    config.evals.retrieval.cascade = str(workdir)
    config.eval_every = 0
    return config


def run(workdir: Path, preset: str, prior: ml_collections.ConfigDict) -> dict:
    """Train and score the demo's operators in workdir/operators/<name>; returns their
    report entries and writes operators.png."""
    report = train_and_score(workdir, preset, prior, OPERATORS)
    report["grid"] = str(_draw(workdir, preset))
    return report


def train_and_score(
    workdir: Path,
    preset: str,
    prior: ml_collections.ConfigDict,
    names: tuple[str, ...],
    oracle_examples: int | None = None,
) -> dict:
    """Fine-tune the operators `names` from the cascade's prior in workdir/operators/<name>
    and score each with its evaluators (rendering `oracle_examples` of each split, None:
    the preset's count); returns {name: steps, minutes, scores}."""
    from clipgen.train import loop

    report = {}
    for name in names:
        started = time.perf_counter()
        config = operator_config(workdir, preset, name, prior)
        if oracle_examples is not None:
            config.evals.retrieval.oracle_examples = oracle_examples
        embed.ensure_embeddings(config)
        stage = train.trainer("operator").make_stage(config)
        trained_at = time.perf_counter()
        state = loop.train(config, workdir / "operators" / name, stage)
        training = time.perf_counter() - trained_at
        scores = {}
        for evaluate in registry.training_evaluators(config).values():
            scores.update(evaluate(state))
        report[name] = {
            "steps": int(state.step),
            "training_minutes": round(training / 60, 2),
            "minutes": round((time.perf_counter() - started) / 60, 2),
            "scores": {key: float(value) for key, value in scores.items()},
        }
    return report


def _draw(workdir: Path, preset: str) -> Path:
    """operators.png: per operator SHOWN held-out rows of inputs, output, baseline, truth;
    then the chain union(recolour(a, swatch), b)."""
    pipe = unclip.load_pipeline({"workdir": str(workdir), "preset": preset})
    size = pipe.resolution
    ops = {
        name: operator_pipeline.load_operator(workdir / "operators" / name) for name in OPERATORS
    }
    pictures, labels = [], []

    def embeds_of(items) -> np.ndarray:
        return np.asarray(pipe.encode_images([operator_data.render_input(x, size) for x in items]))

    def render(embeds) -> np.ndarray:
        return operator_pipeline.render(pipe, embeds, seed=0)

    for name, operator in ops.items():
        examples = [operator_data.example(name, "heldout", i) for i in range(SHOWN)]
        inputs = [embeds_of([e.inputs[k] for e in examples]) for k in range(operator.spec.inputs)]
        output, baseline = render(operator(inputs, seed=0)), render(operator.mean_baseline(inputs))
        for row, example in enumerate(examples):
            pictures += [operator_data.render_input(x, size) for x in example.inputs]
            pictures += [output[row], baseline[row], shapes.render(example.target, size)]
            labels += [f"{name} input {k + 1}" for k in range(len(example.inputs))]
            labels += [name, "mean baseline", "truth"]
    union = operator_data.example("union", "test", 0)
    first, second = union.inputs
    colour = next(c for c in shapes.COLOURS if c != first.objects[0].colour)
    swatch = operator_data.Swatch(colour)
    tree = ("union", ("recolour", embeds_of([first]), embeds_of([swatch])), embeds_of([second]))
    chained = render(operator_pipeline.run_tree(ops, tree, seed=0))
    recoloured = dataclasses.replace(first.objects[0], colour=colour)
    truth = dataclasses.replace(union.target, objects=(recoloured, second.objects[0]))
    pictures += [*(operator_data.render_input(x, size) for x in (first, swatch, second))]
    pictures += [chained[0], shapes.render(truth, size)]
    labels += ["a", "swatch", "b", "union(recolour(a, swatch), b)", "truth"]
    grid = images.grid(pictures, labels, columns=5, cell=128)
    return images.save_png(workdir / "operators.png", grid)
