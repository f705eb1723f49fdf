"""`decoder_oracle`: a decoder's images for the true CLIP image embeddings (and captions)
of shapes scenes, read by the oracle: per-attribute accuracy and colour-and-shape. Reads
the splits' embedding shards; images smaller than `oracle_resolution` are enlarged
bicubically first (the oracle needs 32 px or more)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from clipgen import build, sampling
from clipgen.data import embeddings, pipeline, shapes
from clipgen.eval import oracle, registry


class Evaluator(registry.StageEvaluator):
    READS_EMBEDDINGS = True
    DEFAULTS = {
        **registry.StageEvaluator.DEFAULTS,
        "splits": ("test", "heldout"),
        "num_examples": 200,
        "batch_size": 200,
        "seed": 0,
        "oracle_resolution": 64,
    }

    def __init__(self, name, config, **kwargs):
        super().__init__(name, config, **kwargs)
        stage = self.stage_config
        self._draw = sampling.image_sampler(stage, build.module(stage))

    def __call__(self, params: Any) -> dict[str, float]:
        options, data = self.settings, self.stage_config.data
        results = {}
        for split in options["splits"]:
            arrays = embeddings.load_split(embeddings.embedding_dir(data, split), True, split)
            arrays = {k: v[: options["num_examples"]] for k, v in arrays.items()}
            source = pipeline.ProceduralShapes((), split, data.seed)
            scenes = [shapes.scene_from_json(source[int(i)]["scene"]) for i in arrays["ids"]]
            cond = sampling.decoder_condition(arrays)
            batch, rng = options["batch_size"], jax.random.key(options["seed"])
            images = np.concatenate(
                [
                    self._draw(
                        params,
                        {k: v[start : start + batch] for k, v in cond.items()},
                        jax.random.fold_in(rng, start),
                    )
                    for start in range(0, len(scenes), batch)
                ]
            )
            read = oracle.read(oracle.enlarged(images, options["oracle_resolution"]), scenes)
            scores = oracle.mean_accuracy(read)
            scores["colour_and_shape"] = float(np.mean([r["colour"] and r["shape"] for r in read]))
            results.update({f"{split}/{key}": value for key, value in scores.items()})
        return results
