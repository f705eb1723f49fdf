"""The diffusion core against diffusers' schedulers (an independent implementation)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UnCLIPScheduler

from clipgen.diffusion import gaussian, samplers, schedules

DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
DIFFUSERS_SCHEDULE = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


def _in_float64(scheduler):
    """The scheduler with its products recomputed in float64 from its own betas, so that a
    comparison checks the step's maths, not float32 cumprod rounding in diffusers."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_betas_equal_diffusers(schedule):
    reference = DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule]).betas.numpy()
    ours = schedules.make_betas(schedule, 1000)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-9)


def test_cosine_betas_follow_the_closed_form():
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    d = gaussian.make_diffusion("cosine", 1000)
    t = np.arange(1000)
    uncapped = np.asarray(d.betas) < 0.999
    np.testing.assert_allclose(
        np.asarray(d.alphas_cumprod)[uncapped][:900],
        (f((t + 1) / 1000) / f(0))[uncapped][:900],
        rtol=1e-5,
    )
    assert np.isclose(d.betas.max(), 0.999)


@pytest.mark.parametrize("steps", [10, 25, 50, 250])
def test_ddim_spacing_equals_diffusers_leading_timesteps(steps):
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    scheduler.set_timesteps(steps)
    kept = schedules.space_timesteps(1000, f"ddim{steps}")
    assert kept == sorted(scheduler.timesteps.tolist())


@pytest.mark.parametrize("steps", [7, 25, 64, 250])
def test_even_spacing_equals_unclip_timesteps(steps):
    scheduler = UnCLIPScheduler()
    scheduler.set_timesteps(steps)
    assert schedules.space_timesteps(1000, str(steps)) == sorted(scheduler.timesteps.tolist())


@pytest.mark.parametrize("steps", [2, 7, 21, 23, 25, 31, 50, 111, 1000])
def test_unclip_spacing_equals_unclip_timesteps(steps):
    scheduler = UnCLIPScheduler()
    scheduler.set_timesteps(steps)
    expected = sorted(scheduler.timesteps.tolist())
    assert schedules.space_timesteps(1000, f"unclip{steps}") == expected
    if steps in (21, 23):  # where improved-diffusion's even spacing rounds differently
        assert schedules.space_timesteps(1000, str(steps)) != expected


@pytest.mark.parametrize(
    "prediction, variance, steps",
    [("x0", "fixed_small", 25), ("eps", "learned_range", 25), ("eps", "fixed_small", 7)],
)
def test_float32_process_steps_as_the_unclip_scheduler(prediction, variance, steps):
    """Karlo's three schedulers, unmodified (float32): every step of the "unclipN" process
    with float32 arithmetic, the first (t = 999) and the last (t = 0, where float32 moves
    the posterior coefficient off 1 by ~1e-3) included, to float32 rounding (a few ulps)."""
    diffusers_variance = {"fixed_small": "fixed_small_log", "learned_range": "learned_range"}
    scheduler = UnCLIPScheduler(
        variance_type=diffusers_variance[variance],
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        clip_sample_range=5.0 if prediction == "x0" else 1.0,
    )
    scheduler.set_timesteps(steps)
    clip = scheduler.config.clip_sample_range
    d = gaussian.make_diffusion(
        "cosine",
        1000,
        prediction=prediction,
        variance=variance,
        respacing=f"unclip{steps}",
        arithmetic="float32",
    )
    assert d.respaced("unclip5").arithmetic == "float32"
    float64 = gaussian.make_diffusion(
        "cosine", 1000, prediction=prediction, variance=variance, respacing=f"unclip{steps}"
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    channels = 6 if variance == "learned_range" else 3
    output = (0.5 * rng.standard_normal((2, 4, 4, channels))).astype(np.float32)
    timesteps = scheduler.timesteps.tolist()
    worst64 = 0.0
    for k, timestep in enumerate(timesteps):
        index = steps - 1 - k
        assert int(d.timestep_map[index]) == timestep
        prev = timesteps[k + 1] if k + 1 < steps else None
        generator = torch.Generator().manual_seed(k)
        expected = scheduler.step(
            _nchw(output), timestep, _nchw(x), prev_timestep=prev, generator=generator
        ).prev_sample
        noise = _nhwc(torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(k)))
        t = jnp.full((2,), index)
        ours, _ = samplers.ddpm_step(d, jnp.asarray(output), jnp.asarray(x), t, noise, clip)
        np.testing.assert_allclose(np.asarray(ours), _nhwc(expected), atol=1e-6, rtol=0)
        theirs64, _ = samplers.ddpm_step(
            float64, jnp.asarray(output), jnp.asarray(x), t, noise, clip
        )
        worst64 = max(worst64, float(np.abs(np.asarray(theirs64) - _nhwc(expected)).max()))
    # the float64-derived coefficients miss the scheduler by far more (its last step)
    assert worst64 > 1e-4


