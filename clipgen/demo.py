"""`clipgen demo`: the main job on one CPU, over the shapes world.

It builds the shapes dataset through its tfds builder, reads it back, draws sample grids
at every cascade resolution and scores the oracle on the test and held-out splits; then it
trains each stage that exists with its `demo` preset, one after the other, resuming stages
already done (today: CLIP, scored by zero-shot retrieval on held-out scenes). The other
stages join as they land, then sampling of the held-out captions.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import numpy as np

import clipgen
from clipgen import images
from clipgen.data import shapes, shapes_tfds
from clipgen.data.files import atomic_write
from clipgen.train import config as config_lib

DEMO_DATA = shapes_tfds.ShapesConfig(
    name="demo",
    description="The demo cascade's resolutions.",
    resolutions=(16, 32, 64, 256),
    num_examples={"train": 2000, "test": 200, "heldout": 200},
)


def train_clip(workdir: Path, preset: str) -> dict:
    """Train (or resume) CLIP in workdir/clip and score it."""
    from clipgen.train import clip as clip_stage
    from clipgen.train import loop

    config = config_lib.load_preset("clip", preset)
    stage = clip_stage.make_stage(config)
    state = loop.train(config, workdir / "clip", stage)
    return {"steps": int(state.step), "retrieval": stage.evaluate(state)}


def run(
    workdir: str | Path, data: shapes_tfds.ShapesConfig = DEMO_DATA, preset: str = "demo"
) -> dict:
    """Run the demo in `workdir` with each stage's `preset`; returns the report also
    written to report.json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    builder = shapes_tfds.build(str(workdir / "data"), data)
    minutes = {"data": (time.perf_counter() - started) / 60}
    report: dict = {"minutes": minutes, "data": {}, "oracle": {}}
    for split in ("test", "heldout"):
        source = builder.as_data_source(split)
        examples = [source[i] for i in range(len(source))]
        report["data"][split] = len(examples)
        scenes = [shapes.scene_from_json(example["scene"]) for example in examples]
        for resolution in data.resolutions:
            key = shapes_tfds.image_feature_name(resolution)
            pictures = [example[key] for example in examples]
            if split == "test":
                captions = [shapes.caption(scene) for scene in scenes[:16]]
                images.save_png(
                    workdir / f"shapes_{resolution}.png",
                    images.grid(pictures[:16], captions, columns=4, cell=128),
                )
            if resolution >= 32:
                report["oracle"][f"{split}_{resolution}px"] = _oracle_accuracy(pictures, scenes)
    stage_started = time.perf_counter()
    report["clip"] = train_clip(workdir, preset)
    minutes["clip"] = (time.perf_counter() - stage_started) / 60
    minutes["total"] = (time.perf_counter() - started) / 60
    report["versions"] = _versions()
    atomic_write(
        workdir / "report.json", lambda file: file.write(json.dumps(report, indent=2).encode())
    )
    logging.info("demo report: %s", json.dumps({k: report[k] for k in ("oracle", "clip")}))
    return report


def _oracle_accuracy(pictures: list[np.ndarray], scenes: list[shapes.Scene]) -> dict:
    """Per-attribute and whole-scene agreement of the oracle with the true scenes."""
    results = [
        shapes.attribute_accuracy(shapes.oracle(picture), scene)
        for picture, scene in zip(pictures, scenes, strict=True)
    ]
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def _versions() -> dict[str, str]:
    from importlib import metadata

    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets")
    versions = {"clipgen": clipgen.__version__, "python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
