"""Hard negatives for contrastive training on the shapes world: every odd example is the
even example before it with one attribute of one object changed, so that each batch of
consecutive examples holds pairs that only that attribute tells apart.

A CLIP trained on random batches learns the attributes that most often separate a batch's
captions (colour, position, size) and hardly the one that rarely does (shape). Measured
with `benchmarks/clip_probe.py` on the demo's fixed-plan CLIP (840 steps): a linear probe
of the image embedding reads shape in 47.6% of single-object test scenes (chance 25%;
colour 99.2%); with shape siblings in 64.2% (held-out 9.2% -> 28.6%; the text
embedding's 68.4% -> 90.4%), at the cost of size (97.6% -> 87.2%) and of retrieval
(95.4% -> 93.2% of test captions, 93.8% -> 84.6% held-out)."""

from __future__ import annotations

import dataclasses

import numpy as np

from clipgen.data import pipeline, shapes

ATTRIBUTES = ("colour", "shape", "size")
_CHOICES = {"colour": tuple(shapes.COLOURS), "shape": tuple(shapes.SHAPES), "size": shapes.SIZES}


def sibling(scene: shapes.Scene, attribute: str, rng: np.random.Generator) -> shapes.Scene:
    """`scene` with `attribute` of one of its objects changed to another value, keeping the
    scene in its split (a held-out colour-shape pair neither made nor removed)."""
    heldout = shapes.has_heldout_pair(scene)
    for index in rng.permutation(len(scene.objects)):
        old = scene.objects[index]
        values = [v for v in _CHOICES[attribute] if v != getattr(old, attribute)]
        for value in rng.permutation(values):
            objects = list(scene.objects)
            objects[index] = dataclasses.replace(old, **{attribute: str(value)})
            changed = dataclasses.replace(scene, objects=tuple(objects))
            if shapes.has_heldout_pair(changed) == heldout:
                return changed
    # Unchanged when no value keeps the split: in the held-out split, a lone held-out
    # object's shape or colour. Train scenes always have one (the trained split).
    return scene


class ShapesSiblings:
    """The procedural shapes source with hard negatives: example 2k is the source's
    example 2k, example 2k + 1 that scene with one of `attributes` of one object changed
    (the attribute drawn uniformly). Batches of consecutive examples hold whole pairs when
    each host's rows start at an even index."""

    def __init__(self, source: pipeline.ProceduralShapes, attributes: tuple[str, ...]):
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if not attributes or unknown:
            raise ValueError(
                f"config.data.hard_negatives={tuple(attributes)!r}: name one or more of "
                f"{ATTRIBUTES} (the attributes a sibling may differ in), or leave it empty"
            )
        self.source, self.attributes = source, tuple(attributes)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> pipeline.Example:
        first = self.source[index - index % 2]
        if index % 2 == 0:
            return first
        source = self.source
        rng = np.random.default_rng([source.seed, shapes.SPLITS.index(source.split), index, 1])
        attribute = self.attributes[int(rng.integers(len(self.attributes)))]
        scene = sibling(shapes.scene_from_json(first["scene"]), attribute, rng)
        return pipeline.example_of(scene, source.resolutions, index)
