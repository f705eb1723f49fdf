"""The demo's DiffusionCLIP segment: fine-tune two edits of the demo's decoder, "red" ->
"blue" and "circle" -> "square" (the decoder conditioned on each input's own CLIP image
embedding, the loss read by the demo's CLIP), score each with the `edit_oracle` evaluator
on held-out scenes, sweep the first edit's strength gamma (the CLIP direction score at each),
combine the two edits by noise combination on held-out red circles, and draw edit.png:
inputs, both edits, the gamma sweep and the combination."""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections
import numpy as np

from clipgen import edit, images, stages, train
from clipgen.eval import registry
from clipgen.eval.evaluators import edit_oracle
from clipgen.pipelines import edit as edit_pipeline

EDITS = (("red", "blue"), ("circle", "square"))
GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHOWN = 6  # held-out inputs in edit.png
COMBINED = 32  # held-out red circles the combination is scored on
# The colour edit alone while the image's layout forms, then both, weighted to the harder
# shape edit (DiffusionCLIP's {threshold: ratios} form; t0 is 500).
SCHEDULE = {300: (1.0, 0.0), 0: (0.3, 0.7)}


def edit_config(
    workdir: Path, preset: str, source: str, target: str, decoder: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The `preset` edit config for source -> target on the demo's decoder and CLIP."""
    config = stages.get("edit").config(f"{preset},{source},{target}")
    config.base.update(source=str(workdir / "decoder"), preset=preset, condition="image")
    config.clip.update(source="clipgen", workdir=str(workdir / "clip"), preset=preset)
    config.data.resolution = int(decoder.data.resolution)
    config.edit.cache = str(workdir / "edit" / "latents")
    config.evals.oracle.cache = config.edit.cache
    config.eval_every = 0
    return config


def run(workdir: Path, preset: str, decoder: ml_collections.ConfigDict) -> dict:
    """Train and score the demo's edits in workdir/edit/<source>2<target>; returns their
    report entry and writes edit.png."""
    from clipgen.train import loop

    report, found = {}, []
    for source, target in EDITS:
        started = time.perf_counter()
        config = edit_config(workdir, preset, source, target, decoder)
        stage = train.trainer("edit").make_stage(config)
        trained_at = time.perf_counter()
        state = loop.train(config, workdir / "edit" / f"{source}2{target}", stage)
        training = time.perf_counter() - trained_at
        scores = {}
        for evaluate in registry.training_evaluators(config).values():
            scores.update(evaluate(state))
        report[f"{source}->{target}"] = {
            "steps": int(state.step),
            "training_minutes": round(training / 60, 2),
            "minutes": round((time.perf_counter() - started) / 60, 2),
            "scores": {key: float(value) for key, value in scores.items()},
        }
        found.append(edit_pipeline.Edit(config, next(iter(state.ema.values()))))
    started = time.perf_counter()
    editor = edit_pipeline.Editor(found[0].config, cache=found[0].config.edit.cache)
    size = editor.backbone.resolution
    shown = edit.shapes_with(EDITS[0][0], "heldout", SHOWN, size)[0]
    sweep = [editor.apply(shown, found[:1], gamma=gamma) for gamma in GAMMAS]
    scores = [float(np.mean(editor.direction_scores(shown, out, found[0]))) for out in sweep]
    report["gamma_sweep"] = {
        "gammas": list(GAMMAS),
        "directional_cosine": [round(s, 4) for s in scores],
        "monotonic": bool(all(b >= a for a, b in zip(scores, scores[1:], strict=False))),
    }
    schedule = edit.parse_schedule(SCHEDULE, 2)
    both, scenes = _red_circles(COMBINED, size)
    combined = editor.apply(both, found, schedule)
    changes = dict(EDITS)
    resolution = found[0].config.evals.oracle.get("oracle_resolution", 64)
    report["combination"] = {
        "schedule": {str(k): list(v) for k, v in SCHEDULE.items()},
        "images": len(both),
        **edit_oracle.judge_all(combined, scenes, changes, resolution),
    }
    shape_edit = editor.apply(shown, found[1:])
    report["grid"] = str(_draw(workdir, shown, sweep, shape_edit, both[:SHOWN], combined[:SHOWN]))
    report["minutes_after_training"] = round((time.perf_counter() - started) / 60, 2)
    return report


def _red_circles(count: int, size: int):
    """Held-out scenes whose caption holds both "red" and "circle" (a red circle, or a red
    object beside a circle)."""
    from clipgen.data import pipeline, shapes

    source = pipeline.ProceduralShapes((size,), "heldout", 0)
    pictures, scenes = [], []
    for index in range(100_000):
        example = source[index]
        scene = shapes.scene_from_json(example["scene"])
        if any(o.colour == "red" and o.shape == "circle" for o in scene.objects):
            pictures.append(example[f"image_{size}"])
            scenes.append(scene)
            if len(pictures) == count:
                break
    return np.stack(pictures), scenes


def _draw(workdir: Path, shown, sweep, shape_edit, both, combined) -> Path:
    """edit.png: a column per held-out input; rows: input, the gamma sweep of red -> blue
    (gamma 1 is the edit itself), circle -> square; then red circles and both edits."""
    pictures, labels = [], []
    rows = [("input", shown)]
    rows += [(f"red->blue gamma {g:g}", out) for g, out in zip(GAMMAS[1:], sweep[1:], strict=True)]
    rows += [("circle->square", shape_edit), ("input", both), ("both edits", combined)]
    for label, row in rows:
        pictures += list(row)
        labels += [label] * len(row)
    grid = images.grid(pictures, labels, columns=len(shown), cell=96)
    return images.save_png(workdir / "edit.png", grid)
