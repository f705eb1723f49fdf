"""DiffusionCLIP (clipgen.edit, the `edit` stage, the edit pipeline, the edit_oracle
evaluator, `clipgen edit`): the official grid and DDIM steps against a reference written
from the official code's formulas, reconstruction on Gaussian data with its exact model,
exact-mode gradients against central finite differences in float64, the efficient mode's
L1 and identity gradients, noise combination, the latent cache, the oracle's verdicts on
rendered edits, a sharded loss, and a tiny public-layout DDPM fine-tuned end to end."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_diffusion_closed_form import MU, SIGMA, exact_model

from clipgen import config as config_lib
from clipgen import edit
from clipgen.data import shapes
from clipgen.diffusion import gaussian
from clipgen.diffusion.schedules import uniform_grid
from clipgen.eval.evaluators import edit_oracle
from clipgen.models.clip import CLIP, VisionConfig, init_clip
from clipgen.models.unet import UNet, init_unet
from clipgen.train import edit as edit_stage

from sharded import assert_sharded_equals_one_device

LINEAR = gaussian.make_diffusion("linear", 1000)  # DiffusionCLIP's DDPMs' process


def test_grid_is_the_official_truncated_linspace():
    assert uniform_grid(500, 6) == [0, 100, 200, 300, 400, 500]
    grid = uniform_grid(500, 40)
    assert len(grid) == 40 and grid[:4] == [0, 12, 25, 38] and grid[-1] == 500
    assert uniform_grid(301, 40)[1] == 7  # int() truncates: 301 / 39 = 7.72
    with pytest.raises(ValueError, match="repeat"):
        uniform_grid(10, 20)


def _official_walk(x, pairs, eps_fn, abar):
    """DiffusionCLIP's `denoising_step` with eta 0 over (t, t_next) pairs, t_next -1 meaning
    alpha-bar 1, in float64 numpy."""
    x = np.asarray(x, np.float64)
    for t, t_next in pairs:
        at = abar[t]
        at_next = 1.0 if t_next < 0 else abar[t_next]
        e = eps_fn(x, t)
        x0 = (x - np.sqrt(1 - at) * e) / np.sqrt(at)
        x = np.sqrt(at_next) * x0 + np.sqrt(1 - at_next) * e
    return x


def test_inversion_and_generation_take_the_official_steps():
    abar = np.asarray(LINEAR.alphas_cumprod, np.float64)

    def eps_np(x, t):
        return np.tanh(0.7 * x + 0.002 * t)

    def eps_jax(x, t):
        return jnp.tanh(0.7 * x + 0.002 * t.astype(jnp.float32)[:, None, None, None])

    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    t0, steps = 300, 7
    seq = uniform_grid(t0, steps)
    seq_next = [-1, *seq[:-1]]
    # Generation: zip(reversed(seq), reversed(seq_next)), down to alpha-bar 1.
    x_t0 = rng.standard_normal(x0.shape).astype(np.float32)
    want = _official_walk(x_t0, zip(reversed(seq), reversed(seq_next), strict=True), eps_np, abar)
    got = jax.jit(lambda x: edit.generate(LINEAR, eps_jax, x, t0, steps))(x_t0)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # Inversion: the official walk up (seq_next[1:], seq[1:]) after one step from the clean
    # image (alpha-bar 1) to t = 0, with the model read at t = 0.
    first = np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * eps_np(x0, 0)
    want = _official_walk(first, zip(seq_next[1:], seq[1:], strict=True), eps_np, abar)
    got = jax.jit(lambda x: edit.invert(LINEAR, eps_jax, x, t0, steps))(x0)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_inversion_then_generation_reconstructs_gaussian_data():
    """With the exact model of Gaussian data, DDIM inversion to the default t0 = 500 with
    S_inv = 40 and generation with S_test = 40 return the data to a mean error of 0.029
    (its std is 0.5): the first-order error of DDIM inversion; two fixed-point iterations a
    step close it."""
    model_fn = exact_model(LINEAR, "eps")
    x0 = MU + SIGMA * jax.random.normal(jax.random.key(2), (256, 4))
    errors = {}
    for refine in (0, 2):
        latents = jax.jit(lambda x, r=refine: edit.invert(LINEAR, model_fn, x, 500, 40, r))(x0)
        assert abs(float(jnp.std(latents)) - 1.0) < 0.1
        rebuilt = jax.jit(lambda x: edit.generate(LINEAR, model_fn, x, 500, 40))(latents)
        errors[refine] = float(jnp.mean(jnp.abs(rebuilt - x0)))
    assert errors[0] < 0.035 and errors[2] < 0.003, errors


def _noisy(tree, seed, dtype):
    """Noise on every parameter (zero-initialised layers too) so that each passes signal."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = 0.2 * rng.standard_normal(np.shape(leaf))
        return jnp.asarray(noise + (1.0 if path[-1].key == "scale" else 0.0), dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


def _tiny_models(dtype):
    from test_unet_parity import _tiny_unet

    unet = UNet(_tiny_unet(out_channels=3, encoder_dim=None, dropout=0.0), dtype)
    vision = VisionConfig(image_size=8, patch_size=4, width=16, layers=1, heads=2, mlp_dim=32)
    clip = CLIP(vision=vision, text=None, projection_dim=8, dtype=dtype)
    unet_shapes = jax.eval_shape(lambda k: nn.meta.unbox(init_unet(unet, k, 8)), jax.random.key(0))
    clip_shapes = jax.eval_shape(lambda k: nn.meta.unbox(init_clip(clip, k)), jax.random.key(0))
    params = _noisy(unet_shapes["params"], 1, dtype)
    return unet, clip, params, _noisy(clip_shapes["params"], 2, dtype)


def _loss_setup(dtype, **settings):
    config = config_lib.load_preset("edit", "tiny")
    config.edit.update(gen_steps=3, t0=300, **settings)
    unet, clip, params, clip_params = _tiny_models(dtype)
    backbone = edit.Backbone(unet, LINEAR, 8)
    direction = np.random.default_rng(3).standard_normal(8)
    direction /= np.linalg.norm(direction)

    def identity(variables, images):
        return edit.image_embeddings(clip, variables, images)

    loss = edit_stage.edit_loss(config, backbone, clip, identity, 0.0)
    rng = np.random.default_rng(4)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), dtype),
        "latent": jnp.asarray(rng.standard_normal((2, 8, 8, 3)), dtype),
        "step": jnp.zeros((2,), jnp.int32),
    }
    return loss, params, batch, {"clip": clip_params, "direction": direction}


