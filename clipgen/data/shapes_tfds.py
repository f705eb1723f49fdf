"""The shapes world as a tensorflow-datasets builder (array_record, no TensorFlow needed).

Example i of split s is drawn from `np.random.default_rng([seed, split_index, i])`, so a build
is deterministic and each example independent of the order in which examples are generated.
Read a built split with `builder.as_data_source(split)`; `caption` and `scene` come back as bytes.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from clipgen.data import shapes


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Which resolutions to draw, how many examples per split, and the seed."""

    resolutions: tuple[int, ...] = (32, 64)
    num_examples: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"train": 10_000, "test": 1_000, "heldout": 1_000}
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.resolutions or any(r < 16 for r in self.resolutions):
            raise ValueError(f"resolutions must be non-empty and >= 16, got {self.resolutions}")
        unknown = set(self.num_examples) - set(shapes.SPLITS)
        if unknown:
            raise ValueError(f"unknown splits {sorted(unknown)}; valid: {shapes.SPLITS}")


BUILDER_CONFIGS_BY_NAME = {
    "small": ShapesConfig(
        name="small",
        description="32 and 64 px, 10k train examples.",
        resolutions=(32, 64),
        num_examples={"train": 10_000, "test": 1_000, "heldout": 1_000},
    ),
    "cascade": ShapesConfig(
        name="cascade",
        description="16, 32, 64 and 256 px of each scene, for cascaded super-resolution.",
        resolutions=(16, 32, 64, 256),
        num_examples={"train": 20_000, "test": 1_000, "heldout": 1_000},
    ),
    "tiny": ShapesConfig(
        name="tiny",
        description="A handful of 32 and 64 px examples for tests.",
        resolutions=(32, 64),
        num_examples={"train": 8, "test": 4, "heldout": 4},
    ),
}


def image_feature_name(resolution: int) -> str:
    """Name of the image feature that holds the scene drawn at `resolution` pixels."""
    return f"image_{resolution}"


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_example(config: ShapesConfig, split: str, index: int) -> dict[str, Any]:
    """The example `index` of `split`, with images as PNG bytes (what the builder writes)."""
    rng = np.random.default_rng([config.seed, shapes.SPLITS.index(split), index])
    scene = shapes.sample_scene(rng, split)
    example: dict[str, Any] = {
        image_feature_name(r): _png_bytes(shapes.render(scene, r)) for r in config.resolutions
    }
    example["caption"] = shapes.caption(scene)
    example["scene"] = shapes.scene_to_json(scene)
    example["id"] = index
    return example


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Captioned shapes-world scenes at one or more resolutions, with train/test/heldout splits."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "Examples stored in id order, so that example i of a split is its i-th record.",
    }
    BUILDER_CONFIGS = list(BUILDER_CONFIGS_BY_NAME.values())
    DEFAULT_CONFIG_NAME = "small"

    def __init__(self, *, file_format: str = "array_record", **kwargs: Any) -> None:
        super().__init__(file_format=file_format, **kwargs)

    @property
    def shapes_config(self) -> ShapesConfig:
        """The builder's config, typed."""
        config = self.builder_config
        assert isinstance(config, ShapesConfig)
        return config

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.shapes_config
        features: dict[str, Any] = {
            image_feature_name(r): tfds.features.Image(shape=(r, r, 3), encoding_format="png")
            for r in config.resolutions
        }
        features["caption"] = tfds.features.Text()
        features["scene"] = tfds.features.Text()
        features["id"] = np.int64
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural scenes of coloured shapes with captions (clipgen).",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager
        return {
            split: self._generate_examples(split)
            for split, count in self.shapes_config.num_examples.items()
            if count > 0
        }

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for index in range(self.shapes_config.num_examples[split]):
            yield index, make_example(self.shapes_config, split, index)


def build(data_dir: str, config: str | ShapesConfig = "small") -> Shapes:
    """Builds (or reuses) the shapes dataset for `config` under `data_dir` and returns it."""
    builder = Shapes(data_dir=data_dir, config=config)
    builder.download_and_prepare()
    return builder
