"""The cluster launch scripts run for real in a simulated cluster: launch/slurm.sbatch with a
stand-in `srun` that starts its tasks as local processes, and launch/tpu_pod.sh on every
worker of a stand-in pod slice; each trains the loop's test stage as one multi-process run
that equals the single-process run."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from clipgen.train import loop

import denoiser_stage

ROOT = Path(__file__).parents[1]
TESTS = Path(__file__).parent
ARGS = (f"--config={TESTS / 'denoiser_stage.py'}", "--config.checkpoint.every=6")


def _environment(**extra):
    """What every process inherits: 4 fake CPU devices, the test stage importable, the
    stand-in cluster commands first on PATH, and the checkout's clipgen command."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(TESTS), **extra)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PATH"] = os.pathsep.join(
        [str(TESTS / "cluster"), str(Path(sys.executable).parent), env["PATH"]]
    )
    return env


def _params(workdir):
    """The final params of a run of the test stage in `workdir` (trained there on one
    device first if it holds no finished run)."""
    config = denoiser_stage.get_config()
    state = loop.train(config, workdir, denoiser_stage.make_stage(config), jax.devices()[:1])
    assert int(state.step) == config.total_steps
    return jax.tree.map(np.asarray, state.params)


def _assert_run_equals_single(workdir, single, logs):
    assert "process 0 of 2" in logs and "process 1 of 2" in logs, logs[-3000:]
    for a, b in zip(jax.tree.leaves(_params(workdir)), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_slurm_batch_script_runs_its_tasks_as_one_job(tmp_path):
    if not (ROOT / ".venv" / "bin" / "clipgen").exists():
        pytest.skip("launch/slurm.sbatch runs .venv/bin/clipgen: no .venv here")
    single = _params(tmp_path / "single")
    env = _environment(
        SLURM_JOB_ID=str(portpicker.pick_unused_port()), SLURM_NTASKS="2", SLURM_NNODES="1"
    )
    run = subprocess.run(
        ["bash", "launch/slurm.sbatch", *ARGS, f"--workdir={tmp_path / 'slurm'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_run_equals_single(tmp_path / "slurm", single, run.stderr)


def test_tpu_pod_script_runs_on_every_worker_as_one_job(tmp_path):
    if not (ROOT / ".venv" / "bin" / "clipgen").exists():
        pytest.skip("launch/tpu_pod.sh runs .venv/bin/clipgen: no .venv here")
    single = _params(tmp_path / "single")
    env = _environment(TPU_POD_WORKERS="2", JAX_COORDINATOR_PORT=str(portpicker.pick_unused_port()))
    run = subprocess.run(
        ["tpu_pod_run", "bash", "launch/tpu_pod.sh", *ARGS, f"--workdir={tmp_path / 'pod'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_run_equals_single(tmp_path / "pod", single, run.stderr)
