"""clipgen's diffusion prior against diffusers' `PriorTransformer`: tiny random models in
Karlo's, Kandinsky 2.2's and Shap-E's options, saved with `save_pretrained`, loaded by
`clipgen.weights.load_prior`, compared on the same inputs."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn

from clipgen.errors import InputError
from clipgen.models.prior import PriorConfig, PriorTransformer, init_prior
from clipgen.weights import load_prior

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
BATCH, TEXT_LENGTH = 3, 7
TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, num_embeddings=TEXT_LENGTH)
OPTIONS = {
    # Karlo v1 alpha: diffusers' defaults.
    "karlo": dict(embedding_dim=12, additional_embeddings=4),
    # Kandinsky 2.2 is Karlo's config at another embedding_dim; the two layer norms (Shap-E's
    # options) are switched on here too, so that every norm a checkpoint can hold is covered.
    "kandinsky22": dict(
        embedding_dim=20,
        additional_embeddings=4,
        norm_in_type="layer",
        embedding_proj_norm_type="layer",
    ),
    # Shap-E's shape: no text tokens, no query, every derived width set apart; one
    # positional row, which diffusers pads to the three-token sequence.
    "shap_e": dict(
        embedding_dim=12,
        num_embeddings=1,
        additional_embeddings=0,
        time_embed_act_fn="gelu",
        norm_in_type="layer",
        embedding_proj_norm_type="layer",
        encoder_hid_proj_type=None,
        added_emb_type=None,
        time_embed_dim=24,
        embedding_proj_dim=10,
        clip_embed_dim=14,
    ),
}
# Padding and non-prefix masks; row 2 masks the first token, whose row is then all masked.
TEXT_MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 1, 0, 0],
    ],
    bool,
)
TIMESTEPS = np.array([0, 17, 999])


def _diffusers_prior(options: dict, seed: int = 0):
    """A diffusers PriorTransformer with noise on every parameter (zero-initialised ones too)."""
    torch.manual_seed(seed)
    model = diffusers.PriorTransformer(**{**TINY, **options})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
            if name == "clip_std":
                param.add_(1.0)
            if name == "clip_mean":
                param.mul_(5.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per option set: (torch model, its save_pretrained directory)."""
    saved = {}
    for name, options in OPTIONS.items():
        model = _diffusers_prior(options)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        saved[name] = (model, path)
    return saved


def _inputs(model, seed: int = 0) -> dict[str, np.ndarray]:
    cfg = model.config
    rng = np.random.default_rng(seed)
    inputs = {
        "hidden_states": rng.standard_normal((BATCH, cfg.embedding_dim)),
        "proj_embedding": rng.standard_normal((BATCH, cfg.embedding_proj_dim or cfg.embedding_dim)),
    }
    if cfg.encoder_hid_proj_type is not None:
        tokens = rng.standard_normal((BATCH, TEXT_LENGTH, cfg.embedding_dim))
        inputs["encoder_hidden_states"] = tokens
    return {k: v.astype(np.float32) for k, v in inputs.items()}


def _torch_predict(model, inputs, timestep, attention_mask) -> np.ndarray:
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    if attention_mask is not None:
        tensors["attention_mask"] = torch.from_numpy(attention_mask)
    with torch.no_grad():
        out = model(timestep=timestep, **tensors).predicted_image_embedding
    return out.reshape(BATCH, -1).numpy()


def _clipgen_predict(module, params, inputs, timestep, text_mask, **kwargs) -> np.ndarray:
    out = module.apply(
        params,
        inputs["hidden_states"],
        timestep,
        inputs["proj_embedding"],
        inputs.get("encoder_hidden_states"),
        text_mask,
        **kwargs,
    )
    return np.asarray(out)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_forward_matches_diffusers(checkpoints, name):
    model, path = checkpoints[name]
    module, params = load_prior(path)
    inputs = _inputs(model)
    mask = None if name == "shap_e" else TEXT_MASK
    expected = _torch_predict(model, inputs, torch.from_numpy(TIMESTEPS), mask)
    got = _clipgen_predict(module, params, inputs, jnp.asarray(TIMESTEPS), mask)
    assert got.shape == (BATCH, module.config.clip_embed_dim)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)

    # A scalar python timestep, as diffusers broadcasts it over the batch, and fractional ones.
    expected = _torch_predict(model, inputs, 321, mask)
    got = _clipgen_predict(module, params, inputs, 321, mask)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    fractional = np.array([0.5, 17.25, 998.75], np.float32)
    expected = _torch_predict(model, inputs, torch.from_numpy(fractional), mask)
    got = _clipgen_predict(module, params, inputs, jnp.asarray(fractional), mask)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["karlo", "kandinsky22"])
