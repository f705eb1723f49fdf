"""The evaluation commands: eval (run evaluators against a generator), fid-stats (FID
reference statistics of real images) and convert (public weights to safetensors)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipgen.cli.config_args import load_config
from clipgen.errors import one_line


def add_commands(commands) -> dict:
    evaluate = commands.add_parser("eval", help="run evaluators (FID, CLIP score, oracle)")
    evaluate.add_argument("--workdir", required=True, help="eval.json and metrics go here")

    stats = commands.add_parser("fid-stats", help="write FID reference statistics of real images")
    stats.add_argument("--inception", required=True, help="FID Inception weights (.safetensors)")
    stats.add_argument("--out", required=True, help="the statistics .npz to write")
    images = stats.add_mutually_exclusive_group(required=True)
    images.add_argument("--coco-dir", help="COCO 2014: val2014/ and annotations/")
    images.add_argument("--shapes-split", help="a shapes-world split: train, test or heldout")
    stats.add_argument(
        "--num", type=int, help="COCO: images of N drawn captions (default all); shapes: N (2048)"
    )
    stats.add_argument("--resolution", type=int, default=256, help="real images resized to this")
    stats.add_argument("--resize-mode", default="tf1_bilinear", help="to 299: tf1_bilinear, clean")
    stats.add_argument("--seed", type=int, default=0, help="the caption draw / shapes seed")
    stats.add_argument("--batch-size", type=int, help="global batch (default 64, rounded up)")
    stats.add_argument("--save-features", action="store_true", help="also keep features (KID)")

    convert = commands.add_parser("convert", help="convert public weights to safetensors")
    convert.add_argument("kind", choices=["inception"])
    convert.add_argument("--pth", required=True, help="the torch state dict")
    convert.add_argument("--out", required=True, help="the .safetensors to write")
    convert.add_argument("--overwrite", action="store_true")

    return {
        "eval": lambda args, rest: _eval(args.workdir, rest),
        "fid-stats": _fid_stats,
        "convert": _convert,
    }


def _eval(workdir: str, args: Sequence[str]) -> int:
    from clipgen.eval import run

    try:
        config = load_config(args)
        run.validate(config)
        from clipgen import parallel

        parallel.initialize_distributed(config)
        report = run.evaluate(config, workdir)
    except (ValueError, FileNotFoundError) as error:
        print(f"clipgen eval: {one_line(error)}", file=sys.stderr)
        return 2
    for name, result in report["evals"].items():
        print(f"{name}: {result.get('metrics', 'skipped: ' + str(result.get('skipped')))}")
    return 0


def _fid_stats(args: argparse.Namespace) -> int:
    from clipgen import parallel
    from clipgen.eval import run

    parallel.initialize_distributed()
    try:
        run.fid_stats(
            args.inception,
            args.out,
            coco_dir=args.coco_dir,
            shapes_split=args.shapes_split,
            num=args.num,
            resolution=args.resolution,
            resize_mode=args.resize_mode,
            seed=args.seed,
            batch_size=args.batch_size,
            save_features=args.save_features,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"clipgen fid-stats: {one_line(error)}", file=sys.stderr)
        return 2
    print(run.describe_stats(args.out))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from clipgen.weights.inception import convert_inception

    try:
        out = convert_inception(args.pth, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"clipgen convert: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
