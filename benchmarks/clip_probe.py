"""What a trained CLIP's embeddings say about each attribute of the shapes world: a linear
probe (least squares on one-hot targets) fitted on the embeddings of single-object train
scenes, read on single-object test and held-out scenes. A decoder conditioned on these
embeddings can only draw reliably what they carry.

  python benchmarks/clip_probe.py --workdir=workdir/demo/clip [--preset=demo] [--train=4000]

Prints one JSON line: per tower (image, text) and split the probe's accuracy for colour,
shape, size and position (chance: 1/7, 1/4, 1/2, 1/5).
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import numpy as np

from clipgen import build, stages
from clipgen.data import pipeline, preprocess, shapes
from clipgen.models.clip import CLIP

ATTRIBUTES = ("colour", "shape", "size", "position")


def single_object_scenes(split: str, count: int) -> list[shapes.Scene]:
    """The first `count` one-object scenes of a split."""
    source, found, index = pipeline.ProceduralShapes((), split), [], 0
    while len(found) < count:
        scene = shapes.scene_from_json(source[index]["scene"])
        if len(scene.objects) == 1:
            found.append(scene)
        index += 1
    return found


def embed(clip: build.ClipModel, config, scenes: list[shapes.Scene]) -> dict[str, np.ndarray]:
    """Unit image and text embeddings (N, D) of scenes, in batches of 250."""
    module, params = clip.module, clip.params
    size, resolution = config.data.resolution, config.model.vision.image_size
    images = jax.jit(lambda p: module.apply({"params": params}, p, method=CLIP.encode_image))
    texts = jax.jit(lambda i, m: module.apply({"params": params}, i, m, method=CLIP.encode_text))
    out = {"image": [], "text": []}
    for start in range(0, len(scenes), 250):
        chunk = scenes[start : start + 250]
        pixels = preprocess.clip_preprocess([shapes.render(s, size) for s in chunk], resolution)
        ids, mask = clip.tokenizer.encode([shapes.caption(s) for s in chunk])
        out["image"].append(np.asarray(images(pixels)))
        out["text"].append(np.asarray(texts(ids, mask)))
    return {tower: np.concatenate(parts) for tower, parts in out.items()}


def probe_accuracy(train_x, train_labels, test_x, test_labels) -> float:
    """Accuracy on test of a least-squares linear map from features to one-hot labels."""
    classes = sorted(set(train_labels))
    targets = np.stack([np.asarray(train_labels) == c for c in classes], 1).astype(np.float64)
    design = np.c_[train_x, np.ones(len(train_x))]
    weights = np.linalg.lstsq(design, targets, rcond=None)[0]
    predicted = np.asarray(classes)[np.argmax(np.c_[test_x, np.ones(len(test_x))] @ weights, 1)]
    return float(np.mean(predicted == np.asarray(test_labels)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdir/demo/clip")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--train", type=int, default=4000, help="single-object train scenes")
    parser.add_argument("--test", type=int, default=500, help="single-object scenes a split")
    args = parser.parse_args()
    trained = build.restore(
        args.workdir, functools.partial(stages.get("clip").config, args.preset), "clip"
    )
    clip = build.clip_model(trained.config, trained.params)
    result = {"workdir": args.workdir, "step": int(trained.step)}
    fitted = single_object_scenes("train", args.train)
    train = embed(clip, trained.config, fitted)
    for split in ("test", "heldout"):
        read = single_object_scenes(split, args.test)
        features = embed(clip, trained.config, read)
        for tower in ("image", "text"):
            for attribute in ATTRIBUTES:
                result[f"{tower}/{split}/{attribute}"] = probe_accuracy(
                    train[tower],
                    [getattr(s.objects[0], attribute) for s in fitted],
                    features[tower],
                    [getattr(s.objects[0], attribute) for s in read],
                )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
