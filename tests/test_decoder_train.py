"""The decoder and upsampler stages: sharded steps, long finite runs in bf16 and float32,
crops that stay aligned, PSNR, and a tiny run of each with its evaluation."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from clipgen import build
from clipgen import config as config_lib
from clipgen.data import degrade
from clipgen.eval import registry
from clipgen.eval.evaluators import upsampler_psnr
from clipgen.models import upsampler as upsampler_module
from clipgen.sampling import sample_upsampler
from clipgen.train import decoder as decoder_stage
from clipgen.train import loop
from clipgen.train import upsampler as upsampler_stage

from sharded import assert_sharded_equals_one_device


@pytest.mark.parametrize(
    ("stage_name", "preset", "module"),
    [("decoder", "tiny", decoder_stage), ("upsampler", "tiny", upsampler_stage)],
)
def test_sharded_loss_and_gradient_equal_one_device(stage_name, preset, module, mesh8):
    stage = module.make_stage(config_lib.load_preset(stage_name, preset))
    assert_sharded_equals_one_device(
        stage, mesh8, 8, loss_rtol=1e-5, grad_rtol=2e-4, grad_atol=2e-6
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_learned_variance_decoder_stays_finite_for_200_steps(dtype, tmp_path):
    config = config_lib.load_preset("decoder", "tiny")
    config.model.dtype = dtype
    config.total_steps = 200
    config.log_every = 50
    config.checkpoint.every = 200
    config.optim.lr = 1e-3
    config.on_nonfinite = "stop"  # the guard raises NonFiniteError at the first bad step
    stage = decoder_stage.make_stage(config)
    state = loop.train(config, tmp_path, stage, jax.devices()[:1])
    assert int(state.step) == 200
    assert int(state.nonfinite_steps) == 0 and int(state.first_nonfinite_step) == -1
    batch = next(stage.batches(200, 8))
    loss, metrics = jax.jit(stage.loss)(state.params, batch, jax.random.key(0))
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["vb"]))


def test_upsampler_crops_stay_aligned_with_their_low_resolution():
    rng = np.random.default_rng(0)
    high = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    low = degrade.low_resolution(high, 16)
    high_crops, low_crops = upsampler_stage.crop_pairs(high, low, 8, 2, rng)
    assert high_crops.shape == (5, 8, 8, 3) and low_crops.shape == (5, 4, 4, 3)
    # Area downsampling commutes with aligned cropping.
    np.testing.assert_array_equal(degrade.low_resolution(high_crops, 4), low_crops)


def test_psnr_closed_form():
    truth = np.zeros((2, 4, 4, 3), np.uint8)
    images = truth.copy()
    images[0] += 1  # mse 1 -> 10 log10(255^2) = 48.13 dB
    images[1] += 16  # mse 256
    expected = (10 * np.log10(255.0**2) + 10 * np.log10(255.0**2 / 256)) / 2
    assert upsampler_psnr.psnr(images, truth) == pytest.approx(expected)


@pytest.mark.parametrize("preset", ["tiny", "second_tiny"])
def test_tiny_upsamplers_train_and_report_psnr(preset, tmp_path):
    config = config_lib.load_preset("upsampler", preset)
    stage = upsampler_stage.make_stage(config)
    state = loop.train(config, tmp_path, stage, jax.devices()[:1])
    [evaluate] = registry.training_evaluators(config).values()
    scores = evaluate(state)
    assert int(state.step) == config.total_steps
    assert set(scores) == {"test/psnr", "test/bicubic_psnr"}
    assert all(np.isfinite(v) for v in scores.values())


def test_residual_upsampler_starts_from_the_bicubic_resize():
    """With its zero-initialised output convolution an untrained x0-predicting residual
    upsampler predicts a zero residual at every step, so DDIM returns the bicubic resize;
    training pairs carry the residual."""
    config = config_lib.load_preset("upsampler", "tiny")
    config.model.update(resize="bicubic", residual=True)
    config.diffusion.prediction = "x0"
    module = build.module(config)
    params = nn.meta.unbox(
        upsampler_module.init_upsampler(module, jax.random.key(0), 16, 8)["params"]
    )
    low = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    resized = upsampler_module.resize_low_res(low, 16, 16, "bicubic")
    diffusion = build.diffusion(config, "ddim5")
    sampled = sample_upsampler(module, params, diffusion, low, jax.random.key(2), 16)
    np.testing.assert_allclose(sampled, np.clip(resized, -1, 1), atol=1e-6)
    high = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    target = upsampler_module.to_target(module.config, high, low)
    np.testing.assert_allclose(target, high - resized, atol=1e-6)
    np.testing.assert_allclose(
        upsampler_module.from_target(module.config, target, low), high, atol=1e-6
    )
