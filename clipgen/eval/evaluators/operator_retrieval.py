"""`operator_retrieval`: a pOps operator on its test and held-out examples (the operator's
embedding shards): the cosine of each output to the true target embedding and retrieval
of the true target (by scene) among all targets of the split, against pOps' mean-of-inputs
baseline; with `cascade` (a workdir of decoder and upsampler runs) also the oracle's
whole-scene accuracy on the first `oracle_examples` outputs rendered, the baseline's and
the true targets' (the ceiling a perfect operator would reach). Rendering dominates: the
demo's cascade draws about one image a second on two cores."""

from __future__ import annotations

from typing import Any

import numpy as np

from clipgen.data import embeddings, operator_data
from clipgen.eval import oracle, registry
from clipgen.pipelines import operators as operator_pipeline
from clipgen.pipelines import unclip


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def scores(outputs, targets, scenes) -> dict[str, float]:
    """Mean cosine of outputs to their targets, and top-1 retrieval among the targets
    counted right when the retrieved target shows the true target's scene."""
    outputs, targets = _unit(outputs), _unit(targets)
    nearest = (outputs @ targets.T).argmax(axis=1)
    right = [scenes[j] == scenes[i] for i, j in enumerate(nearest)]
    return {
        "cosine": float(np.mean(np.sum(outputs * targets, -1))),
        "retrieval": float(np.mean(right)),
    }


class Evaluator(registry.StageEvaluator):
    READS_EMBEDDINGS = True
    DEFAULTS = {
        **registry.StageEvaluator.DEFAULTS,
        "splits": ("test", "heldout"),
        "num_examples": 200,
        "batch_size": 200,
        "seed": 0,
        "cascade": "",
        "oracle_examples": 64,
        "oracle_resolution": 64,
    }

    def __init__(self, name, config, **kwargs):
        super().__init__(name, config, **kwargs)
        stage = self.stage_config
        self.pipe = None
        if self.settings["cascade"]:
            self.pipe = unclip.load_pipeline(
                {"workdir": self.settings["cascade"], "preset": stage.data.clip_preset}
            )
        self.data = {}
        for split in self.settings["splits"]:
            shards = embeddings.EmbeddingShards(embeddings.embedding_dir(stage.data, split), split)
            arrays = shards.arrays()
            arrays = {k: v[: self.settings["num_examples"]] for k, v in arrays.items()}
            operator, seed = stage.data.operator, stage.data.seed
            arrays["scenes"] = [
                operator_data.example(operator, split, int(i), seed).target for i in arrays["ids"]
            ]
            self.data[split] = arrays

    def __call__(self, params: Any) -> dict[str, float]:
        options = self.settings
        operator = operator_pipeline.from_trained(self.stage_config, params)
        results = {}
        for split, arrays in self.data.items():
            batch = options["batch_size"]
            outputs, baselines = [], []
            for start in range(0, len(arrays["ids"]), batch):
                rows = slice(start, start + batch)
                inputs = [arrays["inputs"][rows, i] for i in range(operator.spec.inputs)]
                text = {}
                if operator.spec.text:
                    text = dict(
                        text_states=arrays["text_tokens"][rows], text_mask=arrays["text_mask"][rows]
                    )
                outputs.append(np.asarray(operator(inputs, options["seed"] + start, **text)))
                baselines.append(np.asarray(operator.mean_baseline(inputs)))
            outputs, baselines = np.concatenate(outputs), np.concatenate(baselines)
            scenes = arrays["scenes"]
            found = scores(outputs, arrays["target"], scenes)
            found |= {
                f"baseline_{k}": v for k, v in scores(baselines, arrays["target"], scenes).items()
            }
            if self.pipe is not None:
                rendered = slice(0, options["oracle_examples"])
                for what, embeds in (
                    ("", outputs),
                    ("baseline_", baselines),
                    ("true_", arrays["target"]),
                ):
                    found[f"{what}oracle_whole"] = self._oracle(embeds[rendered], scenes[rendered])
                # Undefined, so left out, when the decoder draws none of the true targets.
                if found["true_oracle_whole"] > 0:
                    found["oracle_ratio"] = found["oracle_whole"] / found["true_oracle_whole"]
            results.update({f"{split}/{key}": value for key, value in found.items()})
        return results

    def _oracle(self, embeds: np.ndarray, scenes) -> float:
        batch, images = self.settings["batch_size"], []
        for start in range(0, len(embeds), batch):
            rendered = operator_pipeline.render(
                self.pipe, embeds[start : start + batch], self.settings["seed"]
            )
            images.append(oracle.enlarged(rendered, self.settings["oracle_resolution"]))
        return oracle.mean_accuracy(oracle.read(np.concatenate(images), scenes))["whole"]
