"""Tests of the shapes world: sampling, rendering, captions, the oracle and the tfds builder."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from clipgen.data import shapes
from clipgen.data.shapes import Obj, Scene


def _scenes(seed: int, count: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, shapes.SPLITS[i % 3]) for i in range(count)]


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_oracle_reads_rendered_scenes(resolution: int) -> None:
    scenes = _scenes(seed=resolution, count=2000)
    wrong = [
        scene
        for scene in scenes
        if shapes.oracle(shapes.render(scene, resolution)) != shapes.canonical(scene)
    ]
    accuracy = 1.0 - len(wrong) / len(scenes)
    assert accuracy >= 0.99, [shapes.caption(scene) for scene in wrong[:5]]


def test_oracle_reads_pil_drawings() -> None:
    circle = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(circle).ellipse([16, 16, 47, 47], fill="red")
    assert shapes.oracle(np.asarray(circle)) == Scene(
        (Obj("red", "circle", "large", "centre"),), "white"
    )
    square = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(square).rectangle([36, 24, 51, 39], fill="blue")
    assert shapes.oracle(np.asarray(square)) == Scene(
        (Obj("blue", "square", "small", "right"),), "white"
    )


def test_oracle_on_empty_and_noisy_images() -> None:
    assert shapes.oracle(np.zeros((48, 40, 3), np.uint8)) == Scene((), "black")
    rng = np.random.default_rng(0)
    scene = shapes.sample_scene(rng)
    noisy = shapes.render(scene, 64) + rng.normal(0.0, 5.0, (64, 64, 3))
    assert shapes.oracle(np.clip(noisy, 0, 255).astype(np.uint8)) == shapes.canonical(scene)


def test_caption_parse_round_trip() -> None:
    for scene in _scenes(seed=1, count=3000):
        assert shapes.parse(shapes.caption(scene)) == scene


def test_caption_grammar() -> None:
    one = Scene((Obj("orange", "diamond", "small", "centre"),), "gray")
    assert shapes.caption(one) == "a small orange diamond in the centre on a gray background"
    two = Scene(
        (Obj("red", "circle", "small", "bottom"), Obj("blue", "square", "large", "top")), "black"
    )
    assert (
        shapes.caption(two) == "a small red circle below a large blue square on a black background"
    )
    assert shapes.parse("  A Small  ORANGE diamond in the center on a grey background. ") == one


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "article"),
        ("a huge red circle on the left on a white background", "size"),
        ("a small pink circle on the left on a white background", "colour"),
        ("a small red star on the left on a white background", "shape"),
        ("a small red circle somewhere on a white background", "position or relation"),
        ("a small red circle above on a white background", "article"),
        ("a small red circle on the left", '"on"'),
        ("a small red circle on the left on a beige background", "background colour"),
        ("a small red circle on the left on a white background today", "end of the caption"),
    ],
)
def test_parse_rejects_bad_text(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        shapes.parse(text)


def test_splits_hold_out_pairs() -> None:
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for _ in range(2000):
            scene = shapes.sample_scene(rng, split)
            assert not any((o.colour, o.shape) in shapes.HELDOUT_PAIRS for o in scene.objects)
    counts = []
    for _ in range(2000):
        scene = shapes.sample_scene(rng, "heldout")
        assert any((o.colour, o.shape) in shapes.HELDOUT_PAIRS for o in scene.objects)
        counts.append(len(scene.objects))
    assert 0.4 < np.mean(np.asarray(counts) == 1) < 0.6
    with pytest.raises(ValueError, match="validation.*train"):
        shapes.sample_scene(rng, "validation")


def test_heldout_pairs_cover_colours_and_shapes() -> None:
    colours = {colour for colour, _ in shapes.HELDOUT_PAIRS}
    assert len(shapes.HELDOUT_PAIRS) == 4 and len(colours) == 4
    assert {shape for _, shape in shapes.HELDOUT_PAIRS} == set(shapes.SHAPES)


def test_sampling_and_rendering_are_deterministic() -> None:
    first = _scenes(seed=3, count=20)
    second = _scenes(seed=3, count=20)
    assert [s.jitter for s in first] == [s.jitter for s in second]
    for scene in first:
        assert np.array_equal(shapes.render(scene, 64), shapes.render(scene, 64))
        assert shapes.scene_from_json(shapes.scene_to_json(scene)).jitter == scene.jitter


def test_render_is_anti_aliased_and_resolution_independent() -> None:
    scene = Scene((Obj("blue", "circle", "large", "centre"),), "white")
    image = shapes.render(scene, 64)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    red = image[..., 0]
    assert np.any((red > 30) & (red < 255)), "edge pixels should blend colour and background"
    for scene in _scenes(seed=4, count=50):
        fine = shapes.render(scene, 256).astype(float).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
        difference = np.abs(fine - shapes.render(scene, 64))
        assert difference.mean() < 1.0
        assert np.mean(difference > 32) < 0.01


def test_two_objects_stay_apart_at_32_pixels() -> None:
    # Worst case: both objects large, at the largest size factor, jittered towards each other.
    shift = shapes.MAX_CENTRE_JITTER
    towards_middle = {"left": (shift, 0.0), "right": (-shift, 0.0)}
    towards_middle |= {"top": (0.0, shift), "bottom": (0.0, -shift)}
    factor = shapes.SIZE_JITTER[1]
    for positions in shapes.RELATIONS.values():
        for shape_pair in itertools.product(shapes.SHAPES, repeat=2):
            masks = []
            for position, shape in zip(positions, shape_pair, strict=True):
                obj = Obj("red", shape, "large", position)
                scene = Scene((obj,), "white", (*towards_middle[position], factor))
                masks.append(np.any(shapes.render(scene, 32) != 255, axis=-1))
            grown = ndimage.binary_dilation(masks[0], np.ones((3, 3), bool))
            assert not np.any(grown & masks[1]), (positions, shape_pair)


def test_canonical_order_and_accuracy() -> None:
    left = Obj("red", "circle", "small", "left")
    right = Obj("cyan", "triangle", "large", "right")
    mentioned = Scene((right, left), "white", (0.01, 0.0, 1.0, -0.01, 0.0, 0.99))
    ordered = shapes.canonical(mentioned)
    assert ordered.objects == (left, right)
    assert ordered.jitter == (-0.01, 0.0, 0.99, 0.01, 0.0, 1.0)

    assert all(shapes.attribute_accuracy(ordered, mentioned).values())
    recoloured = Scene((Obj("purple", "circle", "small", "left"), right), "white")
    scores = shapes.attribute_accuracy(recoloured, mentioned)
    assert not scores["colour"] and not scores["whole"]
    assert scores["shape"] and scores["size"] and scores["position"] and scores["count"]
    scores = shapes.attribute_accuracy(Scene((left,), "black"), mentioned)
    assert not scores["count"] and not scores["background"] and not scores["colour"]


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets builder


def _tiny_config(seed: int):
    from clipgen.data import shapes_tfds

    return shapes_tfds.ShapesConfig(
        name=f"test_seed{seed}",
        resolutions=(32, 64),
        num_examples={"train": 8, "test": 4, "heldout": 4},
        seed=seed,
    )


def _record_bytes(builder) -> dict[str, bytes]:
    files = sorted(Path(builder.data_dir).glob("*.array_record*"))
    assert files
    return {file.name: file.read_bytes() for file in files}


def test_tfds_builder_round_trip(tmp_path: Path) -> None:
    from clipgen.data import shapes_tfds

    config = _tiny_config(seed=7)
    builder = shapes_tfds.build(str(tmp_path / "a"), config)
    for split, count in config.num_examples.items():
        source = builder.as_data_source(split)
        assert len(source) == count
        ids = set()
        for index in range(count):
            example = source[index]
            scene = shapes.scene_from_json(example["scene"])
            ids.add(int(example["id"]))
            rng = np.random.default_rng([7, shapes.SPLITS.index(split), int(example["id"])])
            expected = shapes.sample_scene(rng, split)
            assert scene == expected and scene.jitter == expected.jitter
            assert example["caption"].decode() == shapes.caption(scene)
            for resolution in config.resolutions:
                image = example[f"image_{resolution}"]
                assert np.array_equal(image, shapes.render(scene, resolution))
        assert ids == set(range(count))

    again = shapes_tfds.build(str(tmp_path / "b"), _tiny_config(seed=7))
    assert _record_bytes(again) == _record_bytes(builder)
    other = shapes_tfds.build(str(tmp_path / "c"), _tiny_config(seed=8))
    assert _record_bytes(other) != _record_bytes(builder)
