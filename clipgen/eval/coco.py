"""The MS-COCO zero-shot protocol (COCO-30K) from a local COCO 2014 validation folder.

Layout read: `<coco_dir>/val2014/<file_name>` images and
`<coco_dir>/annotations/captions_val2014.json` (the official captions file: "images" with
id and file_name, "annotations" with image_id and caption).

Caption draw (`CocoVal.draw_captions(num, seed)`), the GLIDE / DALL-E 2 / Imagen protocol of
captions drawn at random from the validation set, made exact:
- the candidate images are those with at least one caption, sorted by image id;
- `num` of them are chosen without replacement: the first `num` entries of
  `np.random.default_rng(seed).permutation(num_images)`;
- each chosen image gives one caption: its captions in annotation-id order, indexed by
  `np.random.default_rng([seed, image_id]).integers(num_captions_of_image)`;
- a caption is its annotation text with surrounding whitespace stripped.
So a smaller draw is a prefix of a larger one with the same seed, and one image's caption
does not depend on how many are drawn.

Real images (`load_image`): decoded as RGB, centre-cropped to the square of the short side
(offsets `(size - side) // 2`), then resized to `resolution` with PIL bicubic (which
antialiases when it shrinks). Images are read one batch at a time, never all at once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES_DIR = "val2014"
ANNOTATIONS_FILE = "annotations/captions_val2014.json"
COCO30K_CAPTIONS = 30_000
COCO_RESOLUTION = 256


@dataclasses.dataclass(frozen=True)
class CocoCaption:
    """One drawn caption and the validation image it describes."""

    image_id: int
    file_name: str
    caption: str


def centre_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """A PIL image -> (resolution, resolution, 3) uint8: RGB, centre square crop of the short
    side, PIL bicubic resize."""
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side != resolution:
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(square, np.uint8)


class CocoVal:
    """The COCO 2014 validation folder: its captioned images, the seeded caption draw and
    the real images cropped and resized as the protocol says."""

    def __init__(self, coco_dir: str | Path):
        self.root = Path(coco_dir)
        if not str(coco_dir) or not self.root.is_dir():
            raise FileNotFoundError(
                f"COCO directory {str(coco_dir)!r} does not exist; it must hold {IMAGES_DIR}/ "
                f"and {ANNOTATIONS_FILE} (COCO 2014 val)"
            )
        self.images_dir = self.root / IMAGES_DIR
        self.annotations_path = self.root / ANNOTATIONS_FILE
        if not self.annotations_path.is_file():
            raise FileNotFoundError(
                f"COCO captions file {self.annotations_path} is missing (expected the official "
                f"captions_val2014.json under {self.root / 'annotations'})"
            )
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO images directory {self.images_dir} is missing")
        data = json.loads(self.annotations_path.read_text(encoding="utf-8"))
        try:
            file_names = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
            annotations = sorted(data["annotations"], key=lambda a: int(a.get("id", 0)))
            captions: dict[int, list[str]] = {}
            for annotation in annotations:
                image_id = int(annotation["image_id"])
                if image_id in file_names:
                    captions.setdefault(image_id, []).append(str(annotation["caption"]).strip())
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{self.annotations_path} is not a COCO captions file (missing {error})"
            ) from None
        self.file_names = file_names
        self.captions = captions
        self.image_ids = sorted(captions)
        if not self.image_ids:
            raise ValueError(f"{self.annotations_path} has no captioned images")

    def __len__(self) -> int:
        return len(self.image_ids)

    def drawn_image_ids(self, num: int, seed: int) -> list[int]:
        """The `num` image ids the caption draw picks, in draw order."""
        if not 0 < num <= len(self.image_ids):
            raise ValueError(
                f"cannot draw {num} captions without replacement from the "
                f"{len(self.image_ids)} captioned images of {self.annotations_path}"
            )
        order = np.random.default_rng(seed).permutation(len(self.image_ids))[:num]
        return [self.image_ids[int(index)] for index in order]

    def draw_captions(self, num: int = COCO30K_CAPTIONS, seed: int = 0) -> list[CocoCaption]:
        """`num` captions, one per image, images without replacement (see the module doc)."""
        drawn = []
        for image_id in self.drawn_image_ids(num, seed):
            options = self.captions[image_id]
            pick = int(np.random.default_rng([seed, image_id]).integers(len(options)))
            drawn.append(CocoCaption(image_id, self.file_names[image_id], options[pick]))
        return drawn

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.file_names[image_id]

    def load_image(self, image_id: int, resolution: int = COCO_RESOLUTION) -> np.ndarray:
        """The real image, centre-cropped and resized: (resolution, resolution, 3) uint8."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"COCO image {path} (image id {image_id}) is missing")
        with Image.open(path) as image:
            return centre_crop_resize(image, resolution)

    def load_images(self, image_ids: Sequence[int], resolution: int) -> np.ndarray:
        """A batch (N, resolution, resolution, 3) uint8 of real images."""
        return np.stack([self.load_image(int(i), resolution) for i in image_ids])

    def image_batches(
        self, image_ids: Sequence[int], resolution: int, batch_size: int
    ) -> Iterator[np.ndarray]:
        """The images of `image_ids` in order, `batch_size` at a time."""
        for start in range(0, len(image_ids), batch_size):
            yield self.load_images(image_ids[start : start + batch_size], resolution)
