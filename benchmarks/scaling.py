"""Paper-size plans: each paper preset's train step compiled for a target mesh simulated with
fake CPU devices, with and without remat, and what one device of it holds (XLA's memory
analysis of the compiled step: parameters, optimizer state and EMA as arguments, the
activations as temporaries), its FLOPs per step (XLA's cost analysis, per device), and the
step time and days for the paper's iteration count at a stated MFU of the chip's bf16 peak.

  python benchmarks/scaling.py --target=v5p-256 [--presets=prior,decoder,...] [--mfu=0.4]
  python benchmarks/scaling.py --target=h100x64 --presets=decoder --remat=on
  python benchmarks/scaling.py --target=h100x64 --presets=upsampler --unpartitioned

Prints one JSON line per preset and remat setting; docs/scaling.md holds the table of both
targets. `--unpartitioned` compiles one device's share of the target's batch on a single
device, without SPMD partitioning: the FLOPs the partitioned step should count per device.
Runs in a fresh process: it sets the fake device count. The memory figures are the
CPU compiler's (its fusion differs from the accelerators'; arguments are exact, temporaries
an estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import paper_step  # benchmarks/ is on sys.path

# devices JAX sees, bf16 matmul peak per device (FLOP/s), memory per device (GiB)
TARGETS = {
    "v5p-256": dict(devices=128, peak=459e12, memory_gib=95.0, fsdp=16),  # 128 chips
    "h100x64": dict(devices=64, peak=989e12, memory_gib=80.0, fsdp=8),  # SXM, dense bf16
}
# (config file, preset, the paper's iterations)
PRESETS = {
    "clip": ("clip", "paper", 400_000),
    "prior": ("prior", "paper", 600_000),
    "ar_prior": ("ar_prior", "paper", 1_000_000),
    "decoder": ("decoder", "paper", 800_000),
    "upsampler": ("upsampler", "paper", 1_000_000),
    "upsampler2": ("upsampler", "second_paper", 1_000_000),
    "operator": ("operator", "paper,union", 100_000),
}


def plan(
    name: str, target: dict, remat: bool, mfu: float, clip_tokenizer: str, unpartitioned: bool
) -> dict:
    import jax

    file, preset, iterations = PRESETS[name]
    devices, fsdp = (1, 1) if unpartitioned else (target["devices"], target["fsdp"])
    config = paper_step.paper_config(file, preset, devices, fsdp, clip_tokenizer)
    if unpartitioned:
        config.batch_size //= target["devices"]
    if "remat" in config.model:
        config.model.remat = remat
    elif "unet" in config.model:
        config.model.unet.remat = remat
    start = time.perf_counter()
    compiled = paper_step.prepare(config).step
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    flops = float(analysis.get("flops", float("nan")))
    arguments = memory.argument_size_in_bytes
    temporaries = memory.temp_size_in_bytes
    total = arguments + memory.output_size_in_bytes - memory.alias_size_in_bytes + temporaries
    step = flops / (mfu * target["peak"])
    return {
        "preset": f"configs/{file}.py:{preset}",
        "target": target["name"],
        "mesh": dict(config.mesh),
        "global_batch": int(config.batch_size),
        "remat": remat,
        "unpartitioned": unpartitioned,
        "state_gib_per_device": round(arguments / 2**30, 2),
        "activation_gib_per_device": round(temporaries / 2**30, 2),
        "total_gib_per_device": round(total / 2**30, 2),
        "fits": total / 2**30 <= target["memory_gib"],
        "tflop_per_step_per_device": round(flops / 1e12, 2),
        "mfu": mfu,
        "step_s": round(step, 3),
        "iterations": iterations,
        "days": round(iterations * step / 86400, 1),
        "compile_s": round(seconds, 1),
        "devices": jax.device_count(),
    }


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(TARGETS), default="h100x64")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--clip-tokenizer", default="", help=paper_step.CLIP_TOKENIZER_HELP)
    parser.add_argument(
        "--remat", choices=("both", "off", "on"), default="both", help="which rows to compile"
    )
    parser.add_argument(
        "--unpartitioned",
        action="store_true",
        help="one device's share of the batch compiled on one device (a FLOP cross-check)",
    )
    args = parser.parse_args(argv)
    remat_settings = {"both": (False, True), "off": (False,), "on": (True,)}[args.remat]
    target = dict(TARGETS[args.target], name=args.target)
    devices = 1 if args.unpartitioned else target["devices"]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    results = []
    for name in args.presets.split(","):
        for remat in remat_settings:
            try:
                result = plan(
                    name, target, remat, args.mfu, args.clip_tokenizer, args.unpartitioned
                )
            except Exception as error:  # noqa: BLE001 - a preset that fails is a finding
                result = dict(preset=name, target=args.target, remat=remat, error=repr(error))
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
