"""Hard-negative siblings for CLIP: each odd example is the even one before it with exactly
one asked-for attribute of one object changed, and every scene stays in its split."""

import dataclasses

import numpy as np
import pytest

from clipgen import stages
from clipgen.data import pipeline, shapes, siblings
from clipgen.train import clip as clip_stage


def _differences(first: shapes.Scene, second: shapes.Scene) -> list[tuple[int, str]]:
    return [
        (index, field.name)
        for index, (a, b) in enumerate(zip(first.objects, second.objects, strict=True))
        for field in dataclasses.fields(a)
        if getattr(a, field.name) != getattr(b, field.name)
    ]


@pytest.mark.parametrize("attributes", [("shape",), ("colour", "size")])
def test_each_odd_example_differs_from_its_pair_in_one_asked_attribute(attributes):
    source = siblings.ShapesSiblings(pipeline.ProceduralShapes((16,), "train"), attributes)
    plain = pipeline.ProceduralShapes((16,), "train")
    changed = set()
    for pair in range(40):
        first, second = source[2 * pair], source[2 * pair + 1]
        assert first["caption"] == plain[2 * pair]["caption"]  # even examples are the source's
        a, b = shapes.scene_from_json(first["scene"]), shapes.scene_from_json(second["scene"])
        assert (a.background, a.jitter) == (b.background, b.jitter)
        ((_, attribute),) = _differences(a, b)
        assert attribute in attributes
        changed.add(attribute)
        assert second["caption"] == shapes.caption(b) != first["caption"]
        assert np.array_equal(second["image_16"], shapes.render(b, 16))
        assert second["id"] == 2 * pair + 1
    assert changed == set(attributes)  # each asked-for attribute is drawn


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_siblings_stay_in_their_split(split):
    source = siblings.ShapesSiblings(
        pipeline.ProceduralShapes((), split), ("colour", "shape", "size")
    )
    for index in range(1, 400, 2):
        scene = shapes.scene_from_json(source[index]["scene"])
        heldout = any((o.colour, o.shape) in shapes.HELDOUT_PAIRS for o in scene.objects)
        assert heldout == (split == "heldout"), (index, scene)


def test_unknown_attribute_and_a_source_without_scenes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hard_negatives=.*'position'"):
        siblings.ShapesSiblings(pipeline.ProceduralShapes(()), ("position",))
    config = stages.get("clip").config("tiny")
    config.data.source = f"folder:{tmp_path}"
    config.data.hard_negatives = ("shape",)
    with pytest.raises(ValueError, match="hard_negatives.*procedural"):
        clip_stage.make_stage(config)
