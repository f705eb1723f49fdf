"""The train state and the optimizer, built from `config.optim`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a step changes: parameters, optimizer state, EMA copies and counters.

    `ema` maps a decay's name (`ema_decay_name`) to an exponential moving average of the
    parameters. `nonfinite_steps` counts steps whose loss or gradient was not finite (their
    update is not applied); `first_nonfinite_step` is the first such step, or -1.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema: dict[str, Any]
    rng: jax.Array
    nonfinite_steps: jax.Array
    first_nonfinite_step: jax.Array


def ema_decay_name(decay: float) -> str:
    """The key of an EMA in `TrainState.ema`, e.g. "ema_0p9999" (no dots: orbax joins
    tree keys with them)."""
    return "ema_" + f"{decay:g}".replace(".", "p")


def ema_decay_value(name: str) -> float:
    return float(name.removeprefix("ema_").replace("p", "."))


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine decay to `lr * final_lr_fraction` at
    `decay_steps`, or constant, or "step": `lr * step_factor ** (step // step_every)`
    (torch's StepLR, with no warm-up; DiffusionCLIP grows its rate 1.3x an epoch)."""
    warmup = max(int(optim.warmup_steps), 0)
    if optim.schedule == "step":
        every, factor = int(optim.step_every), float(optim.step_factor)
        return lambda step: optim.lr * factor ** (step // every)
    if optim.schedule == "constant":
        warm = optax.linear_schedule(0.0, optim.lr, max(warmup, 1))
        return optax.join_schedules([warm, optax.constant_schedule(optim.lr)], [warmup])
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            optim.lr,
            warmup_steps=warmup,
            decay_steps=max(int(optim.decay_steps), warmup + 1),
            end_value=optim.lr * optim.final_lr_fraction,
        )
    raise ValueError(
        f"config.optim.schedule: unknown {optim.schedule!r}; use cosine, constant or step"
    )


def frozen_labels(patterns: tuple[str, ...]) -> Callable[[Any], Any]:
    """params -> a tree of "frozen" / "trained" labels: a parameter is frozen when its
    "/"-joined path (e.g. "clip_std" or "encoder/block_0/attn/query/kernel") fully matches
    one of the regular expressions."""
    compiled = [re.compile(pattern) for pattern in patterns]

    def labels(params: Any) -> Any:
        def label(path, _) -> str:
            name = "/".join(str(key.key) for key in path if hasattr(key, "key"))
            return "frozen" if any(p.fullmatch(name) for p in compiled) else "trained"

        return jax.tree_util.tree_map_with_path(label, params)

    return labels


def make_optimizer(
    optim: ml_collections.ConfigDict, extra_frozen: tuple[str, ...] = ()
) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on kernels (arrays of rank >= 2) only, after
    global-norm gradient clipping. Parameters matching `optim.frozen` or `extra_frozen`
    (regular expressions over "/"-joined paths) are never updated and keep no optimizer
    state: data statistics stored as parameters, or the parts of a model that fine-tuning
    leaves alone."""
    frozen = (*optim.get("frozen", ()), *extra_frozen)
    if frozen:
        trained = make_optimizer(ml_collections.ConfigDict(dict(optim.to_dict(), frozen=())))
        return optax.multi_transform(
            {"trained": trained, "frozen": optax.set_to_zero()}, frozen_labels(frozen)
        )
    transforms = []
    if optim.grad_clip and optim.grad_clip > 0:
        transforms.append(optax.clip_by_global_norm(optim.grad_clip))
    transforms.append(
        optax.adamw(
            learning_rate_schedule(optim),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params),
        )
    )
    return optax.chain(*transforms)


def create_state(
    params: Any, tx: optax.GradientTransformation, ema_decays: tuple[float, ...], rng: jax.Array
) -> TrainState:
    """A fresh state (call it inside the sharded init so every part is created in place)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema={ema_decay_name(d): jax.tree_util.tree_map(jnp.copy, params) for d in ema_decays},
        rng=rng,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def update_ema(ema: dict[str, Any], params: Any, step: jax.Array) -> dict[str, Any]:
    """Move every EMA towards `params`; the decay warms up as min(decay, (1+n)/(10+n)) so
    early averages are not dominated by the random initialisation."""

    def one(name: str, average: Any) -> Any:
        decay = jnp.minimum(ema_decay_value(name), (1.0 + step) / (10.0 + step))
        return jax.tree_util.tree_map(lambda a, p: decay * a + (1.0 - decay) * p, average, params)

    return {name: one(name, average) for name, average in ema.items()}
