"""Compile time of the paper presets' train steps on a mesh of fake CPU devices, with their
transformer blocks unrolled and as one `nn.scan` (model.scan), side by side in one run.

  python benchmarks/compile_time.py [--devices=64] [--fsdp=8] [--presets=prior,clip,ar_prior]
      [--clip-tokenizer=bpe_simple_vocab_16e6.txt.gz]

Prints one JSON line per preset and layout: seconds to lower and to compile the step.
Runs in a fresh process: it sets the fake device count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--fsdp", type=int, default=8)
    parser.add_argument("--presets", default="prior,clip,ar_prior")
    parser.add_argument(
        "--clip-tokenizer",
        default="",
        help="OpenAI's bpe_simple_vocab_16e6.txt.gz (default: the CLIP paper preset's name, "
        "read from the working directory)",
    )
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    from clipgen import config as config_lib
    from clipgen import train
    from clipgen.train import loop

    results = []
    for name in args.presets.split(","):
        for scan in (False, True):
            config = config_lib.load_preset(name, "paper")
            config.model.scan = scan
            if config.stage == "clip" and args.clip_tokenizer:
                config.data.tokenizer = args.clip_tokenizer
            if "embeddings" in config.data:
                config.data.embeddings = "synthetic"
                config.data.num_examples = dict(train=1024)  # the AR prior fits a PCA on them
            config.mesh = dict(data=args.devices // args.fsdp, fsdp=args.fsdp, tensor=1)
            stage = train.trainer(config.stage).make_stage(config)
            start = time.perf_counter()
            lowered = loop.prepare(config, stage, compile_step=False).step
            lowered_at = time.perf_counter()
            lowered.compile()
            done = time.perf_counter()
            result = {
                "config": f"configs/{name}.py:paper",
                "scan": scan,
                "devices": args.devices,
                "lower_s": round(lowered_at - start, 2),
                "compile_s": round(done - lowered_at, 2),
            }
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
