"""Random-access sources of caption-image pairs, the training stages' input, named by
`config.data.source`:

  "procedural"           the shapes world drawn on demand (the default);
  "tfds:DATA_DIR[:NAME]" a built `shapes` tensorflow-datasets builder (array_record);
  "folder:DIR"           an image folder: NAME.png / .jpg / .jpeg with its caption NAME.txt;
  "wds:DIR"              webdataset-style tar shards (*.tar of KEY.png|jpg + KEY.txt),
                         indexed once on opening so that any example is one seek away.

Example i is `{"image_<r>": uint8 (r, r, 3) for each resolution asked, "caption": str,
"id": i}` (the shapes sources also give "scene"). Every host of a multi-host run opens the
same source and reads only its rows of each global batch (clipgen.data.pipeline), so a
global batch number is the whole iterator position: a run resumes from it on any number
of hosts.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipgen.data import pipeline, preprocess
from clipgen.data.image_input import decode_image, read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def open_source(spec: str, resolutions: Sequence[int], split: str = "train", seed: int = 0):
    """The source `spec` names (see the module docstring), giving images at `resolutions`."""
    kind, _, location = (spec or "procedural").partition(":")
    if kind == "procedural":
        return pipeline.ProceduralShapes(tuple(resolutions), split, seed)
    if kind == "tfds":
        return TfdsShapes(location, resolutions, split)
    if kind == "folder":
        return ImageFolder(location, resolutions)
    if kind == "wds":
        return TarShards(location, resolutions)
    raise ValueError(
        f"config.data.source={spec!r}: expected procedural, tfds:DATA_DIR[:NAME], folder:DIR "
        "or wds:DIR"
    )


class TfdsShapes:
    """A split of a built shapes tfds dataset (clipgen.data.shapes_tfds), read by index."""

    def __init__(self, location: str, resolutions: Sequence[int], split: str):
        from clipgen.data import shapes_tfds

        data_dir, _, name = location.partition(":")
        builder = shapes_tfds.Shapes(data_dir=data_dir, config=name or "small")
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"no built shapes dataset {name or 'small'} in {data_dir}: build it with "
                f"`clipgen shapes --data-dir {data_dir} --preset {name or 'small'}`"
            )
        available = builder.shapes_config.resolutions
        missing = sorted(set(resolutions) - set(available))
        if missing:
            raise ValueError(f"{location} has images at {available} px, not at {missing} px")
        self.resolutions = tuple(resolutions)
        self.location = location
        self.source = builder.as_data_source(split)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[int(index)]
        example = {f"image_{r}": np.asarray(record[f"image_{r}"]) for r in self.resolutions}
        example["caption"] = pipeline.decode_text(record["caption"])
        example["scene"] = pipeline.decode_text(record["scene"])
        example["id"] = int(record["id"])
        if example["id"] != int(index):
            raise ValueError(
                f"record {index} of {self.location} holds example {example['id']}: the "
                "dataset was built before version 1.1.0 stored examples in id order; rebuild it"
            )
        return example


def _example(pixels: np.ndarray, caption: str, index: int, resolutions) -> dict[str, Any]:
    example = {f"image_{r}": preprocess.resize_and_crop(pixels, r) for r in resolutions}
    example["caption"] = caption.strip()
    example["id"] = index
    return example


class ImageFolder:
    """Images with their captions in one directory, in name order."""

    def __init__(self, directory: str, resolutions: Sequence[int]):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no image folder at {self.directory}")
        self.resolutions = tuple(resolutions)
        self.images = sorted(
            path
            for path in self.directory.iterdir()
            if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file()
        )
        if not self.images:
            raise ValueError(
                f"{self.directory} holds no image with a caption beside it (NAME.png + NAME.txt)"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.images[int(index)]
        caption = path.with_suffix(".txt").read_text(encoding="utf-8")
        return _example(read_image(path), caption, int(index), self.resolutions)


class TarShards:
    """Webdataset-style shards: *.tar files whose members KEY.png|jpg and KEY.txt are an
    example; examples in shard-name then member order."""

    def __init__(self, directory: str, resolutions: Sequence[int]):
        self.resolutions = tuple(resolutions)
        shards = sorted(Path(directory).glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no *.tar shards in {directory}")
        self.entries: list[tuple[Path, tarfile.TarInfo, tarfile.TarInfo]] = []
        for shard in shards:
            with tarfile.open(shard) as archive:
                members: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in archive.getmembers():
                    if member.isfile():
                        key, _, suffix = member.name.rpartition(".")
                        members.setdefault(key, {})["." + suffix.lower()] = member
            for key in sorted(members):
                parts = members[key]
                image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
                if image is not None and ".txt" in parts:
                    self.entries.append((shard, image, parts[".txt"]))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, image_info, caption_info = self.entries[int(index)]
        with tarfile.open(shard) as archive:
            caption = archive.extractfile(caption_info).read().decode("utf-8")
            data = archive.extractfile(image_info).read()
        pixels = decode_image(data, f"{shard}:{image_info.name}")
        return _example(pixels, caption, int(index), self.resolutions)
