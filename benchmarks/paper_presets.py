"""The paper-scale presets, checked without training: parameter counts against unCLIP's
Table 3 (Kandinsky 2.2's 1B prior for the pOps operator, OpenCLIP's ViT-H/14 for CLIP),
and each train step lowered (`jax.jit(...).lower`) on a mesh of fake CPU devices with
FSDP, with the parameter and optimizer-state bytes every device holds (the operator also
with LoRA adapters).

  python benchmarks/paper_presets.py [--devices=64] [--fsdp=8] [--clip-tokenizer=...]

Prints one JSON line per preset. Runs in a fresh process: it sets the fake device count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import paper_step  # benchmarks/ is on sys.path

# (config file, preset, the paper's parameter count, config overrides)
PRESETS = (
    ("clip", "paper", 986e6, {}),  # OpenCLIP's ViT-H/14: 632M image + 354M text tower
    ("prior", "paper", 1.0e9, {}),
    ("ar_prior", "paper", 1.0e9, {}),
    ("decoder", "paper", 3.5e9, {}),
    ("upsampler", "paper", 700e6, {}),
    ("upsampler", "second_paper", 300e6, {}),
    ("operator", "paper,union", 1.0e9, {}),
    ("operator", "paper,union", 1.0e9, {"lora.rank": 16}),
)


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--fsdp", type=int, default=8)
    parser.add_argument("--clip-tokenizer", default="", help=paper_step.CLIP_TOKENIZER_HELP)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax

    results = []
    for stage_name, preset, paper_count, overrides in PRESETS:
        config = paper_step.paper_config(
            stage_name, preset, args.devices, args.fsdp, args.clip_tokenizer, **overrides
        )
        start = time.perf_counter()
        run = paper_step.prepare(config, compile_step=False)
        seconds = time.perf_counter() - start
        params = run.abstract_state.params
        count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
        if stage_name == "operator" and config.lora.rank:
            count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params["base"]))
        per_device = _bytes_per_device(params, run.state_shardings.params)
        optimizer = _bytes_per_device(run.abstract_state.opt_state, run.state_shardings.opt_state)
        result = {
            "config": f"configs/{stage_name}.py:{preset}",
            "overrides": overrides,
            "parameters": count,
            "paper_parameters": paper_count,
            "ratio_to_paper": round(count / paper_count, 3),
            "mesh": dict(run.mesh.shape),
            "global_batch": int(config.batch_size),
            "param_bytes_per_device": per_device,
            "param_gib_per_device": round(per_device / 2**30, 3),
            "optimizer_bytes_per_device": optimizer,
            "optimizer_gib_per_device": round(optimizer / 2**30, 3),
            "lowered": True,
            "lower_s": round(seconds, 2),
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _bytes_per_device(tree, shardings) -> int:
    """What one device holds of `tree` (ShapeDtypeStructs) under `shardings`."""
    import jax

    return sum(
        math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


if __name__ == "__main__":
    main(sys.argv[1:])
