"""The diffusion core against closed forms: Gaussian data, whose exact denoiser is known,
Gaussian KL and likelihood from torch and scipy, and guidance on a linear model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from clipgen.diffusion import gaussian, samplers

MU, SIGMA, DIM = 0.4, 0.5, 4


def exact_x0_model(full: gaussian.Diffusion):
    """E[x_0 | x_t] for x_0 ~ N(MU, SIGMA^2 I): the optimal x0-prediction model."""

    def model_fn(x_t, t):
        abar = jnp.asarray(full.alphas_cumprod)[t][:, None]
        gain = jnp.sqrt(abar) * SIGMA**2 / (abar * SIGMA**2 + 1.0 - abar)
        return MU + gain * (x_t - jnp.sqrt(abar) * MU)

    return model_fn


def exact_model(full: gaussian.Diffusion, prediction: str):
    """The optimal model for Gaussian data under the given parameterisation."""
    x0_model = exact_x0_model(full)

    def model_fn(x_t, t):
        abar = jnp.asarray(full.alphas_cumprod)[t][:, None]
        x0 = x0_model(x_t, t)
        eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
        return {"x0": x0, "eps": eps, "v": jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0}[
            prediction
        ]

    return model_fn


def ddim_map_moments(abars: np.ndarray) -> tuple[float, float]:
    """Mean and variance of deterministic DDIM's output for x_T ~ N(0, I) and Gaussian data.

    With the exact denoiser each DDIM step is an affine map of x, so the whole sampler is
    x_0 = A x_T + B; this composes the scalar maps in float64, step by step from the
    DDIM update written out by hand.
    """
    gain, offset = 1.0, 0.0
    for i in range(len(abars) - 1, -1, -1):
        a, a_prev = abars[i], (abars[i - 1] if i else 1.0)
        g = np.sqrt(a) * SIGMA**2 / (a * SIGMA**2 + 1 - a)  # x0_hat = g x + MU (1 - g sqrt(a))
        x0_gain, x0_offset = g, MU * (1 - g * np.sqrt(a))
        eps_gain = (1 - np.sqrt(a) * x0_gain) / np.sqrt(1 - a)
        eps_offset = -np.sqrt(a) * x0_offset / np.sqrt(1 - a)
        step_gain = np.sqrt(a_prev) * x0_gain + np.sqrt(1 - a_prev) * eps_gain
        step_offset = np.sqrt(a_prev) * x0_offset + np.sqrt(1 - a_prev) * eps_offset
        gain, offset = step_gain * gain, step_gain * offset + step_offset
    return offset, gain**2


def _sample_moments(d, model_fn, method, count=4096):
    x_T = jax.random.normal(jax.random.key(0), (count, DIM))
    run = jax.jit(functools.partial(samplers.sample, d, model_fn, method=method))
    x_0 = np.asarray(run(x_T, jax.random.key(1)), dtype=np.float64).ravel()
    return x_0.mean(), x_0.var(), x_0.size


def _assert_within_sampling_error(mean, var, count, true_mean, true_var):
    """Within 4 standard errors of the mean and of the variance estimate."""
    assert abs(mean - true_mean) < 4 * np.sqrt(true_var / count), (mean, true_mean)
    assert abs(var - true_var) < 4 * true_var * np.sqrt(2 / count), (var, true_var)


@pytest.mark.parametrize(
    "method,prediction", [("ddpm", "x0"), ("ddpm", "eps"), ("ddim", "x0"), ("ddim", "v")]
)
def test_1000_step_samples_of_gaussian_data_have_its_moments(method, prediction):
    d = gaussian.make_diffusion("cosine", 1000, prediction=prediction)
    model_fn = exact_model(d, prediction)
    _assert_within_sampling_error(*_sample_moments(d, model_fn, method), MU, SIGMA**2)


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_50_step_ddim_samples_have_the_moments_of_the_ddim_map(prediction):
    full = gaussian.make_diffusion("cosine", 1000, prediction=prediction)
    d = full.respaced("ddim50")
    mean, var, count = _sample_moments(d, exact_model(full, prediction), "ddim")
    true_mean, true_var = ddim_map_moments(np.asarray(d.alphas_cumprod, np.float64))
    _assert_within_sampling_error(mean, var, count, true_mean, true_var)
    # DDIM is first order: at 50 steps it shrinks this Gaussian's variance by about 6%.
    assert abs(true_mean - MU) < 0.01 and 0.9 < true_var / SIGMA**2 < 1.0


def test_ddpm_50_step_samples_of_gaussian_data_have_its_moments():
    # Ancestral sampling over "50" evenly spaced steps (both ends kept) stays unbiased.
    full = gaussian.make_diffusion("cosine", 1000, prediction="x0", variance="fixed_large")
    d = full.respaced("50")
    mean, var, count = _sample_moments(d, exact_model(full, "x0"), "ddpm")
    assert abs(mean - MU) < 4 * SIGMA / np.sqrt(count)
    assert abs(var / SIGMA**2 - 1) < 0.05


def test_ddim_inversion_then_sampling_returns_x0():
    full = gaussian.make_diffusion("cosine", 1000)
    d = full.respaced("ddim50")
    model_fn = exact_model(full, "eps")
    x_0 = MU + SIGMA * jax.random.normal(jax.random.key(2), (64, DIM))
    decode = jax.jit(functools.partial(samplers.sample, d, model_fn, method="ddim"))
    errors = {}
    for iterations in (0, 2):
        invert = functools.partial(
            samplers.ddim_invert, d, model_fn, fixed_point_iterations=iterations
        )
        x_T = jax.jit(invert)(x_0)
        assert abs(float(jnp.std(x_T)) - 1.0) < 0.1  # inverted latents look like N(0, I)
        errors[iterations] = float(jnp.abs(decode(x_T, jax.random.key(3)) - x_0).max())
    assert errors[2] < 1e-3, errors
    # Plain DDIM inversion is only first-order exact; the fixed point is what closes it.
    assert errors[0] > 10 * errors[2], errors


def test_vlb_term_equals_closed_form_gaussian_kl():
    d = gaussian.make_diffusion("cosine", 1000, variance="learned_range")
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (3, 4, 4, 2)).astype(np.float32)
    x_t = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    output = np.concatenate(
        [rng.standard_normal((3, 4, 4, 2)), np.tanh(rng.standard_normal((3, 4, 4, 2)))], -1
    ).astype(np.float32)
    t = np.array([1, 300, 999])
    ours = np.asarray(d.vlb_term(output, x0, x_t, t))

    p = d.p_mean_variance(output, x_t, t)
    true_mean, true_var, _ = d.q_posterior(x0, x_t, t)
    q_dist = torch.distributions.Normal(
        torch.tensor(np.asarray(true_mean), dtype=torch.float64),
        torch.tensor(np.sqrt(np.broadcast_to(np.asarray(true_var), x0.shape)), dtype=torch.float64),
    )
    p_dist = torch.distributions.Normal(
        torch.tensor(np.asarray(p.mean), dtype=torch.float64),
        torch.tensor(np.sqrt(np.asarray(p.variance)), dtype=torch.float64),
    )
    kl = torch.distributions.kl_divergence(q_dist, p_dist).numpy()
    expected = kl.reshape(3, -1).mean(1) / np.log(2)
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_vlb_at_t0_is_the_discretised_gaussian_nll():
    d = gaussian.make_diffusion("cosine", 1000, variance="learned_range")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 4, 4, 3))
    pixels[0, 0, 0] = [0, 255, 128]  # the two edge bins
    x0 = (pixels / 127.5 - 1).astype(np.float32)
    x_t = (x0 + 0.01 * rng.standard_normal(x0.shape)).astype(np.float32)
    output = np.concatenate(
        [rng.standard_normal(x0.shape) * 0.1, np.tanh(rng.standard_normal(x0.shape))], -1
    ).astype(np.float32)
    t = np.zeros(2, dtype=np.int32)
    ours = np.asarray(d.vlb_term(output, x0, x_t, t))

    p = d.p_mean_variance(output, x_t, t)
    mean = np.asarray(p.mean, dtype=np.float64)
    std = np.sqrt(np.asarray(p.variance, dtype=np.float64))
    x = x0.astype(np.float64)
    upper = np.where(pixels == 255, np.inf, x + 1 / 255)
    lower = np.where(pixels == 0, -np.inf, x - 1 / 255)
    probability = stats.norm.cdf(upper, mean, std) - stats.norm.cdf(lower, mean, std)
    expected = -np.log(probability).reshape(2, -1).mean(1) / np.log(2)
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_hybrid_loss_trains_the_variance_only_through_the_vlb():
    d = gaussian.make_diffusion("cosine", 1000, variance="learned_range")
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32)
    t = jnp.array([10, 500])
    output = jnp.asarray(rng.standard_normal((2, 4, 4, 6)) * 0.3, jnp.float32)

    def term(name, out):
        return d.training_losses(lambda x_t, _: out, x0, t, noise)[name].sum()

    mse_grad = jax.grad(functools.partial(term, "mse"))(output)
    vb_grad = jax.grad(functools.partial(term, "vb"))(output)
    assert np.all(np.asarray(mse_grad[..., 3:]) == 0)
    assert np.all(np.asarray(vb_grad[..., :3]) == 0), "VLB must not train the mean"
    assert np.any(np.asarray(vb_grad[..., 3:]) != 0)
    losses = d.training_losses(lambda x_t, _: output, x0, t, noise)
    np.testing.assert_allclose(
        losses["loss"], losses["mse"] + 1e-3 * 1000 * losses["vb"], rtol=1e-6
    )


def test_mse_target_follows_the_parameterisation():
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)
    t = jnp.array([100, 700])
    for prediction in ("eps", "x0", "v"):
        d = gaussian.make_diffusion("linear", 1000, prediction=prediction)
        x_t = d.q_sample(x0, t, noise)
        # An exact prediction has zero loss, and recovers x0 through p_mean_variance.
        exact = {"eps": noise, "x0": x0, "v": d.v_from(x0, noise, t)}[prediction]
        losses = d.training_losses(lambda *_, out=exact: out, x0, t, noise)
        assert float(losses["loss"].max()) < 1e-10
        np.testing.assert_allclose(d.p_mean_variance(exact, x_t, t).pred_x0, x0, atol=1e-4)


def test_classifier_free_guidance_combines_dropped_conditions():
    def model_fn(x, t, cond):
        return x * 0 + cond["a"][:, None] + 10 * cond["b"][:, None]

    cond = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([1.0, 1.0])}
    no_a = {"a": jnp.zeros(2), "b": cond["b"]}
    neither = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    x = jnp.zeros((2, 3))
    t = jnp.zeros(2, jnp.int32)

    single = samplers.classifier_free_guidance(model_fn, cond, [(neither, 3.0)])
    full = np.asarray(model_fn(x, t, cond))
    uncond = np.asarray(model_fn(x, t, neither))
    np.testing.assert_allclose(single(x, t), uncond + 3.0 * (full - uncond))

    two = samplers.classifier_free_guidance(model_fn, cond, [(no_a, 2.0), (neither, 1.5)])
    expected = full + 1.0 * (full - np.asarray(model_fn(x, t, no_a))) + 0.5 * (full - uncond)
    np.testing.assert_allclose(two(x, t), expected)

    partial = samplers.classifier_free_guidance(model_fn, cond, [(neither, 3.0)], guided_channels=2)
    out = np.asarray(partial(x, t))
    np.testing.assert_allclose(out[:, :2], (uncond + 3.0 * (full - uncond))[:, :2])
    np.testing.assert_allclose(out[:, 2:], full[:, 2:])


def test_fixed_and_dynamic_thresholding():
    x0 = jnp.array([[0.5, -0.2, 3.0, -4.0], [0.1, 0.2, -0.3, 0.4]])
    np.testing.assert_allclose(gaussian.threshold_x0(x0, clip=1.0), np.clip(x0, -1, 1))
    out = np.asarray(gaussian.threshold_x0(x0, dynamic_threshold=1.0))
    # Quantile 1.0 is the max |x0|: row 0 is divided by 4, row 1 (max < 1) is untouched.
    np.testing.assert_allclose(out[0], np.asarray(x0[0]) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(out[1], np.asarray(x0[1]))


def test_sharded_sampling_equals_single_device(mesh8):
    full = gaussian.make_diffusion("cosine", 1000, prediction="x0")
    d = full.respaced("ddim20")
    model_fn = exact_x0_model(full)
    x_T = jax.random.normal(jax.random.key(4), (16, DIM))
    run = jax.jit(functools.partial(samplers.sample, d, model_fn, method="ddim", eta=1.0))
    single = np.asarray(run(x_T, jax.random.key(5)))
    batch_sharding = jax.sharding.NamedSharding(mesh8, jax.P("data"))
    sharded = run(jax.device_put(x_T, batch_sharding), jax.random.key(5))
    assert sharded.sharding.is_equivalent_to(batch_sharding, 2)
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-6)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        gaussian.make_diffusion("quadratic")
    with pytest.raises(ValueError, match="unknown prediction"):
        gaussian.make_diffusion(prediction="score")
    with pytest.raises(ValueError, match="cannot take exactly 999 strided steps"):
        gaussian.make_diffusion(respacing="ddim999")
    d = gaussian.make_diffusion(variance="learned_range")
    with pytest.raises(ValueError, match="must output 6 channels"):
        d.p_mean_variance(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), jnp.zeros(1, int))