def test_section_spacing_follows_improved_diffusion():
    # improved-diffusion's docstring example: 300 steps, sections of 10, 15, 20.
    kept = schedules.space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    assert kept[:10] == [round(i * 99 / 9) for i in range(10)]
    assert kept[10] == 100 and kept[24] == 199 and kept[25] == 200 and kept[-1] == 299


def test_respaced_process_keeps_q_marginals():
    full = gaussian.make_diffusion("cosine", 1000)
    spaced = full.respaced("ddim50")
    kept = np.asarray(spaced.timestep_map)
    np.testing.assert_allclose(
        spaced.alphas_cumprod, np.asarray(full.alphas_cumprod)[kept], rtol=1e-6
    )
    # diffusers' DDPM step recomputes beta over skipped steps the same way.
    scheduler = _in_float64(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    abar = scheduler.alphas_cumprod.numpy()
    expected = 1 - abar[kept] / np.append(1.0, abar[kept[:-1]])
    np.testing.assert_allclose(spaced.betas, expected, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("respacing", [None, "ddim50"])
def test_ddpm_step_equals_diffusers(prediction, variance, respacing):
    d = gaussian.make_diffusion(
        "cosine", 1000, prediction=prediction, variance=variance, respacing=respacing
    )
    scheduler = _in_float64(
        DDPMScheduler(
            beta_schedule="squaredcos_cap_v2",
            prediction_type=DIFFUSERS_PREDICTION[prediction],
            variance_type=variance,
            clip_sample=False,
        )
    )
    if respacing:
        scheduler.set_timesteps(50)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    channels = 6 if variance == "learned_range" else 3
    output = rng.standard_normal((2, 4, 4, channels)).astype(np.float32)
    if variance == "learned_range":
        output[..., 3:] = np.tanh(output[..., 3:])
    for index in (3, 20, 37):
        timestep = int(d.timestep_map[index])
        generator = torch.Generator().manual_seed(index)
        expected = scheduler.step(
            _nchw(output), timestep, _nchw(x), generator=generator
        ).prev_sample
        noise = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(index))
        t = jnp.full((2,), index)
        ours, _ = samplers.ddpm_step(d, jnp.asarray(output), jnp.asarray(x), t, _nhwc(noise))
        np.testing.assert_allclose(np.asarray(ours), _nhwc(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_equals_diffusers(prediction, eta):
    d = gaussian.make_diffusion("cosine", 1000, prediction=prediction, respacing="ddim50")
    scheduler = _in_float64(
        DDIMScheduler(
            beta_schedule="squaredcos_cap_v2",
            prediction_type=DIFFUSERS_PREDICTION[prediction],
            clip_sample=True,
        )
    )
    scheduler.set_timesteps(50)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    output = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    for index in (0, 5, 30, 49):
        expected = scheduler.step(
            _nchw(output),
            int(d.timestep_map[index]),
            _nchw(x),
            eta=eta,
            use_clipped_model_output=True,
            variance_noise=_nchw(noise) if eta else None,
        ).prev_sample
        t = jnp.full((2,), index)
        ours, _ = samplers.ddim_step(d, output, x, t, noise, eta=eta, clip=1.0)
        np.testing.assert_allclose(np.asarray(ours), _nhwc(expected), atol=1e-6, rtol=0)


def test_velocity_equals_diffusers():
    d = gaussian.make_diffusion("cosine", 1000)
    scheduler = _in_float64(DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((3, 4, 4, 3)).astype(np.float32)
    eps = rng.standard_normal((3, 4, 4, 3)).astype(np.float32)
    t = np.array([0, 500, 999])
    expected = scheduler.get_velocity(_nchw(x0), _nchw(eps), torch.from_numpy(t))
    np.testing.assert_allclose(
        np.asarray(d.v_from(x0, eps, t)), _nhwc(expected), atol=2e-6, rtol=1e-5
    )
    noised = scheduler.add_noise(_nchw(x0), _nchw(eps), torch.from_numpy(t))
    np.testing.assert_allclose(
        np.asarray(d.q_sample(x0, t, eps)), _nhwc(noised), atol=2e-6, rtol=1e-5
    )
