"""benchmarks/device_check.sh runs to completion without an accelerator (its smoke mode),
so that the accelerator check cannot rot, and writes the records its docstring documents."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
TRAIN_STEP_FIELDS = {
    "preset", "dtype", "devices", "platform", "global_batch", "compile_s", "step_s",
    "examples_per_s", "step_gflop_per_device", "mfu", "matmul_peak_tflops",
    "compiled_memory_gib", "peak_memory_gib",
}  # fmt: skip


@pytest.mark.slow
def test_device_check_smoke_mode_writes_every_record(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    records = [
        json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()
    ]
    kinds = [record["record"] for record in records]
    assert "error" not in kinds, [r for r in records if r["record"] == "error"]
    assert kinds == ["machine", "train_step", "train_step", "cascade_sampling"]
    steps = [r for r in records if r["record"] == "train_step"]
    assert {r["dtype"] for r in steps} == {"bfloat16", "float32"}
    for record in steps:
        assert TRAIN_STEP_FIELDS <= set(record) and record["peak_memory_gib"] is None
        assert record["step_s"] > 0 and record["compiled_memory_gib"] > 0 and record["mfu"] > 0
    sampling = records[-1]
    assert sampling["captions"] == 4 and sampling["seconds"] > 0 and sampling["resolution"] >= 32
