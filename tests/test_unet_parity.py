"""clipgen's UNet, Decoder and Upsampler: against diffusers' Karlo UNets (tiny random models
saved with `save_pretrained`, loaded by `clipgen.weights.load_unet`, called as the UnCLIP
pipeline calls them), strict loading, and the clipgen-native modules at several sizes, with
and without gradient checkpointing, and with runs of identical blocks scanned."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn

from clipgen import config as config_lib
from clipgen.errors import InputError
from clipgen.models.clip import TextConfig
from clipgen.models.decoder import Decoder, DecoderConfig, init_decoder
from clipgen.models.unet import UNet, UNetConfig, block_runs, init_unet, stack_runs, unstack_runs
from clipgen.models.upsampler import Upsampler, UpsamplerConfig, init_upsampler
from clipgen.weights import load_unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
text_proj_module = pytest.importorskip("diffusers.pipelines.deprecated.unclip.text_proj")

TOL = 1e-4
CLIP_DIM, CROSS_DIM, TEXT_LENGTH = 16, 24, 7
# Karlo's decoder layout (ResnetDownsample, then simple cross-attention blocks), shrunk.
DECODER = dict(
    sample_size=16,
    in_channels=3,
    out_channels=6,
    down_block_types=(
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    up_block_types=(
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    block_out_channels=(16, 32, 48),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=8,
    resnet_time_scale_shift="scale_shift",
    class_embed_type="identity",
)
SUPER_RES_BASE = dict(
    sample_size=32,
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
    up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
    block_out_channels=(16, 32),
    in_channels=6,
    out_channels=3,
    norm_num_groups=8,
    attention_head_dim=8,
)
SUPER_RES = {
    # Karlo's super_res_first / super_res_last as diffusers' conversion script builds them.
    "karlo": dict(add_attention=False),
    # diffusers' UnCLIP pipeline test dummy: a middle attention with its GroupNorm.
    "pipeline_test": dict(),
    # With scale-shift norm diffusers' middle attention has no GroupNorm.
    "scale_shift": dict(resnet_time_scale_shift="scale_shift"),
}
# The original DDPM's 256 px layout (google/ddpm-celebahq-256's config.json, DiffusionCLIP's
# CelebA-HQ / church / bedroom backbones) with narrower blocks: six levels, attention at the
# fifth (16 px at 256), conv resampling padded right and bottom, [sin | cos] time features.
DDPM_256 = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 16, 32, 32, 64, 64),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    layers_per_block=2,
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=8,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
)
DECODER_TIMESTEPS = np.array([999, 500, 10, 0])
# Rows 1 and 3 pad, row 2 masks a middle token too.
TEXT_MASK = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 0, 0],
    ],
    bool,
)


def _randomized(model, seed: int):
    """Noise on every parameter (zero-initialised convs and norms too), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _torch(array: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(array))


def _nchw_to_nhwc(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).transpose(0, 2, 3, 1)


def _random_variables(init_fn, seed: int):
    """Variables shaped as `init_fn(key)` returns them (traced, not run: a compiled init
    costs tens of seconds on a CPU), filled with noise so that every layer passes signal."""
    shapes = jax.eval_shape(lambda key: nn.meta.unbox(init_fn(key)), jax.random.key(0))
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        noise = 0.1 * rng.randn(*leaf.shape).astype(np.float32)
        return jnp.asarray(noise + 1.0 if path[-1].key == "scale" else noise)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("karlo")
    torch.manual_seed(0)
    unet = _randomized(diffusers.UNet2DConditionModel(**DECODER), 1)
    text_proj = _randomized(
        text_proj_module.UnCLIPTextProjModel(
            clip_embeddings_dim=CLIP_DIM, time_embed_dim=4 * 16, cross_attention_dim=CROSS_DIM
        ),
        2,
    )
    unet.save_pretrained(root / "decoder")
    text_proj.save_pretrained(root / "text_proj")
    return root, unet, text_proj


@pytest.fixture(scope="module")
def super_res_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("super_res")
    models = {}
    for seed, (name, options) in enumerate(SUPER_RES.items()):
        torch.manual_seed(seed)
        model = _randomized(diffusers.UNet2DModel(**{**SUPER_RES_BASE, **options}), 10 + seed)
        model.save_pretrained(root / name)
        models[name] = model
    return root, models


