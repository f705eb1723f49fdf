"""Scanned blocks (clipgen.models.layers): a model built with `scan_layers` (and `remat`)
computes what the unrolled one computes with the same weights, stacked; a scanned prior
trains FSDP-sharded on 8 devices to what it trains on one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clipgen import build
from clipgen import config as config_lib
from clipgen.models.ar_prior import ARPrior, ARPriorConfig, init_ar_prior
from clipgen.models.clip import CLIP, TextConfig, VisionConfig, init_clip
from clipgen.models.layers import stack_layers
from clipgen.models.prior import PriorConfig, PriorTransformer, init_prior
from clipgen.train import loop
from clipgen.train import prior as prior_stage


def _unboxed(variables):
    return nn.meta.unbox(variables)["params"]


def _assert_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol)


def test_scanned_prior_equals_the_unrolled_one_in_output_and_gradient():
    config = PriorConfig(
        num_attention_heads=2, attention_head_dim=8, num_layers=3, embedding_dim=12,
        num_embeddings=5, encoder_hidden_dim=12,
    )  # fmt: skip
    unrolled = PriorTransformer(config)
    scanned = PriorTransformer(config, scan_layers=True, remat=True)
    params = _unboxed(init_prior(unrolled, jax.random.key(0)))
    stacked = stack_layers(params, 3)
    shapes = jax.tree.map(jnp.shape, _unboxed(init_prior(scanned, jax.random.key(0))))
    assert jax.tree.map(jnp.shape, stacked) == shapes
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((2, 12)), np.array([3, 700]), rng.standard_normal((2, 12)),
        rng.standard_normal((2, 5, 12)), np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    )  # fmt: skip

    def loss(module, p):
        return jnp.sum(module.apply({"params": p}, *inputs) ** 2)

    _assert_close(
        unrolled.apply({"params": params}, *inputs), scanned.apply({"params": stacked}, *inputs)
    )
    grads = jax.grad(lambda p: loss(unrolled, p))(params)
    _assert_close(stack_layers(grads, 3), jax.grad(lambda p: loss(scanned, p))(stacked))


def test_scanned_clip_and_ar_prior_equal_the_unrolled_ones():
    vision = VisionConfig(image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_dim=32)
    text = TextConfig(vocab_size=20, context_length=6, width=16, layers=3, heads=2, mlp_dim=32)
    unrolled, scanned = CLIP(vision, text, 8), CLIP(vision, text, 8, scan_layers=True, remat=True)
    params = _unboxed(init_clip(unrolled, jax.random.key(0)))
    stacked = dict(
        params,
        vision_tower=stack_layers(params["vision_tower"], 2),
        text_tower=stack_layers(params["text_tower"], 3),
    )
    pixels = np.random.default_rng(0).standard_normal((2, 16, 16, 3))
    ids = np.array([[1, 4, 5, 19, 0, 0], [1, 7, 19, 0, 0, 0]])
    mask = (ids > 0).astype(np.int32)
    _assert_close(
        unrolled.apply({"params": params}, pixels, ids, mask),
        scanned.apply({"params": stacked}, pixels, ids, mask),
    )
    config = ARPriorConfig(
        width=16, heads=2, layers=2, embedding_dim=6, num_codes=4, num_buckets=8,
        num_dot_buckets=4, num_text_tokens=3, text_token_dim=5,
    )  # fmt: skip
    ar, ar_scanned = ARPrior(config), ARPrior(config, scan_layers=True)
    ar_params = _unboxed(init_ar_prior(ar, jax.random.key(1)))
    args = (
        np.ones((2, 6)),
        np.ones((2, 3, 5)),
        np.ones((2, 3), np.int32),
        np.zeros(2, np.int32),
        np.zeros((2, 4), np.int32),
    )
    _assert_close(
        ar.apply({"params": ar_params}, *args),
        ar_scanned.apply({"params": stack_layers(ar_params, 2)}, *args),
    )


def test_a_scanned_prior_trains_sharded_as_on_one_device(tmp_path):
    def run(directory, devices, **mesh):
        config = config_lib.load_preset("prior", "tiny")
        config.model.update(scan=True, remat=True, layers=2)
        if mesh:
            config.mesh = mesh
        state = loop.train(config, directory, prior_stage.make_stage(config), devices)
        return config, jax.tree.map(np.asarray, state.params)

    config, single = run(tmp_path / "one", jax.devices()[:1])
    _, sharded = run(tmp_path / "eight", None, data=2, fsdp=4, tensor=1)
    assert single["blocks"]["block"]["attn"]["query"]["kernel"].shape[0] == 2
    _assert_close(single, sharded, atol=2e-5)
    assert isinstance(build.module(config), PriorTransformer)
