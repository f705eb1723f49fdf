"""Prior sampling benchmark: one compiled program draws image embeddings for a batch of
captions (respaced steps, classifier-free guidance, best-of-N), on random weights.

  python benchmarks/prior_sampling.py [--config=configs/prior.py:bench] [--captions=32]
      [--steps=64] [--guidance=4.0] [--best-of=1] [--repeats=3]

Prints one JSON line: compile seconds, median run seconds, FLOPs and MFU against the float32
matmul peak measured in the same run. XLA's cost analysis counts a scan's body once, so the
program's FLOPs are those of the same program at one step, times the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from clipgen.cli import load_config


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--best-of", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args, config_args = parser.parse_known_args(argv)
    config = load_config(config_args or ["--config=configs/prior.py:bench"])

    import jax
    from flax import linen as nn
    from train_step import matmul_peak_flops, step_flops  # benchmarks/ is on sys.path

    from clipgen import build
    from clipgen.data.embeddings import synthetic_split
    from clipgen.models.prior import init_prior
    from clipgen.sampling import sample_prior

    module = build.module(config)
    params = nn.meta.unbox(init_prior(module, jax.random.key(0)))["params"]
    model = config.model
    data = synthetic_split(
        args.captions, 1, model.embedding_dim, model.num_text_tokens, model.text_token_dim
    )
    cond = {k: data[k] for k in ("text_embed", "text_tokens", "text_mask")}

    def program(steps: int):
        diffusion = build.diffusion(config, str(steps))

        def draw(params, cond, rng):
            return sample_prior(
                module, params, diffusion, cond, rng, guidance_scale=args.guidance,
                best_of=args.best_of, method="ddpm",
            )  # fmt: skip

        return jax.jit(draw).lower(params, cond, jax.random.key(2)).compile()

    start = time.perf_counter()
    compiled = program(args.steps)
    compile_seconds = time.perf_counter() - start
    times = []
    for repeat in range(args.repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, cond, jax.random.key(repeat)))
        if repeat:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = step_flops(program(1)) * args.steps
    peak = matmul_peak_flops()
    result = {
        "benchmark": "prior_sampling",
        "config": " ".join(config_args) or "configs/prior.py:bench",
        "captions": args.captions,
        "steps": args.steps,
        "guidance": args.guidance,
        "best_of": args.best_of,
        "compile_s": round(compile_seconds, 3),
        "run_s_median": round(median, 4),
        "program_gflop": round(flops / 1e9, 3),
        "achieved_gflops": round(flops / median / 1e9, 3),
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "mfu": round(flops / median / peak, 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
