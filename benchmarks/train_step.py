"""Train-step benchmark for any stage preset: compile time, step time, throughput, MFU.

  python benchmarks/train_step.py --config=configs/<stage>.py:<preset> [--config.k=v ...]
      [--steps=20] [--warmup=3]

Prints one JSON line. MFU is the step's FLOPs (XLA's cost analysis of the compiled step,
per device) over the median step time, divided by the per-device float32 matmul peak that
this script measures in the same run with the same library.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from clipgen import demo, train
from clipgen.cli import load_config


def matmul_peak_flops(size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """The best of `repeats` (size x size) @ (size x size) products in `dtype`, in FLOP/s,
    on one device."""
    import jax

    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    product = jax.jit(jax.numpy.matmul)
    product(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def step_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def step_times(run, stage, batch_size: int, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` compiled train steps (`loop.prepare`'s run) after
    `warmup` untimed ones, from a fresh state."""
    import jax

    from clipgen import parallel

    state, batches, times = run.init_state(), stage.batches(0, batch_size), []
    with jax.set_mesh(run.mesh):
        for index in range(warmup + steps):
            batch = parallel.global_batch(next(batches), run.mesh)
            start = time.perf_counter()
            state, metrics = run.step(state, batch)
            jax.block_until_ready((state, metrics))
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return times


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args, config_args = parser.parse_known_args(argv)
    config = load_config(config_args)

    import jax

    from clipgen.train import loop

    stage = train.trainer(config.stage).make_stage(config)
    run = loop.prepare(config, stage)
    times = step_times(run, stage, config.batch_size, args.steps, args.warmup)
    median = statistics.median(times)
    flops = step_flops(run.step)
    peak = matmul_peak_flops()
    result = {
        "stage": stage.name,
        "config": " ".join(config_args).replace("--config=", ""),
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "machine": demo.machine(),
        "global_batch": int(config.batch_size),
        "compile_s": round(run.compile_seconds, 3),
        "step_s_median": round(median, 5),
        "examples_per_s": round(config.batch_size / median, 2),
        "step_gflop_per_device": round(flops / 1e9, 4),
        "achieved_gflops_per_device": round(flops / median / 1e9, 3),
        "matmul_peak_gflops_per_device": round(peak / 1e9, 2),
        "mfu": round(flops / median / peak, 4),
        "steps_timed": len(times),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
