"""`shapes_oracle`: the shapes-world oracle's whole-caption and per-attribute accuracy on
generated images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from clipgen.data import shapes
from clipgen.eval import batching, oracle, registry
from clipgen.eval.captions import ShapesCaptions

_ORACLE_KEYS = ("whole", *shapes.ATTRIBUTES, "background", "count")


class Evaluator(registry.Evaluator):
    """The oracle's accuracy on generated shapes-world images: for each split, whole-caption
    and per-attribute accuracy of `oracle(image)` against `parse(caption)`, over all
    captions and over the single-object ones (metric keys `<split>/<all|single>/<what>`)."""

    DEFAULTS = {
        "splits": ("test", "heldout"),
        "count": 200,
        "data_seed": 0,
        "seed": 0,
        "batch_size": 32,
    }

    def __init__(self, name: str, config: Mapping[str, Any], **kwargs: Any):
        super().__init__(name, config, **kwargs)
        options = self.settings
        self.sources = {
            split: ShapesCaptions(split, int(options["count"]), int(options["data_seed"]))
            for split in options["splits"]
        }
        self.caption_sources = list(self.sources.values())

    def __call__(self, generate: registry.Generator) -> dict[str, float]:
        metrics: dict[str, float] = {}
        self.extras = {"counts": {}, "captions": {}}
        for split, source in self.sources.items():
            for subset, tally in self._tally(generate, split, source).items():
                tally = batching.sum_over_processes(tally)
                self.extras["counts"][f"{split}/{subset}"] = int(tally[0])
                if tally[0]:
                    for key, matches in zip(_ORACLE_KEYS, tally[1:], strict=True):
                        metrics[f"{split}/{subset}/{key}"] = float(matches / tally[0])
            self.extras["captions"][split] = source.describe()
        return metrics

    def _tally(
        self, generate: registry.Generator, split: str, source: ShapesCaptions
    ) -> dict[str, np.ndarray]:
        """{"all" | "single": [captions, matches of each of _ORACLE_KEYS]} over this
        process's rows."""
        options = self.settings
        targets = [shapes.parse(caption) for caption in source.captions]
        tallies = {subset: np.zeros(1 + len(_ORACLE_KEYS)) for subset in ("all", "single")}
        generate_rows = batching.generated_rows(
            generate, source.captions, options["seed"], self.name
        )
        batches = batching.process_batches(len(source), int(options["batch_size"]))
        show = jax.process_index() == 0
        for number, rows, real in tqdm(
            batches, desc=f"{self.name}: {split}", unit="batch", disable=not show
        ):
            scenes = [targets[int(row)] for row in rows[real]]
            images = generate_rows(number, rows)[real]
            for scene, correct in zip(scenes, oracle.read(images, scenes), strict=True):
                counts = np.array([1.0] + [float(correct[key]) for key in _ORACLE_KEYS])
                tallies["all"] += counts
                if len(scene.objects) == 1:
                    tallies["single"] += counts
        return tallies
