"""Compile time of the paper presets' train steps on a mesh of fake CPU devices, with their
repeated blocks unrolled and scanned, side by side in one run: the transformers' blocks as
one `nn.scan` (model.scan), the UNets' runs of identical ResBlocks as one each
(model.unet.scan).

  python benchmarks/compile_time.py [--devices=64] [--fsdp=8] [--presets=prior,clip,ar_prior]
      [--layouts=unrolled,scan] [--clip-tokenizer=bpe_simple_vocab_16e6.txt.gz]

A preset is a config file (its `paper` preset) or FILE:PRESET, e.g. upsampler:second_paper.
Prints one JSON line per preset and layout: seconds to lower and to compile the step.
Runs in a fresh process: it sets the fake device count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import paper_step  # benchmarks/ is on sys.path


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--fsdp", type=int, default=8)
    parser.add_argument("--presets", default="prior,clip,ar_prior")
    parser.add_argument("--layouts", default="unrolled,scan")
    parser.add_argument("--clip-tokenizer", default="", help=paper_step.CLIP_TOKENIZER_HELP)
    args = parser.parse_args(argv)
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"unrolled", "scan"}:
        parser.error(f"--layouts: {args.layouts!r} names other than unrolled and scan")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    from clipgen import config as config_lib

    results = []
    for entry in args.presets.split(","):
        name, _, preset = entry.partition(":")
        preset = preset or "paper"
        # A UNet's scan option sits in its model.unet section, a transformer's in model.
        unet = "unet" in config_lib.load_preset(name, preset).model
        key = "model.unet.scan" if unet else "model.scan"
        for layout in layouts:
            scan = layout == "scan"
            config = paper_step.paper_config(
                name, preset, args.devices, args.fsdp, args.clip_tokenizer, **{key: scan}
            )
            start = time.perf_counter()
            lowered = paper_step.prepare(config, compile_step=False).step
            lowered_at = time.perf_counter()
            lowered.compile()
            done = time.perf_counter()
            result = {
                "config": f"configs/{name}.py:{preset}",
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
