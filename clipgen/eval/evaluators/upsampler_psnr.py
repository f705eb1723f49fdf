"""`upsampler_psnr`: PSNR of an upsampler's images from the clean downsampled test renders
against the true high-resolution renders, beside plain bicubic upsampling of the same
low-resolution inputs."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from clipgen import build, sampling
from clipgen.data import degrade, pipeline
from clipgen.data.preprocess import to_unit_range
from clipgen.eval import registry


def psnr(images: np.ndarray, truth: np.ndarray) -> float:
    """Mean PSNR in dB of uint8 images against uint8 references."""
    error = (np.asarray(images, np.float64) - np.asarray(truth, np.float64)) ** 2
    mse = np.maximum(error.reshape(len(error), -1).mean(1), 1e-10)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


class Evaluator(registry.StageEvaluator):
    DEFAULTS = {
        **registry.StageEvaluator.DEFAULTS,
        "num_examples": 64,
        "batch_size": 64,
        "seed": 0,
    }

    def __init__(self, name, config, **kwargs):
        super().__init__(name, config, **kwargs)
        self._draw = sampling.image_sampler(self.stage_config, build.module(self.stage_config))

    def __call__(self, params: Any) -> dict[str, float]:
        options, data = self.settings, self.stage_config.data
        size = data.resolution
        high = pipeline.renders("test", range(options["num_examples"]), size, data.seed)
        low = degrade.low_resolution(high, size // data.scale)
        batch, rng = options["batch_size"], jax.random.key(options["seed"])
        upsampled = []
        for start in range(0, len(low), batch):
            inputs = to_unit_range(low[start : start + batch])
            upsampled.append(self._draw(params, inputs, jax.random.fold_in(rng, start)))
        upsampled = np.concatenate(upsampled)
        return {
            "test/psnr": psnr(upsampled, high),
            "test/bicubic_psnr": psnr(degrade.bicubic(low, size), high),
        }
