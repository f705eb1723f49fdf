"""`prior_retrieval`: a diffusion or autoregressive prior's image embeddings for the
captions of shapes splits, scored by clipgen.eval.prior.prior_metrics (cosines to the
true image and text embeddings; retrieval judged by the shapes oracle, against the
text-embedding baseline). Reads the splits' embedding shards."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from clipgen import build, sampling
from clipgen.data import embeddings, pipeline, shapes
from clipgen.eval import registry
from clipgen.eval.prior import prior_metrics
from clipgen.models.ar_prior import sample_ar_prior

CONDITION_FIELDS = ("text_embed", "text_tokens", "text_mask")


@functools.cache
def _scenes(split: str, ids: tuple[int, ...], seed: int, resolution: int):
    """(what each caption says, what the oracle reads in each image) for examples `ids`."""
    source = pipeline.ProceduralShapes((resolution,), split, seed)
    examples = [source[i] for i in ids]
    captions = [shapes.parse(pipeline.decode_text(e["caption"])) for e in examples]
    seen = [shapes.oracle(e[f"image_{resolution}"]) for e in examples]
    return captions, seen


class Evaluator(registry.StageEvaluator):
    READS_EMBEDDINGS = True
    DEFAULTS = {
        **registry.StageEvaluator.DEFAULTS,
        "splits": ("test", "heldout"),
        "num_examples": 500,
        "batch_size": 250,
        "seed": 0,
        "oracle_resolution": 64,
    }

    def __init__(self, name, config, **kwargs):
        super().__init__(name, config, **kwargs)
        stage = self.stage_config
        module = build.module(stage)
        if stage.stage == "ar_prior":
            sampler = jax.jit(
                functools.partial(
                    sample_ar_prior,
                    module,
                    top_p=stage.sample.top_p,
                    dot_range=tuple(stage.sample.dot_range),
                )
            )
        else:
            sampler = sampling.prior_sampler(stage, module)
        self._sample = lambda params, cond, rng: sampler(params=params, cond=cond, rng=rng)
        self.data = {
            split: embeddings.load_split(
                embeddings.embedding_dir(stage.data, split), stage.data.normalize, split
            )
            for split in self.settings["splits"]
        }

    def __call__(self, params: Any) -> dict[str, float]:
        options = self.settings
        results = {}
        for split in options["splits"]:
            arrays = {k: v[: options["num_examples"]] for k, v in self.data[split].items()}
            caption_scenes, gallery_scenes = _scenes(
                split,
                tuple(int(i) for i in arrays["ids"]),
                self.stage_config.data.seed,
                options["oracle_resolution"],
            )
            rng = jax.random.key(options["seed"])
            batch = options["batch_size"]
            sampled = []
            for start in range(0, len(arrays["ids"]), batch):
                cond = {k: arrays[k][start : start + batch] for k in CONDITION_FIELDS}
                draws = self._sample(params, cond, jax.random.fold_in(rng, start))
                sampled.append(np.asarray(draws))
            metrics = prior_metrics(
                np.concatenate(sampled),
                arrays["text_embed"],
                arrays["image_embeds"],
                caption_scenes,
                gallery_scenes,
            )
            results.update({f"{split}/{name}": value for name, value in metrics.items()})
        return results
