"""Explicit noise in the samplers: the per-step noise a caller gives (rows or a function of
the step) against the noise drawn from the key by default, and the last-step model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipgen.diffusion import gaussian, samplers

STEPS = 6
D = gaussian.make_diffusion("cosine", 1000, respacing=str(STEPS))


def model_fn(x_t, t):
    """A smooth stand-in denoiser whose output depends on x_t and the timestep."""
    return 0.5 * jnp.tanh(x_t) + 1e-3 * t[:, None].astype(jnp.float32)


def _default_rows(rng, shape):
    """The noise `sample` draws by default: step k (index t = S - 1 - k) from fold_in(rng, t)."""
    keys = [jax.random.fold_in(rng, STEPS - 1 - k) for k in range(STEPS - 1)]
    return jnp.stack([jax.random.normal(key, shape) for key in keys])


@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.8)])
def test_given_noise_reproduces_the_default_draws(method, eta):
    rng = jax.random.key(3)
    x_T = jax.random.normal(jax.random.key(4), (3, 5))
    run = jax.jit(
        lambda x, noise: samplers.sample(
            D, model_fn, x, rng, method=method, eta=eta, clip=1.0, noise=noise
        )
    )
    default = run(x_T, None)
    rows = _default_rows(rng, x_T.shape)
    # equal up to float32 rounding: XLA fuses the two programs differently
    np.testing.assert_allclose(run(x_T, rows), default, atol=1e-6, rtol=0)
    as_function = samplers.sample(
        D, model_fn, x_T, None, method=method, eta=eta, clip=1.0, noise=lambda k: rows[k]
    )
    np.testing.assert_allclose(as_function, default, atol=1e-6, rtol=0)
    other = run(x_T, 0.5 * rows)
    assert np.abs(np.asarray(other) - np.asarray(default)).max() > 1e-3


def test_deterministic_ddim_ignores_the_noise():
    x_T = jax.random.normal(jax.random.key(0), (2, 4))
    rows = jnp.ones((STEPS - 1, 2, 4))
    plain = samplers.sample(D, model_fn, x_T, jax.random.key(1), method="ddim", clip=1.0)
    given = samplers.sample(D, model_fn, x_T, None, method="ddim", clip=1.0, noise=rows)
    np.testing.assert_array_equal(given, plain)


def test_the_last_step_model_runs_the_last_step_only():
    x_T = jax.random.normal(jax.random.key(0), (2, 4))
    rng = jax.random.key(1)
    last = lambda x_t, t: -model_fn(x_t, t)  # noqa: E731
    switched = samplers.sample(D, model_fn, x_T, rng, clip=1.0, final_model_fn=last)

    def by_step(x_t, t):  # the same switch by hand: the last step is the model's timestep 0
        return jnp.where((t == 0)[:, None], last(x_t, t), model_fn(x_t, t))

    by_hand = samplers.sample(D, by_step, x_T, rng, clip=1.0)
    np.testing.assert_allclose(switched, by_hand, atol=1e-6)
    plain = samplers.sample(D, model_fn, x_T, rng, clip=1.0)
    assert np.abs(np.asarray(switched) - np.asarray(plain)).max() > 1e-3


def test_misshapen_noise_is_refused_naming_the_shape():
    x_T = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"\(5, 2, 4\)"):
        samplers.sample(D, model_fn, x_T, None, noise=jnp.zeros((STEPS, 2, 4)))
    with pytest.raises(ValueError, match="rng"):
        samplers.sample(D, model_fn, x_T, None)
    one_step = gaussian.make_diffusion("cosine", 1000, respacing="1")
    out = samplers.sample(one_step, model_fn, x_T, None, noise=jnp.zeros((0, 2, 4)))
    assert out.shape == (2, 4)
