"""Bit rot in a saved step: for every file of the newest checkpoint (state, EMA, config,
data position, metadata), bytes overwritten in its middle are either detected (the step set
aside, the one before restored, a warning naming it) or provably harmless (what is restored
is bitwise the state that was saved). Inference loading falls back the same way."""

import shutil

import jax
import numpy as np
import pytest

from clipgen import build
from clipgen.train import loop

import denoiser_stage


def _host(tree):
    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(host, tree)


def _run(workdir, total=4):
    config = denoiser_stage.get_config()
    config.total_steps = total
    return loop.train(config, workdir, denoiser_stage.make_stage(config), jax.devices()[:1])


def _damage(path, count=8):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for offset in range(middle, min(middle + count, len(data))):
        data[offset] ^= 0xA5
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run with steps 2 and 4 saved, and its final state."""
    workdir = tmp_path_factory.mktemp("run")
    state = _run(workdir)
    return workdir, _host(state)


def test_every_file_of_a_step_is_checked_or_unread(saved_run, tmp_path, caplog):
    workdir, final = saved_run
    step = workdir / "checkpoints" / "4"
    files = sorted(p.relative_to(step) for p in step.rglob("*") if p.is_file() and p.stat().st_size)
    assert len(files) >= 10 and any(str(f).startswith("ema/d/") for f in files)
    outcomes = {}
    for number, name in enumerate(files):
        copy = tmp_path / f"copy{number}"
        shutil.copytree(workdir, copy)
        _damage(copy / "checkpoints" / "4" / name)
        caplog.clear()
        resumed = _host(_run(copy))  # restores step 4, or sets it aside and redoes 3-4
        detected = any((copy / "checkpoints").glob("unreadable-4-*"))
        if detected:
            assert "unreadable" in caplog.text and "checkpoints/4" in caplog.text
        else:  # undetected damage must not have changed what was restored
            for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(final), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=str(name))
        outcomes[str(name)] = "detected" if detected else "unread or harmless"
    for item in ("state", "ema", "config", "data"):  # what a resume reads is all checked
        assert any(k.startswith(item + "/") and v == "detected" for k, v in outcomes.items()), (
            item,
            outcomes,
        )
    print(outcomes)


def test_damaged_arrays_are_detected_and_inference_falls_back(saved_run, tmp_path, caplog):
    workdir, _ = saved_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    chunks = sorted((copy / "checkpoints" / "4" / "ema" / "d").iterdir())
    for chunk in chunks:
        _damage(chunk, count=64)
    trained = build.restore(copy)
    assert trained.step == 2  # the damaged step 4 passed over
    assert "checkpoints/4" in caplog.text and "trying the one before" in caplog.text
    assert (copy / "checkpoints" / "4").is_dir()  # inference leaves the files as they are