def test_decoder_matches_diffusers_pipeline_call(decoder_dir):
    root, unet, text_proj = decoder_dir
    module, params = load_unet(root / "decoder")
    assert isinstance(module, Decoder)

    rng = np.random.RandomState(0)
    image_embed = rng.randn(2, CLIP_DIM).astype(np.float32)
    # The pipeline's guidance batch: the empty caption's CLIP outputs, then the caption's.
    prompt_embeds = rng.randn(4, CLIP_DIM).astype(np.float32)
    hidden = rng.randn(4, TEXT_LENGTH, CLIP_DIM).astype(np.float32)
    sample = rng.randn(4, 3, 16, 16).astype(np.float32)
    with torch.no_grad():
        context, time_addition = text_proj(
            image_embeddings=_torch(image_embed),
            prompt_embeds=_torch(prompt_embeds),
            text_encoder_hidden_states=_torch(hidden),
            do_classifier_free_guidance=True,
        )
        mask = torch.nn.functional.pad(_torch(TEXT_MASK), (4, 0), value=True)
        expected = unet(
            sample=_torch(sample),
            timestep=_torch(DECODER_TIMESTEPS),
            encoder_hidden_states=context,
            class_labels=time_addition,
            attention_mask=mask,
        ).sample.numpy()

    apply = jax.jit(module.apply)
    no_drop = np.zeros(4, bool)
    # The pipeline puts the null image embedding first: rows 0-1 drop the image.
    drop_image = np.array([True, True, False, False])
    inputs = (_nchw_to_nhwc(sample), DECODER_TIMESTEPS, np.concatenate([image_embed] * 2))
    got = apply(params, *inputs, hidden, TEXT_MASK, prompt_embeds, drop_image, no_drop)
    assert got.shape == (4, 16, 16, 6)
    np.testing.assert_allclose(np.asarray(got), _nchw_to_nhwc(expected), atol=TOL, rtol=0)

    # drop_text: the text tokens leave attention and the pooled text embedding becomes zeros.
    drop_text = np.array([True, False, True, False])
    dropped = apply(params, *inputs, hidden, TEXT_MASK, prompt_embeds, no_drop, drop_text)
    mask_out = TEXT_MASK & ~drop_text[:, None]
    zeroed = np.where(drop_text[:, None], 0.0, prompt_embeds).astype(np.float32)
    by_hand = apply(params, *inputs, hidden, mask_out, zeroed, no_drop, no_drop)
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(by_hand), atol=1e-6, rtol=0)
    assert not np.allclose(np.asarray(dropped)[0], np.asarray(got)[0], atol=1e-3)


@pytest.mark.parametrize("name", list(SUPER_RES))
def test_super_res_matches_diffusers_pipeline_call(super_res_dirs, name):
    root, models = super_res_dirs
    module, params = load_unet(root / name)
    assert isinstance(module, Upsampler)
    assert module.config.unet.mid_attention == (name != "karlo")

    rng = np.random.RandomState(1)
    low_res = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    noisy = rng.randn(2, 3, 32, 32).astype(np.float32)
    timesteps = np.array([999, 3])
    with torch.no_grad():
        upscaled = torch.nn.functional.interpolate(
            _torch(low_res), size=[32, 32], mode="bicubic", align_corners=False, antialias=True
        )
        expected = models[name](
            sample=torch.cat([_torch(noisy), upscaled], dim=1), timestep=_torch(timesteps)
        ).sample.numpy()
    got = jax.jit(module.apply)(params, _nchw_to_nhwc(noisy), timesteps, _nchw_to_nhwc(low_res))
    np.testing.assert_allclose(np.asarray(got), _nchw_to_nhwc(expected), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddpm") / "unet"
    torch.manual_seed(0)
    model = _randomized(diffusers.UNet2DModel(**DDPM_256), 20)
    model.save_pretrained(path)
    return path, model


def test_ddpm_256_layout_matches_diffusers_unrolled_and_scanned(ddpm_dir):
    path, model = ddpm_dir
    module, params = load_unet(path)
    assert isinstance(module, UNet)
    cfg = module.config
    assert cfg.channel_mult == (1, 1, 2, 2, 4, 4) and cfg.attention_resolutions == (16,)
    assert not cfg.resblock_updown and not cfg.use_scale_shift_norm and cfg.head_channels is None
    rng = np.random.RandomState(5)
    sample = rng.randn(2, 3, 64, 64).astype(np.float32)
    timesteps = np.array([999, 3])
    with torch.no_grad():
        expected = model(sample=_torch(sample), timestep=_torch(timesteps)).sample.numpy()
    got = jax.jit(module.apply)(params, _nchw_to_nhwc(sample), timesteps)
    np.testing.assert_allclose(np.asarray(got), _nchw_to_nhwc(expected), atol=TOL, rtol=0)

    scanned, stacked = load_unet(path, scan=True)
    assert scanned.config.scan and "down0_run0" in stacked["params"]
    got = jax.jit(scanned.apply)(stacked, _nchw_to_nhwc(sample), timesteps)
    np.testing.assert_allclose(np.asarray(got), _nchw_to_nhwc(expected), atol=TOL, rtol=0)


def test_mismatched_checkpoint_names_the_key(super_res_dirs, tmp_path):
    root, _ = super_res_dirs
    path = tmp_path / "edited"
    shutil.copytree(root / "karlo", path)
    weights = path / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    del tensors["conv_out.bias"]
    tensors["up_blocks.0.resnets.9.conv1.weight"] = np.zeros((1,), np.float32)
    tensors["time_embedding.linear_1.weight"] = np.zeros((3, 3), np.float32)
    safetensors.numpy.save_file(tensors, str(weights))
    with pytest.raises(ValueError) as error:
        load_unet(path)
    for key in ("conv_out.bias", "up_blocks.0.resnets.9.conv1.weight", "linear_1.weight"):
        assert key in str(error.value)


def test_unsupported_config_names_the_field(super_res_dirs, decoder_dir, tmp_path):
    root, _ = super_res_dirs
    path = tmp_path / "gelu"
    shutil.copytree(root / "karlo", path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    with pytest.raises(ValueError, match="act_fn"):
        load_unet(path)

    decoder_root, _, _ = decoder_dir
    path = tmp_path / "decoder"
    shutil.copytree(decoder_root / "decoder", path)
    with pytest.raises(InputError, match="text_proj"):
        load_unet(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "only_cross_attention": True}))
    with pytest.raises(ValueError, match="only_cross_attention"):
        load_unet(path, text_proj_path=decoder_root / "text_proj")