@pytest.mark.parametrize("unroll, clip_blur", [(True, 1.0), (False, 0.0)])
def test_exact_gradients_through_every_step_equal_finite_differences(unroll, clip_blur):
    with jax.enable_x64(True):
        loss, params, batch, constants = _loss_setup(
            jnp.float64,
            clip_weight=3.0,
            l1_weight=1.0,
            id_weight=0.5,
            clip_loss="official",
            unroll=unroll,
            clip_blur=clip_blur,
        )

        def total(p):
            return loss(p, batch, jax.random.key(0), constants)[0]

        value, grads = jax.jit(jax.value_and_grad(total))(params)
        assert value.dtype == jnp.float64 and np.isfinite(float(value))
        evaluate, eps = jax.jit(total), 1e-6
        rng = np.random.default_rng(5)
        for _ in range(2):
            direction = jax.tree_util.tree_map(
                lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape)), params
            )
            shifted = [
                jax.tree_util.tree_map(lambda p, d, s=sign: p + s * eps * d, params, direction)
                for sign in (1.0, -1.0)
            ]
            numeric = (float(evaluate(shifted[0])) - float(evaluate(shifted[1]))) / (2 * eps)
            analytic = sum(
                float(jnp.vdot(g, d))
                for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
            )
            assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_low_pass_keeps_constants_and_damps_pixel_patterns():
    flat = jnp.full((1, 16, 16, 3), 0.3)
    checker = jnp.asarray(np.indices((16, 16)).sum(0) % 2 * 2.0 - 1.0)[None, :, :, None]
    assert edit.low_pass(checker, 0.0) is checker
    np.testing.assert_allclose(np.asarray(edit.low_pass(flat, 1.0)), 0.3, atol=1e-6)
    assert float(jnp.abs(edit.low_pass(checker, 1.0)).max()) < 0.1


