"""`clip_retrieval`: a CLIP stage's zero-shot caption<->image retrieval (top-1) on shapes
splits, a retrieval counted right when the retrieved item shows the same scene."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from clipgen import build
from clipgen.data import pipeline, shapes
from clipgen.eval import registry
from clipgen.eval.retrieval import retrieval_accuracy
from clipgen.models.clip import CLIP


class Evaluator(registry.StageEvaluator):
    DEFAULTS = {
        **registry.StageEvaluator.DEFAULTS,
        "splits": ("test", "heldout"),
        "num_examples": 500,
        "batch_size": 250,
    }

    def __init__(self, name, config, **kwargs):
        super().__init__(name, config, **kwargs)
        stage = self.stage_config
        self.tokenizer = build.tokenizer(stage)
        module = build.clip_module(stage, self.tokenizer)
        self.resolution = stage.model.vision.image_size
        self.data_resolution, self.seed = stage.data.resolution, stage.data.seed
        self._encode = jax.jit(
            lambda params, batch: (
                module.apply({"params": params}, batch["pixels"], method=CLIP.encode_image),
                module.apply(
                    {"params": params},
                    batch["input_ids"],
                    batch["attention_mask"],
                    method=CLIP.encode_text,
                ),
            )
        )

    def __call__(self, params: Any) -> dict[str, float]:
        options = self.settings
        key = f"image_{self.data_resolution}"
        results = {}
        for split in options["splits"]:
            source = pipeline.ProceduralShapes((self.data_resolution,), split, self.seed)
            examples = [source[i] for i in range(options["num_examples"])]
            images, texts = [], []
            for start in range(0, len(examples), options["batch_size"]):
                chunk = examples[start : start + options["batch_size"]]
                inputs = build.clip_inputs(chunk, self.tokenizer, key, self.resolution)
                image_embeds, text_embeds = jax.device_get(self._encode(params, inputs))
                images.append(image_embeds)
                texts.append(text_embeds)
            scenes = [shapes.scene_from_json(e["scene"]) for e in examples]
            accuracy = retrieval_accuracy(np.concatenate(images), np.concatenate(texts), scenes)
            results.update({f"{split}/{name}": value for name, value in accuracy.items()})
        return results
