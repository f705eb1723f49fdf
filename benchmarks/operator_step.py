"""pOps operator fine-tuning step, clipgen against the official code's step, side by side in
one run: clipgen's compiled operator step (configs/operator.py:bench, union: two inputs in
the token slots, AdamW) and diffusers' PriorTransformer forward and backward with torch
AdamW at the same size and batch, as pOps' coach.py runs it (x0 MSE, grad clip 1.0).

  python benchmarks/operator_step.py [--steps=10] [--warmup=2] [--threads=2]

Prints one JSON line: both median step times, their ratio (torch / clipgen: clipgen's
speed-up), clipgen's FLOPs and MFU against the matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from train_step import matmul_peak_flops, step_flops, step_times  # benchmarks/ on sys.path

from clipgen import train
from clipgen.cli import load_config


def clipgen_step(config, steps: int, warmup: int) -> tuple[float, float, float]:
    """(median step seconds, compile seconds, FLOPs) of clipgen's operator step."""
    import jax

    from clipgen.train import loop

    stage = train.trainer("operator").make_stage(config)
    run = loop.prepare(config, stage, jax.devices()[:1])
    times = step_times(run, stage, config.batch_size, steps, warmup)
    return statistics.median(times), run.compile_seconds, step_flops(run.step)


def torch_step(config, steps: int, warmup: int, threads: int) -> float:
    """Median step seconds of diffusers' PriorTransformer under pOps' training step."""
    import diffusers
    import torch

    torch.set_num_threads(threads)
    model = config.model
    prior = diffusers.PriorTransformer(
        num_attention_heads=model.heads,
        attention_head_dim=model.head_dim,
        num_layers=model.layers,
        embedding_dim=model.embedding_dim,
        num_embeddings=model.num_text_tokens,
        additional_embeddings=4,
    ).train()
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-5, weight_decay=0.0)
    batch, dim, slots = config.batch_size, model.embedding_dim, model.num_text_tokens
    generator = torch.Generator().manual_seed(0)
    times = []
    for index in range(warmup + steps):
        noisy = torch.randn(batch, dim, generator=generator)
        target = torch.randn(batch, dim, generator=generator)
        sequence = torch.zeros(batch, slots, dim)
        sequence[:, :2] = torch.randn(batch, 2, dim, generator=generator)
        mask = torch.zeros(batch, slots)
        mask[:, :2] = 1
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        start = time.perf_counter()
        prediction = prior(
            noisy,
            timestep=timesteps,
            proj_embedding=torch.zeros(batch, dim),
            encoder_hidden_states=sequence,
            attention_mask=mask,
        ).predicted_image_embedding
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch's intra-op threads")
    args, config_args = parser.parse_known_args(argv)
    config = load_config(config_args or ["--config=configs/operator.py:bench"])
    ours, compile_s, flops = clipgen_step(config, args.steps, args.warmup)
    theirs = torch_step(config, args.steps, args.warmup, args.threads)
    peak = matmul_peak_flops()
    result = {
        "benchmark": "operator_step",
        "config": "operator bench (union)",
        "global_batch": int(config.batch_size),
        "clipgen_step_s": round(ours, 4),
        "clipgen_compile_s": round(compile_s, 2),
        "torch_step_s": round(theirs, 4),
        "speedup_vs_torch": round(theirs / ours, 3),
        "clipgen_step_gflop": round(flops / 1e9, 2),
        "clipgen_mfu": round(flops / ours / peak, 4),
        "matmul_peak_gflops": round(peak / 1e9, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
