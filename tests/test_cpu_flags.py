"""clipgen's XLA:CPU flags: set on import, effective, and a user's own setting kept."""

import os
import subprocess
import sys
import textwrap

import pytest

# Compiles a 3x3 convolution's kernel gradient (the program's only heavy op) and prints the
# XLA flags and whether XLA gave any of it to YNNPACK.
_PROBE = textwrap.dedent(
    """
    import os
    import clipgen
    import jax, jax.numpy as jnp
    x = jnp.ones((4, 32, 32, 32)); w = jnp.ones((3, 3, 32, 32))
    conv = lambda w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    grad = jax.jit(jax.grad(lambda w: conv(w).sum())).lower(w).compile().as_text()
    print(os.environ["XLA_FLAGS"]); print("ynn-convolution" if "__ynn_fusion" in grad else "other")
    """
)


def _probe(xla_flags: str) -> list[str]:
    env = {**os.environ, "XLA_FLAGS": xla_flags}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-2:]


@pytest.mark.parametrize("user_flags", ["", "--xla_force_host_platform_device_count=2"])
def test_import_moves_convolutions_off_ynnpack(user_flags):
    flags, kernel = _probe(user_flags)
    assert "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution" in flags
    assert user_flags in flags
    assert kernel == "other"


def test_users_own_ynn_setting_wins():
    flags, kernel = _probe("--xla_cpu_experimental_ynn_fusion_type=-individual_dot")
    assert flags == "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    assert kernel == "ynn-convolution"
