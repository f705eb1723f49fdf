"""pOps operator data from the shapes world, with exact ground truth: what each input image
shows, the scene the operator should produce, and for `instruct` the word.

- union: each object of a two-object scene alone (same place, same background) -> the scene;
- recolour (pOps' texturing): a one-object scene + a plain swatch of colour c -> the same
  scene with the object in colour c;
- scene: a one-object scene on white + a plain image of a background -> the object on it;
- instruct: a one-object scene + a word ("larger", "smaller", a position, a colour) -> the
  edited scene.

The split decides the held-out (colour, shape) pairs as the shapes world's splits do: in
"train" and "test" no input or target has one; in "heldout" the target has at least one.
Example i of an operator and split is drawn from its own seeded generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from clipgen.data import shapes

OPERATORS = ("union", "recolour", "scene", "instruct")
SIZE_WORDS = {"larger": ("small", "large"), "smaller": ("large", "small")}
INSTRUCT_WORDS = (*SIZE_WORDS, *shapes.POSITIONS, *shapes.COLOURS)


@dataclasses.dataclass(frozen=True)
class Swatch:
    """A plain image of one colour: an object colour or a background's."""

    colour: str


@dataclasses.dataclass(frozen=True)
class OperatorExample:
    """What an operator's input images show, what it should produce, and its word."""

    inputs: tuple[shapes.Scene | Swatch, ...]
    target: shapes.Scene
    word: str | None = None


def render_input(item: shapes.Scene | Swatch, size: int) -> np.ndarray:
    """An input image (uint8, size x size)."""
    if isinstance(item, Swatch):
        rgb = shapes.COLOURS.get(item.colour) or shapes.BACKGROUNDS[item.colour]
        return np.full((size, size, 3), rgb, np.uint8)
    return shapes.render(item, size)


def _scene(rng: np.random.Generator, split: str, objects: int) -> shapes.Scene:
    """A scene of `objects` objects drawn as the split's scenes are."""
    while True:
        scene = shapes.sample_scene(rng, split)
        if len(scene.objects) == objects:
            return scene


def _alone(scene: shapes.Scene, index: int) -> shapes.Scene:
    """Object `index` of a scene alone, in its place, on the scene's background."""
    n = shapes.JITTER_PER_OBJECT
    jitter = scene.jitter[n * index : n * (index + 1)]
    return shapes.Scene((scene.objects[index],), scene.background, jitter)


def _with(scene: shapes.Scene, **changes: str) -> shapes.Scene:
    """A one-object scene with its object's fields changed."""
    obj = dataclasses.replace(scene.objects[0], **changes)
    return shapes.Scene((obj,), scene.background, scene.jitter)


def _union(rng, split):
    target = _scene(rng, split, 2)
    return OperatorExample((_alone(target, 0), _alone(target, 1)), target)


def _recolour(rng, split):
    base = _scene(rng, "test" if split == "heldout" else split, 1)
    shape = base.objects[0].shape
    heldout = split == "heldout"
    colours = [
        c
        for c in shapes.COLOURS
        if c != base.objects[0].colour and ((c, shape) in shapes.HELDOUT_PAIRS) == heldout
    ]
    if not colours:
        return None
    colour = str(rng.choice(colours))
    return OperatorExample((base, Swatch(colour)), _with(base, colour=colour))


def _scene_op(rng, split):
    target = _scene(rng, split, 1)
    on_white = shapes.Scene(target.objects, "white", target.jitter)
    return OperatorExample((on_white, Swatch(target.background)), target)


def _instruct(rng, split):
    base = _scene(rng, split, 1)
    obj = base.objects[0]
    word = str(rng.choice(INSTRUCT_WORDS))
    if word in SIZE_WORDS:
        before, after = SIZE_WORDS[word]
        if obj.size != before:
            return None
        target = _with(base, size=after)
    elif word in shapes.POSITIONS:
        if obj.position == word:
            return None
        target = _with(base, position=word)
    else:
        if obj.colour == word:
            return None
        target = _with(base, colour=word)
    if split != "heldout" and shapes.has_heldout_pair(target):
        return None
    if split == "heldout" and not shapes.has_heldout_pair(target):
        return None
    return OperatorExample((base,), target, word)


_MAKERS = {"union": _union, "recolour": _recolour, "scene": _scene_op, "instruct": _instruct}


def example(operator: str, split: str, index: int, seed: int = 0) -> OperatorExample:
    """Example `index` of `operator` on `split`, deterministic from the seed."""
    if operator not in _MAKERS:
        raise ValueError(f"unknown operator {operator!r}; the shapes world has {OPERATORS}")
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {shapes.SPLITS}")
    key = [seed, OPERATORS.index(operator), shapes.SPLITS.index(split), int(index)]
    rng = np.random.default_rng(key)
    while True:
        made = _MAKERS[operator](rng, split)
        if made is not None:
            return made
