"""The prior stages: sharded steps, best-of-N, AR codes, the evaluator, resume via the CLI."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipgen import build
from clipgen import config as config_lib
from clipgen.data import embeddings, shapes
from clipgen.eval.evaluators.prior_retrieval import CONDITION_FIELDS
from clipgen.eval.prior import matching_retrieval, prior_metrics
from clipgen.models import ar_prior
from clipgen.models.prior import init_prior
from clipgen.sampling import sample_prior, select_best
from clipgen.train import ar_prior as ar_stage
from clipgen.train import loop
from clipgen.train import prior as prior_stage

from sharded import assert_sharded_equals_one_device

ROOT = Path(__file__).parents[1]


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.mark.parametrize("stage_name", ["prior", "ar_prior"])
def test_sharded_loss_and_gradient_equal_one_device(stage_name, mesh8):
    config = config_lib.load_preset(stage_name, "tiny")
    stage = {"prior": prior_stage, "ar_prior": ar_stage}[stage_name].make_stage(config)
    assert_sharded_equals_one_device(
        stage, mesh8, 16, loss_rtol=1e-5, grad_rtol=1e-4, grad_atol=1e-6
    )


def test_frozen_statistics_never_move_and_the_run_is_sharded(tmp_path):
    config = config_lib.load_preset("prior", "tiny")
    config.mesh = dict(data=2, fsdp=4, tensor=1)
    stage = prior_stage.make_stage(config)
    state = loop.train(config, tmp_path, stage)
    first = nn.meta.unbox(stage.init_params(jax.random.key(0)))
    trained = _host(state.params)
    np.testing.assert_array_equal(trained["clip_mean"], np.asarray(first["clip_mean"]))
    np.testing.assert_array_equal(trained["clip_std"], np.asarray(first["clip_std"]))
    train = embeddings.training_split(config)
    np.testing.assert_allclose(trained["clip_mean"][0], train["image_embeds"].mean(0), atol=1e-6)
    moved = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(first), strict=True)
    ]
    assert sum(moved) == len(moved) - 2


def test_select_best_keeps_the_candidate_with_the_larger_dot_product():
    text = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    candidates = jnp.array(
        [
            [[0.2, 0.9], [0.9, 0.1]],  # caption 0: the second has the larger dot (0.9)
            [[0.1, 0.7], [0.9, 0.3]],  # caption 1: the first (0.7 > 0.3)
            [[1.0, 0.0], [0.0, 1.0]],  # caption 2: the second (0.8 > 0.6)
        ]
    )
    chosen = np.asarray(select_best(candidates, text))
    np.testing.assert_array_equal(chosen, np.asarray(candidates)[[0, 1, 2], [1, 0, 1]])


def test_best_of_two_sample_is_the_better_of_its_own_candidates():
    config = config_lib.load_preset("prior", "tiny")
    module = build.module(config)
    params = nn.meta.unbox(init_prior(module, jax.random.key(1)))["params"]
    train = embeddings.training_split(config)
    cond = {k: train[k][:6] for k in CONDITION_FIELDS}
    diffusion = build.diffusion(config, "4")
    chosen, candidates = jax.jit(
        lambda p, c, r: sample_prior(
            module, p, diffusion, c, r, best_of=2, guidance_scale=3.0, return_candidates=True
        )
    )(params, cond, jax.random.key(2))
    candidates, chosen = np.asarray(candidates), np.asarray(chosen)
    assert candidates.shape == (6, 2, config.model.embedding_dim)
    assert not np.allclose(candidates[:, 0], candidates[:, 1])
    dots = np.einsum("bnd,bd->bn", candidates, cond["text_embed"])
    np.testing.assert_array_equal(chosen, candidates[np.arange(6), dots.argmax(1)])


def test_pca_quantisation_round_trip_is_within_half_a_bucket():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    text = rng.standard_normal((400, 6))
    config = ar_prior.ARPriorConfig(
        width=8, heads=2, layers=1, embedding_dim=6, num_codes=6, num_buckets=50,
        num_dot_buckets=8, num_text_tokens=3, text_token_dim=4,
    )  # fmt: skip
    stats = ar_prior.fit_statistics(image, text, config)
    buckets = ar_prior.quantize(jnp.asarray(image, jnp.float32), stats, 50)
    assert int(buckets.min()) == 0 and int(buckets.max()) == 49
    back = np.asarray(ar_prior.dequantize(buckets, stats, 50))
    # With every PCA dimension kept, the error is the quantisation alone: per code at most
    # half a bucket; the components are orthonormal, so the norms agree.
    half_bucket = (stats["code_high"] - stats["code_low"]) / 100
    codes_error = (back - image) @ stats["pca_components"].T
    assert np.all(np.abs(codes_error) <= half_bucket + 1e-4)
    dots = np.sum(image * text, -1)
    counts = np.bincount(np.asarray(ar_prior.dot_bucket(image, text, stats["dot_edges"])))
    assert len(counts) == 8 and counts.min() >= 45  # equal-count buckets of 400 / 8
    assert dots.shape == (400,)


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draws = np.asarray(ar_prior.top_p_sample(jax.random.key(0), logits, 0.7))
    assert set(np.unique(draws)) == {0, 1}  # 0.5 < 0.7 <= 0.8: the first two
    assert 0.55 < np.mean(draws == 0) < 0.70  # renormalised 0.5 / 0.8 = 0.625
    greedy = np.asarray(ar_prior.top_p_sample(jax.random.key(1), logits[:5], 1e-6))
    assert np.all(greedy == 0)


def test_ar_sampling_decodes_codes_through_the_pca():
    config = config_lib.load_preset("ar_prior", "tiny")
    stage = ar_stage.make_stage(config)
    params = nn.meta.unbox(stage.init_params(jax.random.key(0)))
    module = build.module(config)
    train = embeddings.training_split(config)
    cond = {k: train[k][:4] for k in CONDITION_FIELDS}
    sampled = np.asarray(ar_prior.sample_ar_prior(module, params, cond, jax.random.key(1)))
    stats = {k: np.asarray(v) for k, v in params.items() if k in ar_prior.STATISTICS}
    codes = (sampled - stats["pca_mean"]) @ stats["pca_components"].T
    assert sampled.shape == (4, config.model.embedding_dim)
    # Every sampled code sits at a bucket centre of its dimension's range.
    width = (stats["code_high"] - stats["code_low"]) / config.model.num_buckets
    offsets = (codes - stats["code_low"]) / width - 0.5
    np.testing.assert_allclose(offsets, np.round(offsets), atol=1e-3)


def test_matching_retrieval_judges_by_scene_not_by_index():
    red = shapes.parse("a small red circle in the centre on a white background")
    blue = shapes.parse("a small blue circle in the centre on a white background")
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    queries = np.array([[0.9, 0.1], [0.8, 0.3]])
    # Query 1 retrieves image 0, which shows the same scene as its own caption's: right.
    result = matching_retrieval(queries, gallery, [red, red], [red, blue, blue])
    assert result["whole"] == 1.0
    result = matching_retrieval(queries, gallery, [red, blue], [red, blue, blue])
    assert result["whole"] == 0.5 and result["shape"] == 1.0
    metrics = prior_metrics(gallery[:2], gallery[:2], gallery[:2], [red, blue], [red, blue])
    assert metrics["cosine_to_image"] == pytest.approx(1.0)
    assert metrics["retrieval"] == metrics["text_baseline_retrieval"] == 1.0


def _cli(stage, workdir, *overrides, **popen):
    command = [
        sys.executable, "-m", "clipgen.cli", "train",
        f"--config={ROOT / 'configs' / stage}.py:tiny",
        f"--workdir={workdir}", "--config.total_steps=12", "--config.checkpoint.every=1",
        "--config.log_every=1", *overrides,
    ]  # fmt: skip
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    environment.pop("XLA_FLAGS", None)
    return subprocess.Popen(command, env=environment, cwd=ROOT, text=True, **popen)


@pytest.mark.parametrize("stage_name", ["prior", "ar_prior"])
def test_cli_run_resumes_after_sigterm_to_the_same_state(stage_name, tmp_path):
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    assert _cli(stage_name, tmp_path / "straight", **quiet).wait(timeout=300) == 0
    run = _cli(stage_name, tmp_path / "stopped", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    deadline = time.monotonic() + 240
    while not any(p.name.isdigit() for p in checkpoints.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr[-2000:]
    stopped_at = max(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
    assert stopped_at < 12, "the run ended before the signal: nothing was tested"
    assert _cli(stage_name, tmp_path / "stopped", **quiet).wait(timeout=300) == 0

    config = config_lib.load_preset(stage_name, "tiny")
    config.total_steps = 12
    stage = {"prior": prior_stage, "ar_prior": ar_stage}[stage_name].make_stage(config)
    straight = loop.train(config, tmp_path / "straight", stage, jax.devices()[:1])
    resumed = loop.train(config, tmp_path / "stopped", stage, jax.devices()[:1])
    assert int(resumed.step) == 12
    for part in ("params", "ema", "opt_state"):
        a, b = _host(getattr(straight, part)), _host(getattr(resumed, part))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