@pytest.mark.parametrize("term", ["l1_weight", "id_weight"])
def test_efficient_mode_l1_and_identity_terms_have_gradients(term):
    """The official efficient mode takes its identity loss on the detached x_{t-1}: zero
    gradient. Here both terms read that step's x0 estimate, at every step k."""
    weights = {"clip_weight": 0.0, "l1_weight": 0.0, "id_weight": 0.0, term: 1.0}
    loss, params, batch, constants = _loss_setup(jnp.float32, mode="efficient", **weights)
    grad = jax.jit(jax.grad(lambda p, b: loss(p, b, jax.random.key(0), constants)[0]))
    for k in (0, 2):
        stepped = dict(batch, step=jnp.full((2,), k, jnp.int32))
        norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad(params, stepped)))))
        assert norm > 1e-6, (term, k)


def test_noise_combination_follows_the_schedule():
    schedule = edit.parse_schedule({300: [1, 0], 0: [0.3, 0.7]}, 2)
    assert schedule == ((300, (1.0, 0.0)), (0, (0.3, 0.7)))
    with pytest.raises(ValueError, match="3 ratios for 2 models"):
        edit.parse_schedule({300: [1, 0, 0], 0: [0.3, 0.3, 0.4]}, 2)  # the official default
    with pytest.raises(ValueError, match="threshold 0"):
        edit.parse_schedule({300: [1, 0]}, 2)
    models = [lambda x, t: x * 2.0, lambda x, t: x * 10.0]
    mixed = edit.combine(models, *edit.schedule_arrays(schedule))
    x = jnp.ones((3, 2, 2, 1))
    out = mixed(x, jnp.array([999, 300, 299]))
    np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0]), [2.0, 2.0, 0.3 * 2 + 0.7 * 10])
    gamma = edit.combine(models, *edit.schedule_arrays(edit.gamma_schedule(0.25)))
    np.testing.assert_allclose(float(gamma(x, jnp.array([5, 5, 5]))[0, 0, 0, 0]), 4.0)


def test_latent_cache_inverts_each_image_once(tmp_path):
    calls = []

    def compute(images, conds):
        calls.append(len(images))
        return images * 2.0

    images = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
    cache = edit.LatentCache(tmp_path)
    first = cache.latents("model", images, 500, 40, compute)
    np.testing.assert_allclose(first, images * 2.0)
    again = edit.LatentCache(tmp_path).latents("model", images[::-1], 500, 40, compute)
    np.testing.assert_allclose(again, first[::-1])
    assert calls == [3]
    cache.latents("model", images, 400, 40, compute)  # another t0, another key
    cache.latents("other model", images[:1], 500, 40, compute)
    assert calls == [3, 3, 1] and len(list(tmp_path.glob("*.npy"))) == 7


def _scene(*objects, background="white"):
    return shapes.Scene(tuple(shapes.Obj(*o) for o in objects), background)


