"""The shapes world: procedural captioned scenes, their renderer, caption grammar and oracle.

A scene is one or two coloured shapes on a plain background. It can be sampled, drawn
anti-aliased at any resolution, written as a caption, parsed back from the caption, and read
back from an image by the oracle, which turns "does the picture match the caption?" into
per-attribute accuracies.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 60, 220),
    "purple": (150, 50, 200),
}
"""Object colours by name."""

BACKGROUNDS: dict[str, RGB] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
"""Plain background colours by name."""

SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

RELATIONS: dict[str, tuple[str, str]] = {
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
"""Relation phrase of a two-object caption -> (first object's position, second's)."""

SLOT_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
"""Position name -> (x, y) of the slot centre in unit image coordinates (y points down)."""

HALF_EXTENTS: dict[str, float] = {"small": 0.12, "large": 0.19}
"""Size name -> half-extent of a shape in unit image coordinates (before jitter)."""

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("yellow", "square")}
)
"""(colour, shape) combinations that never appear in the train and test splits."""

SPLITS = ("train", "test", "heldout")

MAX_CENTRE_JITTER = 0.015
SIZE_JITTER = (0.95, 1.05)
JITTER_PER_OBJECT = 3  # centre dx, centre dy, size factor

# Half-way between the largest jittered small half-extent (0.126) and smallest large one (0.1805).
_SIZE_THRESHOLD = 0.153
# Area of a shape divided by its half-extent squared.
_AREA_FACTORS = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
# RGB distance from the background above which a pixel is foreground: half the smallest
# distance between an object colour and a background (purple on gray, 108).
_FOREGROUND_THRESHOLD = 54.0
# Components smaller than this fraction of the image are noise.
_MIN_COMPONENT_FRACTION = 0.003
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
_RELATION_OF_POSITIONS = {positions: phrase for phrase, positions in RELATIONS.items()}
_WORD_ALIASES = {"grey": "gray", "center": "centre"}


def _check_choice(value: str, choices: tuple[str, ...] | dict[str, object], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


@dataclass(frozen=True)
class Obj:
    """One object of a scene: what it looks like and which slot it sits in."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        _check_choice(self.colour, COLOURS, "colour")
        _check_choice(self.shape, SHAPES, "shape")
        _check_choice(self.size, SIZES, "size")
        _check_choice(self.position, POSITIONS, "position")


@dataclass(frozen=True)
class Scene:
    """Objects on a plain background; `jitter` perturbs the geometry but not the meaning.

    `jitter` is empty or holds (centre dx, centre dy, size factor) per object. It is left out
    of equality, so a scene equals its parsed caption.
    """

    objects: tuple[Obj, ...]
    background: str
    jitter: tuple[float, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "jitter", tuple(float(value) for value in self.jitter))
        _check_choice(self.background, BACKGROUNDS, "background")
        if self.jitter and len(self.jitter) != JITTER_PER_OBJECT * len(self.objects):
            raise ValueError(
                f"jitter must hold {JITTER_PER_OBJECT} values per object "
                f"({JITTER_PER_OBJECT * len(self.objects)}), got {len(self.jitter)}"
            )


# ---------------------------------------------------------------------------------------------
# Sampling


def _sample_object(rng: np.random.Generator, position: str) -> Obj:
    return Obj(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(SIZES)),
        position=position,
    )


def _is_heldout(obj: Obj) -> bool:
    return (obj.colour, obj.shape) in HELDOUT_PAIRS


