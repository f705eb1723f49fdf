"""The Gaussian diffusion process: forward noising, posterior, parameterisations, losses.

A model is only a function `model_fn(x_t, t) -> output` here, where `t` is the model's
timestep (the original process's step, also after respacing). Arrays are channels-last;
a learned-range model returns twice the data's channels on the last axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from clipgen.diffusion import schedules

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
ARITHMETIC = ("float64", "float32")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class MeanVariance(NamedTuple):
    """p(x_{t-1} | x_t) as the model defines it, with its x0 and eps estimates."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array
    pred_eps: jax.Array


@struct.dataclass
class Diffusion:
    """A Gaussian diffusion process: its coefficients (float32 numpy) and parameterisation.

    Indices `t` into the arrays run over this process's steps; `timestep_map[t]` is the
    step of the original process that the model is told. Build one with `make_diffusion`;
    `arithmetic` says how its coefficients were computed (see there).
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray
    timestep_map: np.ndarray
    schedule: str = struct.field(pytree_node=False, default="cosine")
    original_num_timesteps: int = struct.field(pytree_node=False, default=1000)
    prediction: str = struct.field(pytree_node=False, default="eps")
    variance: str = struct.field(pytree_node=False, default="fixed_small")
    arithmetic: str = struct.field(pytree_node=False, default="float64")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def respaced(self, spacing: str | int | Sequence[int]) -> Diffusion:
        """The same process visiting only the steps `spacing` keeps (see `space_timesteps`)."""
        return make_diffusion(
            self.schedule,
            self.original_num_timesteps,
            prediction=self.prediction,
            variance=self.variance,
            respacing=spacing,
            arithmetic=self.arithmetic,
        )

    # -- the forward process -------------------------------------------------------------

    def q_mean_variance(self, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean and variance of q(x_t | x_0)."""
        mean = take_coefficient(self.sqrt_alphas_cumprod, t, x0) * x0
        return mean, take_coefficient(1.0 - self.alphas_cumprod, t, x0)

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """Draw x_t ~ q(x_t | x_0) with the given standard-normal noise."""
        return (
            take_coefficient(self.sqrt_alphas_cumprod, t, x0) * x0
            + take_coefficient(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(
        self, x0: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            take_coefficient(self.posterior_mean_coef1, t, x_t) * x0
            + take_coefficient(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            take_coefficient(self.posterior_variance, t, x_t),
            take_coefficient(self.posterior_log_variance_clipped, t, x_t),
        )

    # -- conversions between parameterisations -------------------------------------------

    def x0_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        return (
            take_coefficient(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - take_coefficient(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def eps_from_x0(self, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
        return (
            take_coefficient(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0
        ) / take_coefficient(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def v_from(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        """The velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
        return (
            take_coefficient(self.sqrt_alphas_cumprod, t, x0) * eps
            - take_coefficient(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def x0_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
        return (
            take_coefficient(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - take_coefficient(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def x0_from_prediction(self, prediction: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """The x0 a prediction of this process's parameterisation stands for."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, prediction)
        if self.prediction == "x0":
            return prediction
        return self.x0_from_v(x_t, t, prediction)

    def target(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """What the model is trained to predict under this process's parameterisation."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.v_from(x0, noise, t)

    # -- the reverse process -------------------------------------------------------------

    def split_output(self, output: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(prediction, variance values) of a model output; variance values may be empty."""
        if self.variance == "learned_range":
            channels = x_t.shape[-1]
            if output.shape[-1] != 2 * channels:
                raise ValueError(
                    f"a learned-range model must output {2 * channels} channels (prediction "
                    f"and variance) for data with {channels}; got shape {output.shape}"
                )
            return output[..., :channels], output[..., channels:]
        if output.shape != x_t.shape:
            raise ValueError(
                f"model output shape {output.shape} differs from x_t shape {x_t.shape}"
            )
        return output, output[..., :0]

    def p_mean_variance(
        self,
        output: jax.Array,
        x_t: jax.Array,
        t: jax.Array,
        clip: float | None = None,
        dynamic_threshold: float | None = None,
    ) -> MeanVariance:
        """p(x_{t-1} | x_t) from a model output.

        `clip` clamps the x0 estimate to [-clip, clip]; `dynamic_threshold` (a quantile such
        as 0.995, Imagen's dynamic thresholding) rescales each sample's x0 by the larger of 1
        and that quantile of |x0|. The eps estimate is rederived from the clamped x0.
        """
        prediction, variance_values = self.split_output(output, x_t)
        if self.variance == "learned_range":
            min_log = take_coefficient(self.posterior_log_variance_clipped, t, x_t)
            max_log = take_coefficient(self.log_betas, t, x_t)
            frac = (variance_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = jnp.exp(log_variance)
        elif self.variance == "fixed_large":
            large = np.append(self.posterior_variance[1], self.betas[1:])
            variance = take_coefficient(large, t, x_t) * jnp.ones_like(x_t)
            log_variance = take_coefficient(np.log(large), t, x_t) * jnp.ones_like(x_t)
        else:
            variance = take_coefficient(self.posterior_variance, t, x_t) * jnp.ones_like(x_t)
            log_variance = take_coefficient(
                self.posterior_log_variance_clipped, t, x_t
            ) * jnp.ones_like(x_t)

        pred_x0 = threshold_x0(self.x0_from_prediction(prediction, x_t, t), clip, dynamic_threshold)
        pred_eps = self.eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return MeanVariance(mean, variance, log_variance, pred_x0, pred_eps)

    # -- losses --------------------------------------------------------------------------

    def vlb_term(self, output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array):
        """The variational bound's term at t, in bits per dimension, per example.

        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and the discretised Gaussian
        negative log-likelihood of x_0 (data in [-1, 1], 256 bins) at t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance))
        return jnp.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: jax.Array,
        t: jax.Array,
        noise: jax.Array,
        vlb_weight: float = 1e-3,
        with_x0: bool = False,
    ) -> dict[str, jax.Array]:
        """Per-example losses: the MSE on the prediction, and for a learned-range model the
        hybrid loss MSE + vlb_weight * T * L_t (improved-diffusion's L_hybrid, lambda = 1e-3),
        where L_t sees the mean only through a stop-gradient so it trains just the variance.
        With `with_x0`, also the model's x0 estimate ("pred_x0"), for losses on it.
        """
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, self.model_timesteps(t))
        prediction, variance_values = self.split_output(output, x_t)
        mse = _mean_flat(jnp.square(self.target(x0, noise, t) - prediction))
        losses = {"mse": mse}
        if with_x0:
            losses["pred_x0"] = self.x0_from_prediction(prediction, x_t, t)
        if self.variance == "learned_range":
            frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), variance_values], -1)
            vb = self.vlb_term(frozen, x0, x_t, t)
            losses["vb"] = vb
            losses["loss"] = mse + vlb_weight * self.num_timesteps * vb
        else:
            losses["loss"] = mse
        return losses

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """The original-process timesteps the model sees for indices `t`."""
        return jnp.asarray(self.timestep_map)[t]

    def sample_timesteps(self, rng: jax.Array, batch: int) -> jax.Array:
        """Uniform training timesteps (indices into this process)."""
        return jax.random.randint(rng, (batch,), 0, self.num_timesteps)


def make_diffusion(
    schedule: str = "cosine",
    num_timesteps: int = 1000,
    *,
    prediction: str = "eps",
    variance: str = "fixed_small",
    respacing: str | int | Sequence[int] | None = None,
    arithmetic: str = "float64",
) -> Diffusion:
    """A diffusion process over `num_timesteps` steps, optionally respaced.

    `respacing` ("N", "N1,N2,...", "ddimN" or "unclipN", or the kept steps themselves)
    keeps a subsequence of the steps with the betas recomputed so that q(x_t|x_0) is
    unchanged at every kept step.
    `arithmetic` "float64" derives every coefficient from float64 betas before casting
    (improved-diffusion's); "float32" computes them in float32 as diffusers' UnCLIPScheduler
    steps do, from float32 betas (which moves the last step's posterior coefficient off 1
    by ~1e-3, 1 - (1 - beta_0) cancelling in float32), so that a process read from an
    UnCLIPScheduler config draws what diffusers draws.
    """
    if arithmetic not in ARITHMETIC:
        raise ValueError(f"unknown arithmetic {arithmetic!r}; expected one of {ARITHMETIC}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
    betas = schedules.make_betas(schedule, num_timesteps)
    kept = list(range(num_timesteps))
    if respacing is not None:
        kept = schedules.space_timesteps(num_timesteps, respacing)
    if arithmetic == "float32":
        coefficients = _float32_coefficients(betas, kept)
    else:
        if respacing is not None:
            betas = schedules.respace_betas(betas, kept)
        coefficients = _float64_coefficients(betas)
    return Diffusion(
        **coefficients,
        timestep_map=np.asarray(kept, dtype=np.int32),
        schedule=schedule,
        original_num_timesteps=num_timesteps,
        prediction=prediction,
        variance=variance,
        arithmetic=arithmetic,
    )


def _float64_coefficients(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every coefficient from float64 betas (already respaced), cast to float32."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
    posterior_log_variance_clipped = np.log(
        np.append(posterior_variance[1], posterior_variance[1:])
        if len(betas) > 1
        else np.maximum(posterior_variance, 1e-20)
    )
    coefficients = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "alphas_cumprod_next": alphas_cumprod_next,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
        * np.sqrt(1.0 - betas)
        / (1.0 - alphas_cumprod),
        "log_betas": np.log(betas),
    }
    return {name: value.astype(np.float32) for name, value in coefficients.items()}


def _float32_coefficients(betas: np.ndarray, kept: list[int]) -> dict[str, np.ndarray]:
    """The coefficients of the steps `kept` as diffusers' UnCLIPScheduler computes them in
    its `step`: float32 throughout, alpha-bar the cumulative product of float32 1 - beta
    as torch forms it, each kept step t going to the previous kept step (the first to
    t - 1)."""
    f32 = np.float32
    betas = betas.astype(f32)
    # torch's CPU cumprod accumulates float32 in float64, rounding each product to float32
    alphas_cumprod = np.cumprod((f32(1) - betas).astype(np.float64)).astype(f32)
    one = f32(1)
    rows = []
    for i, t in enumerate(kept):
        prev = kept[i - 1] if i else t - 1
        a_t, a_prev = alphas_cumprod[t], alphas_cumprod[prev] if prev >= 0 else one
        if prev == t - 1:
            beta, alpha = betas[t], one - betas[t]
        else:
            beta = one - a_t / a_prev
            alpha = one - beta
        b_t, b_prev = one - a_t, one - a_prev
        rows.append(
            (
                beta,
                a_t,
                a_prev,
                b_t,
                alpha,
                b_prev / b_t * beta,
                np.sqrt(a_prev) * beta / b_t,
                np.sqrt(alpha) * b_prev / b_t,
            )
        )
    beta, a_t, a_prev, b_t, alpha, variance, coef1, coef2 = (
        np.asarray(column, f32) for column in zip(*rows, strict=True)
    )
    clipped = np.append(variance[1], variance[1:]) if len(kept) > 1 else variance
    sqrt_a = np.sqrt(a_t)
    return {
        "betas": beta,
        "alphas_cumprod": a_t,
        "alphas_cumprod_prev": a_prev,
        "alphas_cumprod_next": np.append(a_t[1:], f32(0)),
        "sqrt_alphas_cumprod": sqrt_a,
        "sqrt_one_minus_alphas_cumprod": np.sqrt(b_t),
        "sqrt_recip_alphas_cumprod": one / sqrt_a,
        "sqrt_recipm1_alphas_cumprod": np.sqrt(b_t) / sqrt_a,
        "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(clipped, f32(1e-20))),
        "posterior_mean_coef1": coef1,
        "posterior_mean_coef2": coef2,
        "log_betas": np.log(beta),
    }


def threshold_x0(
    x0: jax.Array, clip: float | None = None, dynamic_threshold: float | None = None
) -> jax.Array:
    """Fixed clipping to [-clip, clip] and/or Imagen's dynamic thresholding of x0."""
    if dynamic_threshold is not None:
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=-1), 1.0)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        x0 = jnp.clip(x0, -s, s) / s
    if clip is not None:
        x0 = jnp.clip(x0, -clip, clip)
    return x0


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2).

    The end bins take the whole tail below -1 + 1/255 and above 1 - 1/255 (DDPM's decoder).
    """
    inv_std = jnp.exp(-log_scales)
    centred = x - means
    plus_in = inv_std * (centred + 1.0 / 255.0)
    minus_in = inv_std * (centred - 1.0 / 255.0)
    log_cdf_plus = jax.scipy.special.log_ndtr(plus_in)
    log_one_minus_cdf_minus = jax.scipy.special.log_ndtr(-minus_in)
    delta = jax.scipy.special.ndtr(plus_in) - jax.scipy.special.ndtr(minus_in)
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_minus, jnp.log(jnp.maximum(delta, 1e-12))),
    )


def take_coefficient(coefficients: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
    """coefficients[t] shaped to broadcast against a batch shaped like `like`."""
    values = jnp.asarray(coefficients, dtype=jnp.float32)[t]
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))