def test_oracle_verdicts_on_rendered_edits():
    scene = _scene(("red", "circle", "large", "left"), ("green", "square", "small", "right"))
    changes = {"red": "blue"}
    done = edit_oracle.edited_scene(scene, changes)
    assert done.objects[0].colour == "blue" and done.objects[1] == scene.objects[1]
    cases = {
        "done": (done, dict(applied=True, kept=True)),
        "nothing": (scene, dict(applied=False, kept=True)),
        "also_shape": (
            dataclasses.replace(
                done,
                objects=(dataclasses.replace(done.objects[0], shape="square"),) + done.objects[1:],
            ),
            dict(applied=True, kept=False),
        ),
        "other_recoloured": (
            _scene(("blue", "circle", "large", "left"), ("blue", "square", "small", "right")),
            dict(applied=True, kept=False),
        ),
        "background": (
            dataclasses.replace(done, background="black"),
            dict(applied=True, kept=False),
        ),
    }
    lost = {"also_shape": "shape", "other_recoloured": "colour", "background": "background"}
    for name, (shown, want) in cases.items():
        read = shapes.oracle(shapes.render(shown, 64))
        verdict = edit_oracle.judge(read, scene, changes)
        assert verdict == dict(want, both=want["applied"] and want["kept"]), name
        shares = edit_oracle.judge_readings([read], [scene], changes)
        assert {key: shares[key] for key in verdict} == verdict, name
        for what in edit_oracle.KEPT:
            assert shares[f"kept/{what}"] == float(lost.get(name) != what), (name, what)
    moved = _scene(("blue", "circle", "large", "top"), ("green", "square", "small", "right"))
    shares = edit_oracle.judge_readings([shapes.oracle(shapes.render(moved, 64))], [scene], changes)
    assert shares["kept/objects"] == 0.0 and shares["kept"] == 0.0
    assert edit_oracle.attribute_of("square") == "shape"


def test_sharded_exact_loss_equals_one_device(mesh8):
    config = config_lib.load_preset("edit", "tiny")
    config.edit.update(clip_weight=3.0, l1_weight=1.0, id_weight=0.3)
    stage = edit_stage.make_stage(config)
    # A fresh UNet's zero output layer makes inversion and generation exact inverses, and the
    # image direction the CLIP loss reads pure rounding noise: start from a noisy one.
    params = _noisy(stage.pretrained(), 6, jnp.float32)
    assert_sharded_equals_one_device(
        stage, mesh8, 8, loss_rtol=1e-5, grad_rtol=2e-3, grad_atol=5e-5, params=params
    )


