"""Karlo sampling throughput: clipgen's cascade against diffusers' UnCLIPPipeline on the same
random weights (one Karlo-layout folder written by diffusers, read by clipgen), batch and
steps (Karlo's 25 / 25 / 7 by default), timed in one process, the two interleaved.

  PYTHONPATH=tests python benchmarks/unclip_sampling.py [--size tiny|medium] [--batch 4]
      [--repeats 3] [--torch-threads N] [--prior-steps 25 --decoder-steps 25
      --super-res-steps 7]

Prints one JSON line: seconds per cascade (median over the repeats) for both, their ratio
(diffusers / clipgen; above 1: clipgen is faster), clipgen's first call (compiling
included) and the sizes. torch runs on --torch-threads (default: every core; on a busy
machine one thread is often faster), JAX on its own thread pool. Needs torch, diffusers
and transformers (the test extras); the folder builder is tests/public_folders.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # the parity test's folder
    "tiny": dict(dim=16, channels=(16, 32, 48), super_res_channels=(16, 32), decoder_size=16,
                 super_res_size=32, prior_layers=2),
    # wider, deeper and at 32 -> 64 px
    "medium": dict(dim=64, channels=(32, 64, 96), super_res_channels=(32, 64), decoder_size=32,
                   super_res_size=64, prior_layers=4),
}  # fmt: skip


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--decoder-steps", type=int, default=25)
    parser.add_argument("--super-res-steps", type=int, default=7)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import public_folders  # tests/ on PYTHONPATH
    import torch

    from clipgen.pipelines import unclip

    torch.set_num_threads(args.torch_threads)
    captions = (public_folders.CAPTIONS * args.batch)[: args.batch]
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory() as root:
        reference, folder = public_folders.karlo_pipeline(Path(root), **size)
        reference.set_progress_bar_config(disable=True)
        pipe = unclip.load_pipeline(folder)
    steps = {
        "prior_respacing": f"unclip{args.prior_steps}",
        "decoder_respacing": f"unclip{args.decoder_steps}",
        "upsampler_respacing": f"unclip{args.super_res_steps}",
    }

    def run_clipgen(seed: int) -> float:
        start = time.perf_counter()
        drawn = pipe.stages(captions, seed, **steps)
        jax.block_until_ready(drawn.images)
        return time.perf_counter() - start

    def run_diffusers(seed: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            reference(
                captions,
                prior_num_inference_steps=args.prior_steps,
                decoder_num_inference_steps=args.decoder_steps,
                super_res_num_inference_steps=args.super_res_steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            )
        return time.perf_counter() - start

    first_clipgen = run_clipgen(0)  # compiles the stage programs
    run_diffusers(0)  # warms up
    times: dict[str, list[float]] = {"clipgen": [], "diffusers": []}
    for repeat in range(1, args.repeats + 1):  # interleaved, so load drifts hit both
        times["clipgen"].append(run_clipgen(repeat))
        times["diffusers"].append(run_diffusers(repeat))
    clipgen_s = statistics.median(times["clipgen"])
    diffusers_s = statistics.median(times["diffusers"])
    return {
        "benchmark": "unclip_sampling",
        "size": args.size,
        "batch": args.batch,
        "steps": [args.prior_steps, args.decoder_steps, args.super_res_steps],
        "resolutions": [size["decoder_size"], size["super_res_size"]],
        "clipgen_seconds": round(clipgen_s, 4),
        "diffusers_seconds": round(diffusers_s, 4),
        "diffusers_over_clipgen": round(diffusers_s / clipgen_s, 3),
        "clipgen_first_call_seconds": round(first_clipgen, 2),
        "clipgen_runs": [round(t, 4) for t in times["clipgen"]],
        "diffusers_runs": [round(t, 4) for t in times["diffusers"]],
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "params": {
            name: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
            for name, tree in (
                ("clip", pipe.clip.params),
                ("prior", pipe.prior.params),
                ("decoder", pipe.decoder.params),
                ("super_res_first", pipe.upsamplers[0].params),
                ("super_res_last", pipe.upsamplers[0].last_step_params),
            )
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