def test_no_text_mask_is_causal_for_the_query_prior(checkpoints, name):
    """Without a mask clipgen stays causal (every token valid); diffusers would drop the causal
    mask as well, so the reference is diffusers given an all-true mask."""
    model, path = checkpoints[name]
    module, params = load_prior(path)
    inputs = _inputs(model, seed=1)
    all_valid = np.ones_like(TEXT_MASK)
    expected = _torch_predict(model, inputs, torch.from_numpy(TIMESTEPS), all_valid)
    got = _clipgen_predict(module, params, inputs, jnp.asarray(TIMESTEPS), None)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_post_process_latents_matches_diffusers(checkpoints, name):
    model, path = checkpoints[name]
    module, params = load_prior(path)
    latents = np.random.default_rng(2).standard_normal((BATCH, module.config.clip_embed_dim))
    latents = latents.astype(np.float32)
    with torch.no_grad():
        expected = model.post_process_latents(torch.from_numpy(latents)).numpy()
    got = module.apply(params, latents, method=PriorTransformer.post_process_latents)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    back = module.apply(params, got, method=PriorTransformer.normalize_latents)
    np.testing.assert_allclose(back, latents, atol=TOL, rtol=TOL)


def test_bfloat16_compute_stays_close(checkpoints):
    model, path = checkpoints["karlo"]
    module, params = load_prior(path, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    inputs = _inputs(model)
    expected = _torch_predict(model, inputs, torch.from_numpy(TIMESTEPS), TEXT_MASK)
    got = _clipgen_predict(module, params, inputs, jnp.asarray(TIMESTEPS), TEXT_MASK)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=0.1, rtol=0.05)


def _rewrite_weights(path, edit) -> None:
    weights = path / "diffusion_pytorch_model.safetensors"
    tensors = dict(safetensors.numpy.load_file(str(weights)))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(weights))


def test_missing_or_extra_key_is_refused(tmp_path):
    model = _diffusers_prior(OPTIONS["karlo"])
    missing, extra = tmp_path / "missing", tmp_path / "extra"
    for path in (missing, extra):
        model.save_pretrained(path, safe_serialization=True)
    _rewrite_weights(missing, lambda t: t.pop("transformer_blocks.1.attn1.to_k.bias"))
    with pytest.raises(ValueError, match=r"missing keys: transformer_blocks\.1\.attn1\.to_k\.bias"):
        load_prior(missing)
    _rewrite_weights(extra, lambda t: t.update(stray_buffer=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="unexpected keys.*stray_buffer"):
        load_prior(extra)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(InputError, match="config.json does not exist"):
        load_prior(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "PriorTransformer"}))
    with pytest.raises(InputError, match="no diffusion_pytorch_model.safetensors"):
        load_prior(tmp_path)


def test_dropout_is_honoured():
    config = PriorConfig(**TINY, embedding_dim=12, dropout=0.3)
    module = PriorTransformer(config)
    params = nn.meta.unbox(init_prior(module, jax.random.key(0), batch_size=BATCH))
    rng = np.random.default_rng(3)
    args = (
        rng.standard_normal((BATCH, 12)).astype(np.float32),
        jnp.asarray(TIMESTEPS),
        rng.standard_normal((BATCH, 12)).astype(np.float32),
        rng.standard_normal((BATCH, TEXT_LENGTH, 12)).astype(np.float32),
        TEXT_MASK,
    )

    @functools.partial(jax.jit, static_argnums=1)
    def predict(key, deterministic):
        return module.apply(params, *args, deterministic=deterministic, rngs={"dropout": key})

    plain = predict(jax.random.key(1), True)
    np.testing.assert_array_equal(plain, predict(jax.random.key(2), True))
    first, second = predict(jax.random.key(1), False), predict(jax.random.key(2), False)
    assert not np.allclose(first, plain, atol=1e-3)
    assert not np.allclose(first, second, atol=1e-3)


def test_kernels_carry_logical_axes():
    # encoder_hidden_dim (clipgen's extension): text tokens narrower or wider than embeddings.
    module = PriorTransformer(PriorConfig(**TINY, embedding_dim=12, encoder_hidden_dim=24))
    variables = init_prior(module, jax.random.key(0))
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["block_0"]["attn"]["query"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["block_1"]["mlp"]["fc2"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["noisy_embed_proj"]["kernel"]) == (None, "embed")
    assert nn.meta.unbox(variables)["params"]["text_tokens_proj"]["kernel"].shape == (24, 16)