def test_public_ddpm_layout_fine_tunes_with_lora_and_efficiently(tmp_path):
    """A tiny random diffusers UNet2DModel in google/ddpm-celebahq-256's layout (shrunk to
    32 px) loads as the base and fine-tunes a few LoRA steps in efficient mode; the saved
    edit file holds only the adapters and applies through the pipeline."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from test_unet_parity import DDPM_256

    from clipgen.pipelines import edit as edit_pipeline
    from clipgen.train import loop

    torch.manual_seed(0)
    diffusers.UNet2DModel(**dict(DDPM_256, sample_size=32)).save_pretrained(tmp_path / "ddpm")
    config = config_lib.load_preset("edit", "tiny")
    config.base.source = str(tmp_path / "ddpm")
    config.diffusion = dict(
        schedule="linear", timesteps=1000, prediction="eps", variance="fixed_small"
    )
    config.edit.mode = "efficient"
    config.lora.rank = 2
    config.total_steps = 3
    config.edit.cache = str(tmp_path / "latents")
    stage = edit_stage.make_stage(config)
    state = loop.train(config, tmp_path / "run", stage)
    adapters = jax.tree.leaves(state.params["lora"])
    assert int(state.step) == 3 and any(float(jnp.abs(a).max()) > 0 for a in adapters[1::2])
    found = edit_pipeline.Edit(config, jax.device_get(state.params))
    path = edit_pipeline.save_edit(tmp_path / "edit.safetensors", found)
    loaded = edit_pipeline.load_edit(path)
    assert set(loaded.params) == {"lora"} and loaded.config.lora.rank == 2
    editor = edit_pipeline.Editor(loaded.config, cache=tmp_path / "latents", steps=3)
    inputs = edit.shapes_with("red", "heldout", 2, 32)[0]
    out = editor.apply(inputs, [loaded], gamma=0.5)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    elsewhere = dataclasses.replace(loaded, base_fingerprint="0" * 24)
    with pytest.raises(ValueError, match="fine-tuned from another model"):
        editor.params_of(elsewhere)
    assert json.loads(loaded.config.to_json())["edit"]["source"] == "red"


def test_clipgen_edit_fine_tunes_applies_and_combines(tmp_path):
    """`clipgen edit` on a folder: fine-tune a tiny edit on its images, then apply the saved
    edit at two strengths and combine it with itself over time; the edit_oracle evaluator
    scores the fine-tuned parameters."""
    from clipgen import images
    from clipgen.cli import main
    from clipgen.eval import registry
    from clipgen.pipelines import edit as edit_pipeline

    folder = tmp_path / "inputs"
    for i, picture in enumerate(edit.shapes_with("red", "test", 2, 16)[0]):
        images.save_png(folder / f"scene{i}.png", picture)
    tune = ["edit", "--image", str(folder), "--source", "red", "--target", "blue"]
    tune += ["--preset", "tiny", "--out", str(tmp_path / "tuned"), "--config.edit.epochs=1"]
    assert main(tune) == 0
    saved = tmp_path / "tuned" / "edit.safetensors"
    assert saved.is_file() and (tmp_path / "tuned" / "grid.png").is_file()
    assert len(list((tmp_path / "tuned" / "latents").glob("*.npy"))) == 2  # inverted once
    out = tmp_path / "applied"
    apply = ["edit", "--image", str(folder), "--edit", str(saved), "--gamma", "0.5", "1"]
    assert main([*apply, "--out", str(out)]) == 0
    assert (out / "scene0_red-blue_gamma0.5.png").is_file()
    combine = ["edit", "--image", str(folder / "scene1.png"), "--out", str(tmp_path / "both")]
    combine += ["--combine", f"{saved}:1,0.3", f"{saved}:0,0.7", "--thresholds", "200,0"]
    assert main(combine) == 0
    assert main([*combine[:5], "--combine", f"{saved}:1,0", "--thresholds", "0"]) == 2

    found = edit_pipeline.load_edit(saved)
    assert len(found.base_fingerprint) == 24
    config = found.config
    config.evals.oracle.update(num_examples=8, batch_size=8)
    config.data.folder = ""  # scored on the shapes world's held-out scenes, not the inputs
    evaluate = registry.training_evaluators(config)["oracle"]
    state = type("State", (), {"ema": {"ema": found.params}, "params": found.params})
    scores = evaluate(state)
    keys = {"applied", "kept", "both", "kept_vs_input", "l1", "reconstruction_l1"}
    keys |= {"reconstruction_whole", "oracle_inputs"}
    assert {f"heldout/{key}" for key in keys | {"directional_cosine"}} <= set(scores)
    assert all(0.0 <= scores[f"heldout/{key}"] <= 2.0 for key in keys)


def test_unet_stage_trains_on_a_folder_and_its_paper_preset_is_the_public_ddpm(tmp_path):
    from clipgen import build, images
    from clipgen.train import loop, unet

    paper = config_lib.load_preset("unet", "paper")
    shapes_of = jax.eval_shape(
        lambda k: nn.meta.unbox(init_unet(build.module(paper), k, 256)), jax.random.key(0)
    )
    count = sum(leaf.size for leaf in jax.tree.leaves(shapes_of))
    assert round(count / 1e6, 1) == 113.7  # google/ddpm-celebahq-256's 113.7M parameters

    folder = tmp_path / "images"
    for i, picture in enumerate(edit.shapes_with(None, "train", 3, 24)[0]):
        images.save_png(folder / f"{i}.png", picture)
    config = config_lib.load_preset("unet", "tiny")
    config.data.folder = str(folder)
    config.preview_every = 2
    stage = unet.make_stage(config)
    batch = next(stage.batches(0, 8))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].min() >= -1.0
    state = loop.train(config, tmp_path / "run", stage)
    assert int(state.step) == 4 and np.isfinite(float(jax.device_get(state.step)))
    preview = stage.preview(state)["samples"]
    assert preview.shape == (1, 16, 16 * 8, 3) and preview.dtype == np.uint8
