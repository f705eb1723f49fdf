"""clipgen: image generation from CLIP latents (unCLIP, pOps, DiffusionCLIP) in JAX."""

import os

__version__ = "0.1.0"

# XLA:CPU hands convolutions to YNNPACK by default, whose kernel (weight) gradient of a 3x3
# convolution (batch 8, 64 px, 128 channels) ran at 57 GFLOP/s on a 2-core x86 machine,
# against 189 for Eigen's; this flag sends lone convolutions to Eigen and made the decoder
# bench step 1.6x faster. XLA reads XLA_FLAGS when JAX starts its first backend, so this
# only takes effect if clipgen is imported before any computation. Other backends ignore
# xla_cpu_ flags; a ynn setting the user already put in XLA_FLAGS wins.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def _add_cpu_xla_flags() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags


_add_cpu_xla_flags()
