"""Caption sources for the evaluators: captions with their real images, from the shapes
world or from COCO 2014 val (the COCO-30K protocol, clipgen.eval.coco)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipgen.data import shapes
from clipgen.data.pipeline import ProceduralShapes
from clipgen.eval.coco import CocoVal
from clipgen.eval.registry import merge_settings


class ImageSet(Protocol):
    """Real images addressed by row: `len()`, `real_images(rows, resolution)` (uint8 NHWC),
    `image_key(row)` (equal for the same image in any set) and `describe()` (provenance)."""

    def __len__(self) -> int: ...
    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray: ...
    def image_key(self, row: int) -> tuple: ...
    def describe(self) -> dict[str, Any]: ...


class CaptionSource(ImageSet, Protocol):
    """An ImageSet whose row i also has a caption, `captions[i]`."""

    captions: list[str]


class ShapesCaptions:
    """The first `count` examples of a shapes-world split: captions, and their scenes
    rendered as the real images."""

    def __init__(self, split: str = "test", count: int = 1000, seed: int = 0):
        stream = ProceduralShapes((), split, seed)
        examples = [stream[i] for i in range(count)]
        self.split, self.count, self.seed = split, count, seed
        self.captions = [example["caption"] for example in examples]
        self.scenes = [shapes.scene_from_json(example["scene"]) for example in examples]

    def __len__(self) -> int:
        return self.count

    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray:
        return np.stack([shapes.render(self.scenes[int(row)], resolution) for row in rows])

    def image_key(self, row: int) -> tuple:
        return ("shapes", self.split, self.seed, int(row))

    def describe(self) -> dict[str, Any]:
        return {"source": "shapes", "split": self.split, "count": self.count, "seed": self.seed}


class CocoCaptions:
    """COCO 2014 val captions drawn by the COCO-30K protocol (clipgen.eval.coco); the real
    image of row i is the image caption i describes, centre-cropped and resized."""

    def __init__(self, coco_dir: str, num: int, seed: int = 0):
        self.coco = _coco_val(str(Path(coco_dir).resolve()))
        self.coco_dir, self.num, self.seed = str(coco_dir), num, seed
        self.drawn = self.coco.draw_captions(num, seed)
        self.captions = [drawn.caption for drawn in self.drawn]

    def __len__(self) -> int:
        return self.num

    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray:
        return self.coco.load_images([self.drawn[int(row)].image_id for row in rows], resolution)

    def image_key(self, row: int) -> tuple:
        return ("coco", str(self.coco.root.resolve()), self.drawn[int(row)].image_id)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "coco",
            "coco_dir": self.coco_dir,
            "split": "val2014",
            "count": self.num,
            "seed": self.seed,
            "draw": "images without replacement, one random caption each (clipgen.eval.coco)",
            "crop_resize": "centre square crop, PIL bicubic",
        }


class CocoImages:
    """COCO 2014 val images as a reference set: all captioned images by id, or the images of
    the first `num` drawn captions."""

    def __init__(self, coco_dir: str, num: int | None = None, seed: int = 0):
        self.coco = _coco_val(str(Path(coco_dir).resolve()))
        self.coco_dir, self.seed = str(coco_dir), seed
        self.subset = "all captioned images" if num is None else f"images of {num} drawn captions"
        self.image_ids = (
            list(self.coco.image_ids) if num is None else self.coco.drawn_image_ids(num, seed)
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def real_images(self, rows: Sequence[int], resolution: int) -> np.ndarray:
        return self.coco.load_images([self.image_ids[int(row)] for row in rows], resolution)

    def image_key(self, row: int) -> tuple:
        return ("coco", str(self.coco.root.resolve()), self.image_ids[int(row)])

    def describe(self) -> dict[str, Any]:
        return {
            "source": "coco",
            "coco_dir": self.coco_dir,
            "split": "val2014",
            "subset": self.subset,
            "count": len(self),
            "seed": self.seed,
            "crop_resize": "centre square crop, PIL bicubic",
        }


@functools.lru_cache(maxsize=4)
def _coco_val(coco_dir: str) -> CocoVal:
    return CocoVal(coco_dir)


CAPTION_DEFAULTS = {"source": "", "split": "test", "count": 1000, "seed": 0, "coco_dir": ""}


def caption_source(where: str, config: Mapping[str, Any]) -> CaptionSource:
    """`{"source": "shapes", "split", "count", "seed"}` or `{"source": "coco", "coco_dir",
    "count", "seed"}`."""
    options = merge_settings(where, config, CAPTION_DEFAULTS)
    if options["source"] == "shapes":
        return ShapesCaptions(options["split"], int(options["count"]), int(options["seed"]))
    if options["source"] == "coco":
        if not options["coco_dir"]:
            raise ValueError(f"{where}.coco_dir is empty: give the COCO 2014 directory")
        return CocoCaptions(options["coco_dir"], int(options["count"]), int(options["seed"]))
    raise ValueError(f"{where}.source={options['source']!r}; expected 'shapes' or 'coco'")
