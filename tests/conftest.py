"""Test set-up: 8 fake CPU devices (so sharded code runs on a real mesh), clipgen's XLA:CPU
flags and a persistent compilation cache (so reruns skip XLA compiles). All must happen
before JAX starts."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

import clipgen  # noqa: E402, F401  (adds clipgen's XLA:CPU flags before JAX starts)

# One cache per pytest-xdist worker: the cache's files are not written atomically.
_CACHE = Path(
    os.environ.get("CLIPGEN_TEST_JAX_CACHE", Path(__file__).parents[1] / ".jax_cache")
) / os.environ.get("PYTEST_XDIST_WORKER", "main")
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D mesh over the 8 fake CPU devices, axis 'data'."""
    devices = jax.devices()
    assert len(devices) == 8, "conftest must set the device count before JAX starts"
    return jax.sharding.Mesh(devices, ("data",))
