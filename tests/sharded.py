"""The shared check that a stage's loss and gradient on a batch sharded over devices equal
those on one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import linen as nn


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_sharded_equals_one_device(
    stage,
    mesh,
    batch_size: int,
    *,
    loss_rtol: float,
    grad_rtol: float,
    grad_atol: float,
    params=None,
) -> None:
    """`stage`'s loss and gradients on its first batch, sharded over `mesh`'s 'data' axis,
    equal the single-device ones to the tolerances given (at `params`, by default its
    initial parameters)."""
    if params is None:
        params = nn.meta.unbox(stage.init_params(jax.random.key(0)))
    batch = next(stage.batches(0, batch_size))
    constants = () if stage.constants is None else (stage.constants(),)
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, b: stage.loss(p, b, jax.random.key(3), *constants)[0])
    )
    single_loss, single_grads = grad_fn(params, batch)
    sharded = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.P("data")))
    assert all(leaf.sharding.spec == jax.P("data") for leaf in jax.tree.leaves(sharded))
    sharded_loss, sharded_grads = grad_fn(params, sharded)
    assert float(sharded_loss) == pytest.approx(float(single_loss), rel=loss_rtol)
    for a, b in zip(
        jax.tree.leaves(_host(single_grads)), jax.tree.leaves(_host(sharded_grads)), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=grad_rtol, atol=grad_atol)
