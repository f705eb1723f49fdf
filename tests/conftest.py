"""Test set-up: 8 fake CPU devices (so sharded code runs on a real mesh), clipgen's XLA:CPU
flags and a persistent compilation cache (so a program is compiled once for the whole suite,
and reruns skip XLA compiles). All must happen before JAX starts."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for both pytest-xdist workers and every process a test
# starts (they inherit this environment): the CLI runs of a test compile the same programs
# again and again. A size limit turns on JAX's file lock around each cache read and write,
# which is what lets concurrent processes share one directory; but then every write scans
# the whole cache (jax/_src/lru_cache.py, _evict_if_needed), so it keeps only programs that
# took a second or more to compile: caching every small one made the suite's writes
# quadratic in their number (0.2 s a write at 1,500 entries).
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=os.environ.get(
        "CLIPGEN_TEST_JAX_CACHE", str(Path(__file__).parents[1] / ".jax_cache")
    ),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    JAX_COMPILATION_CACHE_MAX_SIZE=str(16 << 30),
)

import jax  # noqa: E402
import pytest  # noqa: E402

import clipgen  # noqa: E402, F401  (adds clipgen's XLA:CPU flags before JAX starts)


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D mesh over the 8 fake CPU devices, axis 'data'."""
    devices = jax.devices()
    assert len(devices) == 8, "conftest must set the device count before JAX starts"
    return jax.sharding.Mesh(devices, ("data",))