def _tiny_unet(**options) -> UNetConfig:
    base = dict(
        in_channels=3,
        out_channels=6,
        channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        head_channels=8,
        norm_groups=4,
        encoder_dim=16,
        dropout=0.1,
    )
    return UNetConfig(**{**base, **options})


def test_native_decoder_runs_at_two_resolutions():
    text = TextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2, mlp_dim=32)
    config = DecoderConfig(unet=_tiny_unet(), clip_embed_dim=12, text_transformer=text)
    module = Decoder(config)
    params = _random_variables(lambda key: init_decoder(module, key, 16), 0)
    rng = np.random.RandomState(2)
    ids = rng.randint(0, 50, (2, 8))
    mask = np.arange(8)[None] < np.array([[8], [3]])
    image_embed = rng.randn(2, 12).astype(np.float32)
    no_drop = np.zeros(2, bool)
    drop_image, drop_text = np.array([False, True]), np.array([True, False])
    apply = jax.jit(module.apply)
    for height, width in ((16, 16), (8, 24)):
        x = rng.randn(2, height, width, 3).astype(np.float32)
        out = apply(params, x, np.array([5, 900]), image_embed, ids, mask, None, no_drop, no_drop)
        assert out.shape == (2, height, width, 6) and bool(jnp.all(jnp.isfinite(out)))
        dropped = apply(
            params, x, np.array([5, 900]), image_embed, ids, mask, None, drop_image, drop_text
        )
        for row in (0, 1):
            assert not np.allclose(np.asarray(out[row]), np.asarray(dropped[row]), atol=1e-4)


def test_native_upsampler_runs_at_two_resolutions():
    unet = _tiny_unet(
        attention_resolutions=(),
        mid_attention=False,
        encoder_dim=None,
        in_channels=6,
        resblock_updown=False,
        use_scale_shift_norm=False,
    )
    module = Upsampler(UpsamplerConfig(unet, resize="bilinear"))
    params = _random_variables(lambda key: init_upsampler(module, key, 16, 8), 2)
    rng = np.random.RandomState(3)
    apply = jax.jit(module.apply)
    for size, low_size in (((16, 16), (4, 4)), ((24, 32), (6, 8))):
        x = rng.randn(2, *size, 3).astype(np.float32)
        low_res = rng.uniform(-1, 1, (2, *low_size, 3)).astype(np.float32)
        out = apply(params, x, np.array([0, 999]), low_res)
        assert out.shape == (2, *size, 6) and bool(jnp.all(jnp.isfinite(out)))