def has_heldout_pair(scene: Scene) -> bool:
    """Whether an object of `scene` is a held-out colour-shape pair (a held-out scene)."""
    return any(_is_heldout(obj) for obj in scene.objects)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draws a random scene of one or two objects, respecting the split's held-out pairs.

    In "train" and "test" no object is a held-out (colour, shape) pair; in "heldout" at least
    one is.
    """
    _check_choice(split, SPLITS, "split")
    if rng.random() < 0.5:
        positions: tuple[str, ...] = (str(rng.choice(POSITIONS)),)
    else:
        positions = tuple(RELATIONS.values())[int(rng.integers(len(RELATIONS)))]
    while True:
        objects = tuple(_sample_object(rng, position) for position in positions)
        has_heldout = any(_is_heldout(obj) for obj in objects)
        if has_heldout == (split == "heldout"):
            break
    background = str(rng.choice(list(BACKGROUNDS)))
    jitter: list[float] = []
    for _ in objects:
        dx, dy = rng.uniform(-MAX_CENTRE_JITTER, MAX_CENTRE_JITTER, size=2)
        jitter += [float(dx), float(dy), float(rng.uniform(*SIZE_JITTER))]
    return Scene(objects=objects, background=background, jitter=tuple(jitter))


def scene_to_json(scene: Scene) -> str:
    """Serialises a scene, jitter included, as compact JSON."""
    record = {
        "objects": [
            {"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position}
            for o in scene.objects
        ],
        "background": scene.background,
        "jitter": list(scene.jitter),
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def scene_from_json(text: str | bytes) -> Scene:
    """Inverse of `scene_to_json`."""
    record = json.loads(text)
    return Scene(
        objects=tuple(Obj(**obj) for obj in record["objects"]),
        background=record["background"],
        jitter=tuple(record.get("jitter", ())),
    )


def canonical(scene: Scene) -> Scene:
    """Reorders objects left before right, top before bottom (the oracle's order)."""

    def order_key(index: int) -> tuple[float, float, str, str, str]:
        obj = scene.objects[index]
        x, y = SLOT_CENTRES[obj.position]
        return (x, y, obj.colour, obj.shape, obj.size)

    order = sorted(range(len(scene.objects)), key=order_key)
    jitter: tuple[float, ...] = ()
    if scene.jitter:
        n = JITTER_PER_OBJECT
        jitter = tuple(v for i in order for v in scene.jitter[n * i : n * (i + 1)])
    return Scene(tuple(scene.objects[i] for i in order), scene.background, jitter)


# ---------------------------------------------------------------------------------------------
# Rendering


def _box_sdf(x: np.ndarray, y: np.ndarray, half_side: float) -> np.ndarray:
    qx = np.abs(x) - half_side
    qy = np.abs(y) - half_side
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside


def _segment_distance(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    ex, ey = b[0] - a[0], b[1] - a[1]
    t = np.clip(((x - a[0]) * ex + (y - a[1]) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    return np.hypot(x - a[0] - t * ex, y - a[1] - t * ey)


def _triangle_sdf(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    # Apex (0, -r), base from (-r, r) to (r, r); symmetric, so fold onto x >= 0.
    x = np.abs(x)
    slant = _segment_distance(x, y, (0.0, -r), (r, r))
    base = _segment_distance(x, y, (0.0, r), (r, r))
    inside = (y < r) & (2.0 * x - (y + r) < 0.0)
    return np.where(inside, -1.0, 1.0) * np.minimum(slant, base)


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to a shape of half-extent r centred at the origin (y down)."""
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        return _box_sdf(x, y, r)
    if shape == "diamond":
        return _box_sdf((x + y) / math.sqrt(2.0), (x - y) / math.sqrt(2.0), r / math.sqrt(2.0))
    if shape == "triangle":
        return _triangle_sdf(x, y, r)
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _coverage(sdf_pixels: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - sdf_pixels, 0.0, 1.0)


def object_geometry(scene: Scene, index: int) -> tuple[float, float, float]:
    """(centre x, centre y, half-extent) of object `index` in unit coordinates, with jitter."""
    obj = scene.objects[index]
    x, y = SLOT_CENTRES[obj.position]
    r = HALF_EXTENTS[obj.size]
    if scene.jitter:
        dx, dy, factor = scene.jitter[JITTER_PER_OBJECT * index : JITTER_PER_OBJECT * (index + 1)]
        x, y, r = x + dx, y + dy, r * factor
    return x, y, r


def render(scene: Scene, size: int) -> np.ndarray:
    """Draws a scene as a (size, size, 3) uint8 image, anti-aliased via signed distances."""
    if size < 16:
        raise ValueError(f"render size must be >= 16, got {size}")
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = BACKGROUNDS[scene.background]
    for index, obj in enumerate(scene.objects):
        cx, cy, r = (value * size for value in object_geometry(scene, index))
        x0, x1 = max(math.floor(cx - r - 1), 0), min(math.ceil(cx + r + 1), size)
        y0, y1 = max(math.floor(cy - r - 1), 0), min(math.ceil(cy + r + 1), size)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1) + 0.5 - cx
        ys = np.arange(y0, y1) + 0.5 - cy
        alpha = _coverage(_shape_sdf(obj.shape, xs[None, :], ys[:, None], r))[..., None]
        patch = image[y0:y1, x0:x1]
        patch += alpha * (np.asarray(COLOURS[obj.colour], dtype=np.float64) - patch)
    return np.rint(image).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _describe(obj: Obj) -> str:
    return _with_article(f"{obj.size} {obj.colour} {obj.shape}")


def caption(scene: Scene) -> str:
    """Describes a one- or two-object scene in the grammar that `parse` reads."""
    background = f"on {_with_article(scene.background)} background"
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        return f"{_describe(obj)} {_POSITION_PHRASES[obj.position]} {background}"
    if len(scene.objects) == 2:
        first, second = scene.objects
        relation = _RELATION_OF_POSITIONS.get((first.position, second.position))
        if relation is None:
            raise ValueError(
                f"no relation for positions ({first.position}, {second.position}); "
                f"valid pairs: {list(_RELATION_OF_POSITIONS)}"
            )
        return f"{_describe(first)} {relation} {_describe(second)} {background}"
    raise ValueError(f"a caption needs 1 or 2 objects, the scene has {len(scene.objects)}")


class _WordReader:
    """Consumes a caption word by word, reporting what it expected when it fails."""

    def __init__(self, text: str) -> None:
        self.text = text
        words = text.lower().replace(",", " ").split()
        if words and words[-1].endswith("."):
            words[-1] = words[-1][:-1]
        self.words = [_WORD_ALIASES.get(word, word) for word in words if word]
        self.position = 0

    def fail(self, expected: str) -> ValueError:
        found = " ".join(self.words[self.position :]) or "the end of the text"
        return ValueError(
            f"cannot parse caption {self.text!r}: expected {expected} at word "
            f"{self.position + 1}, found {found!r}"
        )

    def peek_phrase(self, phrases: dict[str, str] | tuple[str, ...]) -> str | None:
        for phrase in sorted(phrases, key=lambda p: -len(p.split())):
            words = phrase.split()
            if self.words[self.position : self.position + len(words)] == words:
                return phrase
        return None

    def take(self, phrases: dict[str, str] | tuple[str, ...], what: str) -> str:
        phrase = self.peek_phrase(phrases)
        if phrase is None:
            raise self.fail(f"{what} (one of: {', '.join(phrases)})")
        self.position += len(phrase.split())
        return phrase

    def at_end(self) -> bool:
        return self.position == len(self.words)


def _read_description(reader: _WordReader) -> tuple[str, str, str]:
    """Reads "a <size> <colour> <shape>" and returns (colour, shape, size)."""
    reader.take(("a", "an"), "an article")
    size = reader.take(SIZES, "a size")
    colour = reader.take(tuple(COLOURS), "a colour")
    shape = reader.take(SHAPES, "a shape")
    return colour, shape, size


def parse(text: str) -> Scene:
    """Reads a caption written by `caption` back into a scene (case and spacing tolerant)."""
    reader = _WordReader(text)
    first = _read_description(reader)
    position_of_phrase = {phrase: position for position, phrase in _POSITION_PHRASES.items()}
    location = reader.take(tuple(position_of_phrase) + tuple(RELATIONS), "a position or relation")
    if location in position_of_phrase:
        objects = (Obj(*first, position=position_of_phrase[location]),)
    else:
        first_position, second_position = RELATIONS[location]
        second = _read_description(reader)
        objects = (Obj(*first, position=first_position), Obj(*second, position=second_position))
    reader.take(("on",), '"on"')
    reader.take(("a", "an"), "an article")
    background = reader.take(tuple(BACKGROUNDS), "a background colour")
    reader.take(("background",), '"background"')
    if not reader.at_end():
        raise reader.fail("the end of the caption")
    return Scene(objects=objects, background=background)


# ---------------------------------------------------------------------------------------------
# Oracle


def _nearest(colour: np.ndarray, palette: dict[str, RGB]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(colour - np.asarray(palette[name], float)) for name in names]
    return names[int(np.argmin(distances))]


def _border_pixels(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]], axis=0)


def _shape_centre(shape: str, centroid: tuple[float, float], r: float) -> tuple[float, float]:
    # An apex-up triangle's bounding-box centre lies r/3 above its centroid.
    x, y = centroid
    return (x, y - r / 3.0) if shape == "triangle" else (x, y)


def _read_component(
    pixels: np.ndarray,
    offsets: np.ndarray,
    squared_distance: np.ndarray,
    labels: np.ndarray,
    label: int,
    bounds: tuple[slice, slice],
) -> tuple[str, str, float, tuple[float, float]]:
    """Returns (colour, shape, half-extent in pixels, centre in pixels) of one component."""
    height, width = labels.shape
    pad = 2
    y0, y1 = max(bounds[0].start - pad, 0), min(bounds[0].stop + pad, height)
    x0, x1 = max(bounds[1].start - pad, 0), min(bounds[1].stop + pad, width)
    patch_labels = labels[y0:y1, x0:x1]
    component = patch_labels == label
    region = ndimage.binary_dilation(component, _EIGHT_CONNECTED) & (
        (patch_labels == 0) | component
    )

    component_squared_distance = squared_distance[y0:y1, x0:x1][component]
    component_pixels = pixels[y0:y1, x0:x1][component]
    # The pixels at least 90% as far from the background as the farthest: the interior.
    strongest = component_squared_distance >= 0.81 * component_squared_distance.max()
    measured_colour = np.median(component_pixels[strongest], axis=0)
    colour = _nearest(measured_colour, COLOURS)

    direction = np.median(offsets[y0:y1, x0:x1][component][strongest], axis=0)
    alpha = np.clip(
        offsets[y0:y1, x0:x1] @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0
    )
    alpha = alpha * region
    area = float(alpha.sum())
    ys = np.arange(y0, y1)[:, None] + 0.5
    xs = np.arange(x0, x1)[None, :] + 0.5
    centroid = (float((alpha * xs).sum() / area), float((alpha * ys).sum() / area))

    best: tuple[float, str, float, tuple[float, float]] | None = None
    for shape in SHAPES:
        r = math.sqrt(area / _AREA_FACTORS[shape])
        cx, cy = _shape_centre(shape, centroid, r)
        template = _coverage(_shape_sdf(shape, xs - cx, ys - cy, r))
        # A template has the component's area, so what it lacks inside the patch lies outside.
        outside = max(area - float(template.sum()), 0.0)
        error = (float(np.abs(alpha - template).sum()) + outside) / area
        if best is None or error < best[0]:
            best = (error, shape, r, (cx, cy))
    assert best is not None
    _, shape, r, centre = best
    return colour, shape, r, centre


def oracle(image: np.ndarray) -> Scene:
    """Reads the objects an image shows, in canonical order (see `canonical`).

    Works on any uint8 (H, W, 3) image, reliably from 32 pixels up: background from the border,
    objects as connected components that differ from it, each fitted to the best shape.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 3:
        raise ValueError(f"oracle needs an (H, W, 3) image, got shape {image.shape}")
    pixels = image[..., :3].astype(np.float64)
    height, width = pixels.shape[:2]
    measured_background = np.median(_border_pixels(pixels), axis=0)
    background = _nearest(measured_background, BACKGROUNDS)

    offsets = pixels - measured_background
    squared_distance = np.einsum("hwc,hwc->hw", offsets, offsets)
    foreground = squared_distance > _FOREGROUND_THRESHOLD**2
    labels, count = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
    if count == 0:
        return Scene(objects=(), background=background)
    pixel_counts = np.bincount(labels.ravel(), minlength=count + 1)
    image_scale = math.sqrt(height * width)

    objects = []
    for label, bounds in enumerate(ndimage.find_objects(labels), start=1):
        if bounds is None or pixel_counts[label] < _MIN_COMPONENT_FRACTION * height * width:
            continue
        colour, shape, r, (cx, cy) = _read_component(
            pixels, offsets, squared_distance, labels, label, bounds
        )
        size = "small" if r / image_scale < _SIZE_THRESHOLD else "large"
        unit_centre = np.array([cx / width, cy / height])
        position = min(
            POSITIONS,
            key=lambda name: float(np.linalg.norm(unit_centre - np.asarray(SLOT_CENTRES[name]))),
        )
        objects.append(Obj(colour=colour, shape=shape, size=size, position=position))
    return canonical(Scene(objects=tuple(objects), background=background))


# ---------------------------------------------------------------------------------------------
# Accuracy

ATTRIBUTES = ("colour", "shape", "size", "position")


def _count_matches(predicted: tuple[Obj, ...], target: tuple[Obj, ...]) -> dict[str, int]:
    return {
        name: sum(
            getattr(p, name) == getattr(t, name) for p, t in zip(predicted, target, strict=True)
        )
        for name in ATTRIBUTES
    }


def attribute_accuracy(predicted: Scene, target: Scene) -> dict[str, bool]:
    """Which attributes of `predicted` match `target`, objects paired in their best order.

    Keys: colour, shape, size, position, background, count and whole (all of them match).
    Object attributes only match when the object counts do.
    """
    result = {
        "background": predicted.background == target.background,
        "count": len(predicted.objects) == len(target.objects),
    }
    matches = dict.fromkeys(ATTRIBUTES, False)
    if result["count"]:
        if len(target.objects) <= 6:
            pairings = list(itertools.permutations(predicted.objects))
            target_objects = target.objects
        else:
            pairings = [canonical(predicted).objects]
            target_objects = canonical(target).objects
        counts = max(
            (_count_matches(pairing, target_objects) for pairing in pairings),
            key=lambda c: sum(c.values()),
        )
        matches = {name: counts[name] == len(target_objects) for name in ATTRIBUTES}
    result.update(matches)
    result["whole"] = all(result.values())
    return result
