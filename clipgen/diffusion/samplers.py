"""Samplers over a `Diffusion`: ancestral DDPM, DDIM(eta), DDIM inversion, and guidance.

Every loop is one `lax.scan`; call the samplers inside your `jax.jit` with a `model_fn`
that closes over the (traced) parameters and conditioning. The loops are elementwise over
the batch, so a batch-sharded `x_T` gives batch-sharded work and output, and the noise,
drawn per step from `fold_in(rng, step)` with the partitionable threefry, is the same
however the batch is sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from clipgen.diffusion.gaussian import Diffusion, ModelFn, take_coefficient


def ddpm_step(
    diffusion: Diffusion,
    output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    clip: float | None = None,
    dynamic_threshold: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step x_t -> x_{t-1} from a model output; returns (x_{t-1}, x0 estimate)."""
    p = diffusion.p_mean_variance(output, x_t, t, clip, dynamic_threshold)
    nonzero = _per_example(t != 0, x_t)
    return p.mean + nonzero * jnp.exp(0.5 * p.log_variance) * noise, p.pred_x0


def ddim_step(
    diffusion: Diffusion,
    output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    eta: float = 0.0,
    clip: float | None = None,
    dynamic_threshold: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12); eta = 0 is deterministic."""
    p = diffusion.p_mean_variance(output, x_t, t, clip, dynamic_threshold)
    abar = take_coefficient(diffusion.alphas_cumprod, t, x_t)
    abar_prev = take_coefficient(diffusion.alphas_cumprod_prev, t, x_t)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - jnp.square(sigma), 0.0)) * p.pred_eps
    x_prev = jnp.sqrt(abar_prev) * p.pred_x0 + direction
    nonzero = _per_example(t != 0, x_t)
    return x_prev + nonzero * sigma * noise, p.pred_x0


# Explicit per-step noise: (S - 1, *x_T.shape) rows, row k for step k of S (k = 0 is the
# noisiest; the last step adds none), or noise(k) -> an array shaped like x_T.
StepNoise = jax.Array | Callable[[jax.Array], jax.Array]


def sample(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_T: jax.Array,
    rng: jax.Array | None,
    *,
    method: str = "ddpm",
    eta: float = 0.0,
    clip: float | None = None,
    dynamic_threshold: float | None = None,
    noise: StepNoise | None = None,
    final_model_fn: ModelFn | None = None,
    remat: bool = False,
    unroll: bool = False,
) -> jax.Array:
    """Run the reverse process from x_T down to x_0 with `method` "ddpm" or "ddim".

    `diffusion` may be respaced: the loop visits its S steps, telling the model the original
    timesteps. The noise each step adds (DDPM, DDIM with eta > 0) is by default drawn from
    `fold_in(rng, t)`, t the step's index in `diffusion`; `noise` gives it instead, as
    (S - 1, *x_T.shape) rows (row k for step k, k = 0 the noisiest; the last step adds
    none) or as a function of k returning an array shaped like x_T, so that a sample can be
    reproduced across implementations. `final_model_fn` replaces `model_fn` on the last
    step (Karlo's super-resolution runs a second network there). With `remat` each scanned
    step is a `jax.checkpoint`: differentiating through the whole chain keeps one step's
    activations at a time (recomputed on the way back) and the x_t between steps. With
    `unroll` the steps are unrolled: XLA:CPU differentiates a rolled scan of UNet steps an
    order of magnitude slower (benchmarks/edit.py speed).
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampling method {method!r}; expected 'ddpm' or 'ddim'")
    batch, steps = x_T.shape[0], diffusion.num_timesteps
    draw = _step_noise(noise, rng, steps, x_T)

    def step(x, k, fn):
        index = steps - 1 - k
        t = jnp.full((batch,), index, dtype=jnp.int32)
        output = fn(x, diffusion.model_timesteps(t))
        z = draw(k, index, x)
        if method == "ddpm":
            x, _ = ddpm_step(diffusion, output, x, t, z, clip, dynamic_threshold)
        else:
            x, _ = ddim_step(diffusion, output, x, t, z, eta, clip, dynamic_threshold)
        return x

    scanned = steps if final_model_fn is None else steps - 1
    ks = jnp.arange(scanned, dtype=jnp.int32)

    def body(x, k):
        return step(x, k, model_fn), None

    x, _ = jax.lax.scan(
        jax.checkpoint(body) if remat else body, x_T, ks, unroll=scanned if unroll else 1
    )
    if final_model_fn is not None:
        x = step(x, jnp.int32(steps - 1), final_model_fn)
    return x


def _step_noise(noise: StepNoise | None, rng: jax.Array | None, steps: int, x_T: jax.Array):
    """draw(k, t, x) -> the noise step k (index t) adds, as `sample` describes."""
    if noise is None:
        if rng is None:
            raise ValueError("sample needs `rng` or explicit `noise`")
        return lambda k, t, x: jax.random.normal(jax.random.fold_in(rng, t), x.shape, x.dtype)
    if callable(noise):
        return lambda k, t, x: jnp.asarray(noise(k), x.dtype).reshape(x.shape)
    noise = jnp.asarray(noise)
    if noise.shape != (steps - 1, *x_T.shape):
        raise ValueError(
            f"per-step noise of shape {noise.shape}; {steps} steps from x_T {x_T.shape} need "
            f"{(steps - 1, *x_T.shape)} (none for the last step)"
        )
    if steps == 1:
        return lambda k, t, x: jnp.zeros_like(x)
    return lambda k, t, x: noise[jnp.minimum(k, steps - 2)].astype(x.dtype)


def ddim_invert(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_0: jax.Array,
    *,
    clip: float | None = None,
    fixed_point_iterations: int = 0,
) -> jax.Array:
    """Deterministic DDIM inversion: an x_T that DDIM (eta = 0) decodes back to x_0.

    Each step runs the DDIM update up the chain with the noise estimated at the current,
    less noisy point (Song et al. 2021, sec. 4.3); that is exact only as the steps shrink.
    `fixed_point_iterations` > 0 then refines x_t by solving DDIM's own step x_t -> x_{t-1}
    backwards, x_t = sqrt(a/a') (x_{t-1} - (sqrt(1-a') - sqrt(a'(1-a)/a)) eps(x_t)),
    by fixed-point iteration (one model call each), so that decoding returns x_0 closely.
    """
    batch = x_0.shape[0]

    def pred_eps(x, index):
        t = jnp.full((batch,), index, dtype=jnp.int32)
        output = model_fn(x, diffusion.model_timesteps(t))
        return diffusion.p_mean_variance(output, x, t, clip).pred_eps

    def step(y, index):
        abar = take_coefficient(diffusion.alphas_cumprod, index, y)
        abar_prev = take_coefficient(diffusion.alphas_cumprod_prev, index, y)
        eps = pred_eps(y, jnp.maximum(index - 1, 0))
        x0 = (y - jnp.sqrt(1.0 - abar_prev) * eps) / jnp.sqrt(abar_prev)
        x = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps
        eps_gain = jnp.sqrt(1.0 - abar_prev) - jnp.sqrt(abar_prev * (1.0 - abar) / abar)
        for _ in range(fixed_point_iterations):
            x = jnp.sqrt(abar / abar_prev) * (y - eps_gain * pred_eps(x, index))
        return x, None

    indices = jnp.arange(diffusion.num_timesteps, dtype=jnp.int32)
    x_T, _ = jax.lax.scan(step, x_0, indices)
    return x_T


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    dropped: Sequence[tuple[Any, float]],
    guided_channels: int | None = None,
) -> ModelFn:
    """A model function that applies classifier-free guidance over sets of dropped conditions.

    `model_fn(x_t, t, cond)` takes a conditioning pytree whose leaves lead with the batch.
    `dropped` lists (conditioning with some conditions replaced by their null value, scale)
    pairs; the guided output is out(c) + sum_k (s_k - 1) (out(c) - out(c_k)), so a single
    fully dropped variant with scale s gives the usual out(u) + s (out(c) - out(u)) and
    s = 1 turns guidance off. All variants go through the model as one batch. Only the
    first `guided_channels` output channels are guided (the prediction of a learned-range
    model); the rest come from the conditional output.
    """
    conds = [cond] + [variant for variant, _ in dropped]
    scales = [scale for _, scale in dropped]
    copies = len(conds)

    def guided(x_t: jax.Array, t: jax.Array) -> jax.Array:
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves, 0), *conds)
        outputs = model_fn(
            jnp.concatenate([x_t] * copies, 0), jnp.concatenate([t] * copies, 0), stacked
        )
        outputs = jnp.split(outputs, copies, axis=0)
        full = outputs[0]
        channels = full.shape[-1] if guided_channels is None else guided_channels
        guided_part = full[..., :channels]
        for scale, variant in zip(scales, outputs[1:], strict=True):
            guided_part = guided_part + (scale - 1.0) * (
                full[..., :channels] - variant[..., :channels]
            )
        return jnp.concatenate([guided_part, full[..., channels:]], -1)

    return guided


def _per_example(mask: jax.Array, like: jax.Array) -> jax.Array:
    return mask.astype(like.dtype).reshape(mask.shape + (1,) * (like.ndim - 1))
