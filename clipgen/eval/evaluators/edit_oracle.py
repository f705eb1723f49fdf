"""`edit_oracle`: a DiffusionCLIP edit (an `edit` stage's parameters) on shapes-world scenes
of a split (held-out by default) whose caption holds the source word, read by the oracle:
- applied: every object that had the source value (a colour, shape, size or background
  word) shows the target value, in the same place;
- kept: every other attribute reads as in the truth with the edit done (object count,
  background, each object's shape, size, position and colour, the untouched objects'
  edited attribute too); both: applied and kept;
- kept/<what>: the share that kept each of KEPT (the objects' number and places, the
  background, the objects' colour, shape and size);
- kept_vs_input: kept, judged against the oracle's reading of the input instead of the
  truth (what changed, whatever the oracle gets wrong on both);
and the mean directional CLIP similarity S_dir (the edit's CLIP and text direction), the
L1 to the input ([-1, 1] units), and for reference the base model's reconstruction
(inversion then generation, unedited): its L1 and the share the oracle reads whole as the
truth (the ceiling of kept), and the oracle's accuracy on the inputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from clipgen import edit
from clipgen.data import shapes
from clipgen.data.preprocess import to_unit_range
from clipgen.eval import oracle, registry
from clipgen.pipelines import edit as edit_pipeline


def attribute_of(word: str) -> str:
    """Which attribute a word names: colour, shape, size, position or background."""
    for attribute, values in (
        ("colour", shapes.COLOURS),
        ("shape", shapes.SHAPES),
        ("size", shapes.SIZES),
        ("position", shapes.POSITIONS),
        ("background", shapes.BACKGROUNDS),
    ):
        if word in values:
            return attribute
    raise ValueError(f"{word!r} is no shapes-world attribute value")


def edited_scene(scene: shapes.Scene, changes: dict[str, str]) -> shapes.Scene:
    """The scene as it should read after edits {source word: target word}."""
    background = scene.background
    objects = []
    for obj in scene.objects:
        for source, target in changes.items():
            attribute = attribute_of(source)
            if attribute == "background":
                background = target if background == source else background
            elif getattr(obj, attribute) == source:
                obj = dataclasses.replace(obj, **{attribute: target})
        objects.append(obj)
    return shapes.Scene(tuple(objects), background, scene.jitter)


def _by_position(scene: shapes.Scene) -> dict[str, shapes.Obj]:
    return {obj.position: obj for obj in scene.objects}


def judge(read: shapes.Scene, truth: shapes.Scene, changes: dict[str, str]) -> dict[str, bool]:
    """applied / kept / both for one edited image the oracle read as `read`, the input's
    scene being `truth` and the edit `changes` ({source: target}); objects are paired by
    position (a scene's objects sit in different slots)."""
    applied, lost = _verdict(read, truth, changes)
    kept = not lost
    return {"applied": applied, "kept": kept, "both": applied and kept}


def _verdict(
    read: shapes.Scene, truth: shapes.Scene, changes: dict[str, str]
) -> tuple[bool, set[str]]:
    """Whether the edit was applied, and what it failed to keep: any of KEPT."""
    expected = edited_scene(truth, changes)
    edited = {attribute_of(source) for source in changes}
    seen, before, after = _by_position(read), _by_position(truth), _by_position(expected)
    background_changed = truth.background != expected.background
    applied = read.background == expected.background if background_changed else True
    lost = set()
    if len(read.objects) != len(expected.objects) or set(seen) != set(after):
        lost.add("objects")
    if not background_changed and read.background != expected.background:
        lost.add("background")
    for position, want in after.items():
        got = seen.get(position)
        for attribute in shapes.ATTRIBUTES:
            value = getattr(want, attribute)
            right = got is not None and getattr(got, attribute) == value
            if attribute in edited and getattr(before[position], attribute) != value:
                applied &= right
            elif not right and got is not None:
                lost.add(attribute)
    return bool(applied), lost


# What an edit can fail to keep: the objects (their number and places), the background, and
# an attribute of an object found in its place.
KEPT = ("objects", "background", "colour", "shape", "size")


def readings(images: np.ndarray, resolution: int = 64) -> list[shapes.Scene]:
    """The oracle's reading of each uint8 image (enlarged to `resolution` when smaller)."""
    return [shapes.oracle(image) for image in oracle.enlarged(images, resolution)]


def judge_all(
    edited: np.ndarray, scenes: list[shapes.Scene], changes: dict[str, str], resolution: int = 64
) -> dict[str, float]:
    """Mean applied / kept / both over uint8 edited images of these scenes."""
    return judge_readings(readings(edited, resolution), scenes, changes)


def judge_readings(
    read: list[shapes.Scene], scenes: list[shapes.Scene], changes: dict[str, str]
) -> dict[str, float]:
    """Mean applied / kept / both over the oracle's readings of edited images, and for each
    of KEPT the share that kept it (kept/<what>)."""
    verdicts = [_verdict(r, scene, changes) for r, scene in zip(read, scenes, strict=True)]
    applied = np.array([a for a, _ in verdicts])
    kept = np.array([not lost for _, lost in verdicts])
    results = {
        "applied": float(applied.mean()),
        "kept": float(kept.mean()),
        "both": float((applied & kept).mean()),
    }
    for what in KEPT:
        results[f"kept/{what}"] = float(np.mean([what not in lost for _, lost in verdicts]))
    return results


def _whole(read: list[shapes.Scene], scenes: list[shapes.Scene]) -> float:
    """The share of images the oracle read right in every attribute."""
    pairs = zip(read, scenes, strict=True)
    return float(np.mean([shapes.attribute_accuracy(r, s)["whole"] for r, s in pairs]))


class Evaluator(registry.StageEvaluator):
    DEFAULTS = {
        **registry.StageEvaluator.DEFAULTS,
        "split": "heldout",
        "num_examples": 200,
        "batch_size": 50,
        "seed": 0,
        "cache": "",
        "oracle_resolution": 64,  # smaller images are enlarged (bicubic) before reading
    }

    def __init__(self, name, config, **kwargs):
        super().__init__(name, config, **kwargs)
        stage = self.stage_config
        if stage.data.folder or stage.edit.templates != "shapes":
            raise registry.Skipped(f"{name}: the edit is not a shapes-world one")
        self.editor = edit_pipeline.Editor(stage, cache=self.settings["cache"] or None)
        size = self.editor.backbone.resolution
        options = self.settings
        self.images, self.scenes = edit.shapes_with(
            stage.edit.source, options["split"], options["num_examples"], size, options["seed"]
        )
        self.changes = {stage.edit.source: stage.edit.target}
        self._reference = None

    def __call__(self, params: Any) -> dict[str, float]:
        found = edit_pipeline.Edit(self.stage_config, params)
        size = self.settings["oracle_resolution"]
        edited = self._over_inputs(lambda chunk: self.editor.apply(chunk, [found]))
        after = readings(edited, size)
        results = judge_readings(after, self.scenes, self.changes)
        before, unedited = self._unedited()
        relative = [
            judge(seen, read, self.changes)["kept"]
            for seen, read in zip(after, before, strict=True)
        ]
        results["kept_vs_input"] = float(np.mean(relative))
        inputs = to_unit_range(self.images)
        results["l1"] = float(np.mean(np.abs(to_unit_range(edited) - inputs)))
        results["directional_cosine"] = float(
            np.mean(self.editor.direction_scores(self.images, edited, found))
        )
        results.update(unedited)
        split = self.settings["split"]
        return {f"{split}/{key}": value for key, value in results.items()}

    def _unedited(self) -> tuple[list[shapes.Scene], dict[str, float]]:
        """The oracle's readings of the inputs, and the figures that do not depend on the
        edit (the base model's reconstruction, the oracle on the inputs), made once."""
        if self._reference is None:
            size = self.settings["oracle_resolution"]
            rebuilt = self._over_inputs(self.editor.reconstruct)
            before = readings(self.images, size)
            inputs = to_unit_range(self.images)
            figures = {
                "reconstruction_l1": float(np.mean(np.abs(to_unit_range(rebuilt) - inputs))),
                "reconstruction_whole": _whole(readings(rebuilt, size), self.scenes),
                "oracle_inputs": _whole(before, self.scenes),
            }
            self._reference = before, figures
        return self._reference

    def _over_inputs(self, transform) -> np.ndarray:
        """transform(images) over the inputs, `batch_size` images at a time."""
        batch = self.settings["batch_size"]
        chunks = [self.images[i : i + batch] for i in range(0, len(self.images), batch)]
        return np.concatenate([transform(chunk) for chunk in chunks])