def test_remat_gives_the_same_output_and_gradients():
    # One resolution level keeps the two gradient compiles short.
    tiny = dict(channel_mult=(1,), attention_resolutions=(1,))
    plain, checkpointed = UNet(_tiny_unet(**tiny)), UNet(_tiny_unet(**tiny, remat=True))
    params = _random_variables(lambda key: init_unet(plain, key, 8, encoder_length=3), 4)
    remat_shapes = jax.eval_shape(
        lambda key: nn.meta.unbox(init_unet(checkpointed, key, 8, encoder_length=3)),
        jax.random.key(0),
    )
    assert jax.tree_util.tree_structure(remat_shapes) == jax.tree_util.tree_structure(params)

    rng = np.random.RandomState(4)
    x = rng.randn(2, 8, 8, 3).astype(np.float32)
    tokens = rng.randn(2, 3, 16).astype(np.float32)
    token_mask = np.array([[1, 1, 1], [1, 0, 0]], bool)
    embedding = rng.randn(2, 32).astype(np.float32)

    def loss(module, variables):
        out = module.apply(
            variables,
            x,
            np.array([3, 700]),
            embedding,
            tokens,
            token_mask,
            False,
            rngs={"dropout": jax.random.key(5, impl="rbg")},
        )
        return jnp.mean(out**2), out

    results = [
        jax.jit(jax.value_and_grad(lambda v, m=module: loss(m, v), has_aux=True))(params)
        for module in (plain, checkpointed)
    ]
    (value, out), grads = results[0]
    (remat_value, remat_out), remat_grads = results[1]
    np.testing.assert_allclose(np.asarray(remat_out), np.asarray(out), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(remat_value), float(value), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)


def test_block_runs_of_the_paper_decoder():
    # Three blocks a level down, four up, widths 512 to 2,048: a level's first down block
    # changes the width, and the up blocks' skips change width at each level's ends.
    unet = UNetConfig(**config_lib.load_preset("decoder", "paper").model.unet.to_dict())
    runs = block_runs(unet)
    down = [count for level in range(4) for _, count in runs["down", level] if count > 1]
    up = [count for level in (3, 2, 1, 0) for _, count in runs["up", level] if count > 1]
    assert (down, up) == ([3, 2, 2, 2], [3, 2, 2, 3])
    bodies = sum(len(level_runs) for level_runs in runs.values())
    assert bodies == 28 - 19 + 8


def test_scan_gives_the_same_output_and_gradients():
    # One level of four blocks up and three down: a run of each, and an unrolled mid.
    tiny = dict(channel_mult=(1,), attention_resolutions=(1,), num_res_blocks=3, dropout=0.0)
    plain = UNet(_tiny_unet(**tiny))
    scanned = UNet(_tiny_unet(**tiny, scan=True, remat=True))
    params = _random_variables(lambda key: init_unet(plain, key, 8, encoder_length=3), 6)
    stacked = {"params": stack_runs(params["params"], plain.config)}
    scan_shapes = jax.eval_shape(
        lambda key: nn.meta.unbox(init_unet(scanned, key, 8, encoder_length=3)),
        jax.random.key(0),
    )
    assert jax.tree.map(jnp.shape, scan_shapes) == jax.tree.map(jnp.shape, stacked)
    assert sorted(k for k in stacked["params"] if "_run" in k) == ["down0_run0", "up0_run0"]
    restored = unstack_runs(stacked["params"], plain.config)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params["params"])
    for back, original in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(back), np.asarray(original))

    rng = np.random.RandomState(7)
    x = rng.randn(2, 8, 8, 3).astype(np.float32)
    tokens = rng.randn(2, 3, 16).astype(np.float32)
    token_mask = np.array([[1, 1, 1], [1, 0, 0]], bool)

    def loss(module, variables):
        out = module.apply(variables, x, np.array([3, 700]), None, tokens, token_mask)
        return jnp.mean(out**2), out

    (value, out), grads = jax.jit(jax.value_and_grad(lambda v: loss(plain, v), has_aux=True))(
        params
    )
    (scan_value, scan_out), scan_grads = jax.jit(
        jax.value_and_grad(lambda v: loss(scanned, v), has_aux=True)
    )(stacked)
    np.testing.assert_allclose(np.asarray(scan_out), np.asarray(out), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(scan_value), float(value), rtol=1e-5)
    want = stack_runs(grads["params"], plain.config)
    for got, expected in zip(
        jax.tree.leaves(scan_grads["params"]), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-4)
