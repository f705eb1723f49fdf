"""The `clipgen` command.

  clipgen train --config configs/<stage>.py:<preset> --workdir DIR [--config.key=value ...]
  clipgen embed --config configs/clip.py:<preset> --workdir CLIP_RUN --out DIR [--split test]
  clipgen shapes --data-dir DIR [--preset small|cascade|tiny]
  clipgen demo [--workdir DIR]

Heavy imports (JAX, TensorFlow) happen only after the arguments and the config are checked,
so a typo fails in a moment.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="clipgen", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

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

    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").addFilter(_quiet_orbax)
    if args.command == "train":
        return _train(args.workdir, rest)
    if args.command == "embed":
        return _embed(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "shapes":
        from clipgen.data import shapes_tfds

        builder = shapes_tfds.build(args.data_dir, args.preset)
        print(f"built {builder.info.full_name} in {builder.data_dir}")
        return 0
    from clipgen import demo as demo_lib

    demo_lib.run(args.workdir)
    return 0


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """orbax narrates every save at INFO through absl (whose records all name absl's own
    file); drop those that come from orbax code, keep its warnings."""
    if record.levelno >= logging.WARNING:
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if "/orbax/" in frame.f_code.co_filename:
            return False
        frame = frame.f_back
    return True


def load_config(args: Sequence[str]):
    """The locked config from `--config=FILE[:ARG]` and its `--config.key=value` overrides.

    Unknown keys and values of the wrong type raise ValueError naming the key.
    """
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "the stage config file", flag_values=flag_values, lock_config=True
    )
    argv = ["clipgen-train", *args]
    saved_argv = sys.argv
    sys.argv = argv  # config_flags reads the overrides from sys.argv
    try:
        flag_values(argv)
    except AttributeError as error:  # a locked ConfigDict rejecting an unknown key
        key = next((a.split("=")[0] for a in args if a.startswith("--config.")), "")
        raise ValueError(f"unknown config key in {key}: {error.args[0]}") from None
    except flags.Error as error:
        raise ValueError(str(error)) from None
    finally:
        sys.argv = saved_argv
    if flag_values.config is None:
        raise ValueError("--config=FILE[:ARG] is required")
    return flag_values.config


def load_stage_module(name: str):
    """`clipgen.train.<name>`, or an importable module called `name`; it has make_stage."""
    for module_name in (f"clipgen.train.{name}", name):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name not in (module_name, "clipgen.train." + name.split(".")[0]):
                raise
            continue
        if not hasattr(module, "make_stage"):
            raise ValueError(f"stage module {module_name} has no make_stage(config)")
        return module
    raise ValueError(f"config.stage={name!r}: no module clipgen.train.{name} or {name}")


def _embed(args: argparse.Namespace, config_args: Sequence[str]) -> int:
    try:
        config = load_config(config_args)
    except ValueError as error:
        print(f"clipgen embed: {error}", file=sys.stderr)
        return 2
    from clipgen import embed

    embed.run(
        config, args.workdir, args.out, args.split, args.num_examples, shard_size=args.shard_size
    )
    return 0


def _train(workdir: str, args: Sequence[str]) -> int:
    from clipgen.train import config as config_lib

    try:
        config = load_config(args)
        config_lib.validate(config)
    except ValueError as error:
        print(f"clipgen train: {error}", file=sys.stderr)
        return 2
    from clipgen import parallel

    parallel.initialize_distributed(config)
    from clipgen.train import loop

    stage = load_stage_module(config.stage).make_stage(config)
    try:
        loop.train(config, workdir, stage)
    except loop.Preempted as stop:
        print(f"clipgen train: {stop}", file=sys.stderr)
        return 0
    except loop.NonFiniteError as error:
        print(f"clipgen train: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
