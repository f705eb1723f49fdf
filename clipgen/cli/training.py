"""The training commands: train (one stage from a config file), embed (CLIP embedding
shards of a shapes split), shapes (the tfds data set) and demo (the main job)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipgen.cli.config_args import load_config
from clipgen.errors import one_line, output_directory


def add_commands(commands) -> dict:
    train = commands.add_parser("train", help="train one stage from a config file")
    train.add_argument("--workdir", required=True, help="checkpoints and metrics go here")

    shapes = commands.add_parser("shapes", help="build the shapes-world tfds dataset")
    shapes.add_argument("--data-dir", required=True)
    shapes.add_argument("--preset", default="small", help="small, cascade or tiny")

    embed = commands.add_parser("embed", help="write CLIP embedding shards of a shapes split")
    embed.add_argument("--workdir", required=True, help="the trained CLIP run")
    embed.add_argument("--out", required=True, help="directory for the shards")
    embed.add_argument("--split", default="test")
    embed.add_argument("--num-examples", type=int, default=1000)
    embed.add_argument("--shard-size", type=int, default=500)

    demo = commands.add_parser("demo", help="the main job on the shapes world (one CPU)")
    demo.add_argument("--workdir", default="workdir/demo")
    demo.add_argument(
        "--minutes",
        type=float,
        help="fit the plan to this machine within a budget of this many minutes (default: "
        "the fixed plan of a 30-minute run's steps, the same report on any machine with the "
        "same instruction sets)",
    )

    return {
        "train": lambda args, rest: _train(args.workdir, rest),
        "embed": _embed,
        "shapes": _shapes,
        "demo": _demo,
    }


def _shapes(args: argparse.Namespace) -> int:
    from clipgen.data import shapes_tfds

    builder = shapes_tfds.build(args.data_dir, args.preset)
    print(f"built {builder.info.full_name} in {builder.data_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    output_directory(args.workdir)
    from clipgen import demo as demo_lib
    from clipgen.train import loop

    try:
        if args.minutes is None:
            demo_lib.run(args.workdir)
        else:
            demo_lib.run(args.workdir, minutes=args.minutes, budget=True)
    except loop.Preempted as stop:
        print(f"clipgen demo: {stop}; run it again to resume", file=sys.stderr)
    except loop.NonFiniteError as error:
        print(f"clipgen demo: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def _embed(args: argparse.Namespace, config_args: Sequence[str]) -> int:
    """Embed a split with the CLIP run's stored config (`--config` only for a checkpoint
    that stores none)."""
    config = load_config(config_args) if config_args else None
    output_directory(args.out, "--out")
    from clipgen.pipelines import embed

    embed.run(
        args.workdir,
        args.out,
        args.split,
        args.num_examples,
        shard_size=args.shard_size,
        default_config=config and (lambda: config),
    )
    return 0


def _train(workdir: str, args: Sequence[str]) -> int:
    from clipgen import config as config_lib

    config = load_config(args)
    config_lib.validate(config)
    output_directory(workdir)
    from clipgen import parallel

    parallel.initialize_distributed(config)
    from clipgen import train
    from clipgen.eval import registry
    from clipgen.pipelines import embed
    from clipgen.train import loop

    embed.ensure_embeddings(config)
    stage = train.trainer(config.stage).make_stage(config)
    evaluators = registry.training_evaluators(config)
    try:
        loop.train(config, workdir, stage, evaluators=evaluators)
    except loop.Preempted as stop:
        print(f"clipgen train: {one_line(stop)}", file=sys.stderr)
        return 0
    except loop.NonFiniteError as error:
        print(f"clipgen train: {one_line(error)}", file=sys.stderr)
        return 1
    return 0
