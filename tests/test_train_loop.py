"""The shared training loop, driven by the small denoiser stage in denoiser_stage.py."""

import logging
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
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from clipgen import checkpoint, cli, parallel
from clipgen import config as config_lib
from clipgen.train import loop

import denoiser_stage

ROOT = Path(__file__).parents[1]
TESTS = Path(__file__).parent


def _config(**changes):
    config = denoiser_stage.get_config()
    for key, value in changes.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config


def _train(workdir, devices=None, **changes):
    config = _config(**changes)
    return loop.train(config, workdir, denoiser_stage.make_stage(config), devices)


def _losses(workdir) -> dict[int, float]:
    """The loss scalars a run wrote to TensorBoard, by step."""
    events = event_accumulator.EventAccumulator(str(workdir))
    events.Reload()
    return {
        event.step: float(tensor_util.make_ndarray(event.tensor_proto))
        for event in events.Tensors("loss")
    }


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _assert_trees_close(a, b, **tolerance):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(_host(a)),
        jax.tree_util.tree_leaves(_host(b)),
        strict=True,
    ):
        np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tolerance)


def _restore(workdir, **changes):
    """A finished run's final state, read back on one device."""
    return _train(workdir, jax.devices()[:1], **changes)


def _cli(workdir, *overrides, env=None, **popen):
    command = [
        sys.executable,
        "-m",
        "clipgen.cli",
        "train",
        f"--config={TESTS / 'denoiser_stage.py'}",
        f"--workdir={workdir}",
        *overrides,
    ]
    environment = dict(os.environ, PYTHONPATH=str(TESTS), TF_CPP_MIN_LOG_LEVEL="2")
    environment.pop("XLA_FLAGS", None)
    environment.update(env or {})
    return subprocess.Popen(command, env=environment, cwd=ROOT, text=True, **popen)


def test_sharded_run_equals_single_device_run(tmp_path):
    single = _train(tmp_path / "single", jax.devices()[:1])
    sharded = _train(tmp_path / "sharded", None, **{"mesh.data": 2, "mesh.fsdp": 4})
    kernel = sharded.params["conv_mid"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, None, None, "fsdp")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(3, 3, 16, 4)}
    assert sharded.opt_state[1][0].mu["conv_mid"]["kernel"].sharding.spec == kernel.sharding.spec
    _assert_trees_close(single.params, sharded.params, rtol=2e-5, atol=2e-6)
    _assert_trees_close(single.ema, sharded.ema, rtol=2e-5, atol=2e-6)
    single_losses, sharded_losses = _losses(tmp_path / "single"), _losses(tmp_path / "sharded")
    assert sorted(single_losses) == [2, 4, 6]
    for step, value in single_losses.items():
        assert sharded_losses[step] == pytest.approx(value, rel=1e-5)


def test_bf16_compute_and_sample_previews(tmp_path):
    state = _train(tmp_path, jax.devices()[:1], preview_every=3, **{"model.dtype": "bfloat16"})
    assert state.params["conv_mid"]["kernel"].dtype == np.float32  # parameters stay f32
    losses = _losses(tmp_path)
    assert sorted(losses) == [2, 4, 6] and all(np.isfinite(list(losses.values())))
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    previews = events.Tensors("samples")
    assert [event.step for event in previews] == [3, 6]


def test_the_loop_runs_the_evaluators_handed_to_it(tmp_path):
    config = _config(eval_every=3)
    seen = []

    def probe(state):
        seen.append(int(jax.device_get(state.step)))
        return {"probe/mean_kernel": float(jnp.mean(state.params["conv_mid"]["kernel"]))}

    state = loop.train(
        config, tmp_path, denoiser_stage.make_stage(config), jax.devices()[:1],
        evaluators={"probe": probe},
    )  # fmt: skip
    assert seen == [3, 6]
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    logged = events.Tensors("probe/mean_kernel")
    assert [event.step for event in logged] == [3, 6]
    final = float(tensor_util.make_ndarray(logged[-1].tensor_proto))
    assert final == pytest.approx(float(jnp.mean(state.params["conv_mid"]["kernel"])))


def test_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    devices = jax.devices()[:1]
    reference = _train(tmp_path / "reference", devices, total_steps=4)
    _train(tmp_path / "run", devices, total_steps=4)
    latest = tmp_path / "run" / "checkpoints" / "4"
    for file in (latest / "state").rglob("*"):
        if file.is_file():
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        resumed = _train(tmp_path / "run", devices, total_steps=4)
    assert any(str(latest) in record.getMessage() for record in caplog.records)
    assert list((tmp_path / "run" / "checkpoints").glob("unreadable-4-*")), "kept aside"
    _assert_trees_close(reference.params, resumed.params, rtol=0, atol=0)


def test_checkpoints_keep_the_latest_n_and_every_kth(tmp_path):
    _train(
        tmp_path,
        jax.devices()[:1],
        total_steps=9,
        **{"checkpoint.every": 1, "checkpoint.keep": 2, "checkpoint.keep_every": 4},
    )
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [4, 8, 9]


def test_checkpoint_of_another_model_fails_naming_the_keys(tmp_path):
    _train(tmp_path, jax.devices()[:1], total_steps=2)
    with pytest.raises(
        checkpoint.CheckpointMismatchError, match=r"model\.channels: checkpoint 16 vs config 8"
    ):
        _train(tmp_path, jax.devices()[:1], total_steps=2, **{"model.channels": 8})


def test_nonfinite_loss_stops_naming_the_step_and_last_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteError, match=r"at step 3;.*checkpoints/2 \(step 2\)"):
        _train(tmp_path, jax.devices()[:1], log_every=1, **{"data.nan_at_batch": 3})


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path):
    state = _train(tmp_path, jax.devices()[:1], on_nonfinite="skip", **{"data.nan_at_batch": 3})
    assert int(state.nonfinite_steps) == 1 and int(state.first_nonfinite_step) == 3
    assert int(state.step) == 6
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(_host(state.params)))


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    total = 30
    steps = [f"--config.total_steps={total}", "--config.checkpoint.every=1", "--config.log_every=1"]
    assert _cli(tmp_path / "straight", *steps).wait(timeout=300) == 0

    victim = _cli(tmp_path / "killed", *steps, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    delay = np.random.default_rng().uniform(0.0, 1.5)
    deadline = time.monotonic() + 240
    while not any(p.name.isdigit() for p in checkpoints.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    killed_at = max(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
    assert killed_at < total, "the run ended before the kill: nothing was tested"
    assert _cli(tmp_path / "killed", *steps).wait(timeout=300) == 0

    straight = _restore(tmp_path / "straight", total_steps=total)
    resumed = _restore(tmp_path / "killed", total_steps=total)
    assert int(resumed.step) == total
    _assert_trees_close(straight.params, resumed.params, rtol=0, atol=0)
    _assert_trees_close(straight.ema, resumed.ema, rtol=0, atol=0)
    _assert_trees_close(straight.opt_state, resumed.opt_state, rtol=0, atol=0)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    run = _cli(
        tmp_path,
        "--config.total_steps=100000",
        "--config.checkpoint.every=100000",
        "--config.log_every=1",
        stderr=subprocess.PIPE,
    )
    events = tmp_path
    deadline = time.monotonic() + 240
    while not list(events.glob("events.out.tfevents*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr[-2000:]
    message = [line for line in stderr.splitlines() if "pre-empted at step" in line]
    assert message, stderr[-2000:]
    step = int(message[-1].split("pre-empted at step ")[1].split(";")[0])
    saved = [int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]
    assert saved == [step] and 0 < step < 100000


@pytest.mark.slow
def test_sigterm_at_ten_random_moments_exits_0_and_resumes_to_the_same_state(tmp_path):
    """Each run of a chain is stopped at a random moment from 0.3 s (Python has run
    clipgen's first line) to the length of a whole run, so start-up, restore, compile,
    steps, saves and the end all get hit; each chain is resumed to its end and compared
    with the uninterrupted run. The runs share a compilation cache, so that steps, not
    compiling, fill most of each."""
    total = 300
    steps = [
        f"--config.total_steps={total}",
        "--config.checkpoint.every=20",
        "--config.log_every=20",
    ]
    cache = {  # its own cache, small enough to keep every program
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    assert _cli(tmp_path / "straight", *steps, env=cache).wait(timeout=300) == 0
    began = time.monotonic()
    assert _cli(tmp_path / "timed", *steps, env=cache).wait(timeout=300) == 0
    whole_run = time.monotonic() - began
    straight = _restore(tmp_path / "straight", total_steps=total)

    def assert_resumes_to_the_straight_state(workdir):
        assert _cli(workdir, *steps, env=cache).wait(timeout=300) == 0
        resumed = _restore(workdir, total_steps=total)
        assert int(resumed.step) == total
        _assert_trees_close(straight.params, resumed.params, rtol=0, atol=0)
        _assert_trees_close(straight.ema, resumed.ema, rtol=0, atol=0)
        _assert_trees_close(straight.opt_state, resumed.opt_state, rtol=0, atol=0)

    outcomes, chains = [], [tmp_path / "chain0"]
    for moment in np.random.default_rng(0).uniform(0.3, whole_run, size=10):
        run = _cli(chains[-1], *steps, env=cache, stderr=subprocess.PIPE)
        time.sleep(moment)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, f"SIGTERM at {moment:.2f} s: rc {run.returncode}\n{stderr}"
        said = [
            line for line in stderr.splitlines() if "terminated" in line or "pre-empted" in line
        ]
        outcomes.append(f"{moment:5.2f} s: {said[-1].split(': ', 1)[-1] if said else 'finished'}")
        if not said:
            assert_resumes_to_the_straight_state(chains[-1])
            chains.append(tmp_path / f"chain{len(chains)}")
    print(f"whole run {whole_run:.1f} s; SIGTERM at", *outcomes, sep="\n")
    assert any("pre-empted at step" in outcome for outcome in outcomes), outcomes
    assert any("nothing" in outcome for outcome in outcomes), outcomes
    assert_resumes_to_the_straight_state(chains[-1])


def test_deadline_stops_after_saving_and_the_run_resumes_to_the_end(tmp_path):
    config = _config()
    stage = denoiser_stage.make_stage(config)
    stopped = loop.train(config, tmp_path, stage, jax.devices()[:1], deadline=time.time() - 1)
    assert int(stopped.step) == 1  # a passed deadline still lets one step run, then saves
    assert list(_losses(tmp_path)) == [1]  # and logs the metrics of the steps it ran
    saved = checkpoint.Checkpointer(tmp_path / "checkpoints")
    assert saved.all_steps() == [1]
    saved.close()
    steps_seen = []
    resumed = loop.train(config, tmp_path, stage, jax.devices()[:1], hooks=[steps_seen.append])
    assert int(resumed.step) == config.total_steps
    assert steps_seen == list(range(2, config.total_steps + 1))  # the hook sees each new step
    _assert_trees_close(resumed.params, _restore(tmp_path / "whole").params, rtol=1e-6)


def test_config_typo_fails_before_anything_compiles(tmp_path):
    started = time.monotonic()
    run = _cli(tmp_path, "--config.optim.lrr=1", stderr=subprocess.PIPE)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 2
    assert "lrr" in stderr and 'Did you mean "lr"' in stderr
    assert not (tmp_path / "checkpoints").exists()
    logging.info("config typo rejected in %.2f s", time.monotonic() - started)


def test_presets_resolve_with_the_working_directory_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not Path("configs/prior.py").exists()
    config = cli.load_config(["--config=configs/prior.py:tiny", "--config.total_steps=7"])
    assert config.stage == "prior" and config.total_steps == 7
    assert config.model.to_dict() == config_lib.load_preset("prior", "tiny").model.to_dict()
    spaced = cli.load_config(["--config", "configs/upsampler.py:second_tiny"])
    assert spaced.data.corruption == "bsr"
    with pytest.raises(ValueError):  # no such config file anywhere
        cli.load_config(["--config=configs/nosuch.py:tiny"])


def test_bad_config_values_fail_naming_the_key(tmp_path):
    run = _cli(tmp_path, "--config.total_steps=abc", stderr=subprocess.PIPE)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 2 and "config.total_steps" in stderr
    run = _cli(tmp_path, "--config.on_nonfinite=ignore", stderr=subprocess.PIPE)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 2 and "config.on_nonfinite" in stderr


def test_two_processes_equal_one_process(tmp_path):
    port = __import__("portpicker").pick_unused_port()
    overrides = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]
    workers = [
        _cli(
            tmp_path / "two",
            *overrides,
            env={
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(rank),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=300)[1] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [w.returncode for w in workers] == [0, 0], [o[-3000:] for o in outputs]
    one = _train(tmp_path / "one", None, **{"mesh.data": 2, "mesh.fsdp": 4})
    two = _restore(tmp_path / "two")
    _assert_trees_close(one.params, two.params, rtol=2e-5, atol=2e-6)
    assert _losses(tmp_path / "two").keys() == _losses(tmp_path / "one").keys()


def test_mesh_shapes_and_fsdp_fallback():
    assert parallel.mesh_shape({"data": -1, "fsdp": 4}, 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        parallel.mesh_shape({"model": 2}, 8)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    assert parallel.fsdp_spec((64, 512), mesh, 1024) == jax.P(None, "fsdp")
    assert parallel.fsdp_spec((6, 10), mesh, 1) == jax.P()  # nothing divides by 4
    assert parallel.fsdp_spec((8, 8), mesh, 1024) == jax.P()  # too small to shard
