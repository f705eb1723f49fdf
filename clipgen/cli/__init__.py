"""The `clipgen` command.

  clipgen train --config configs/<stage>.py:<preset> --workdir DIR [--config.key=value ...]
  clipgen embed --workdir CLIP_RUN --out DIR [--split test] [--config configs/clip.py:<preset>]
  clipgen shapes --data-dir DIR [--preset small|cascade|tiny]
  clipgen demo [--workdir DIR] [--minutes 30]
  clipgen eval --config configs/eval.py:<preset> --workdir OUT [--config.key=value ...]
  clipgen fid-stats --inception WEIGHTS --out STATS.npz (--coco-dir DIR | --shapes-split SPLIT)
      [--num N] [--resolution 256] [--resize-mode tf1_bilinear] [--seed 0] [--save-features]
  clipgen convert inception --pth FILE --out FILE.safetensors [--overwrite]
  clipgen sample --checkpoints DIR|KARLO_DIR --captions "a ..." [...] --out GRID.png [--seed 0]
      [--prior-steps 64 --decoder-steps 250 --upsampler-steps ddim27 ...]
  clipgen vary --checkpoints DIR --image PNG --out GRID.png [--count 4 --eta 1.0]
  clipgen interpolate --checkpoints DIR --image-a PNG --image-b PNG --out GRID.png
      [--num 5 --slerp-noise]
  clipgen textdiff --checkpoints DIR --image PNG --from CAPTION --to CAPTION --out GRID.png
      [--thetas 0,0.1,0.2,0.3,0.4,0.5]
  clipgen pca --checkpoints DIR --image PNG --out GRID.png [--ks 1,2,4,8,16,32,64]
  clipgen op NAME --inputs IMAGE|EMBEDDING.npz ... --checkpoints DIR --out PREFIX
      [--operator RUN] [--word WORD] [--drop 1] [--guidance 8] [--mean]
  clipgen edit --image IMAGE|DIR --out DIR (--source TEXT --target TEXT [--base RUN|DIR]
      [--clip RUN|DIR] [--preset demo] [--config.key=value ...] | --edit EDIT ... |
      --combine EDIT:RATIOS ... --thresholds 300,0) [--t0 500] [--steps 40] [--gamma 1]
      [--unseen 8]

Heavy imports (JAX, TensorFlow) happen only after the arguments and the config are checked,
so a typo fails in a moment. A user's unusable input (`clipgen.errors.InputError`) is one
line on stderr and exit status 2; SIGTERM at any moment exits 0 (training saves its step
first).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from clipgen.cli import cascade, edit, evaluation, operators, training
from clipgen.cli.config_args import load_config
from clipgen.errors import InputError, one_line

__all__ = ["load_config", "main", "run"]


def run() -> None:
    """The program: `main` on sys.argv, then exit. Once the command is done SIGTERM is
    ignored, because Python's own teardown (JAX, TensorFlow) resets handlers to the
    default one that would end an already finished run with status -15."""
    status = main()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """The `clipgen` command on `argv`; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread: leave signals alone
        return _main(argv)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipgen", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for family in (training, evaluation, cascade, operators, edit):
        handlers.update(family.add_commands(commands))
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").addFilter(_quiet_orbax)
    if rest and args.command not in TAKES_CONFIG:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return handlers[args.command](*([args, rest] if args.command in TAKES_CONFIG else [args]))
    except InputError as error:
        print(f"clipgen {args.command}: {one_line(error)}", file=sys.stderr)
        return 2


# Commands whose other arguments are --config ones (edit's: overrides of its fine-tuning).
TAKES_CONFIG = ("train", "embed", "eval", "edit")


def _terminated(signum, frame):
    """Outside a training loop (which saves its step first) SIGTERM ends the command at
    once with status 0 and a line saying so. It exits rather than raising, since an
    exception raised in a signal handler can land in code that swallows it (a garbage
    collector callback) and the command would run on; files are written to temporary
    names and renamed, so none is left half-written."""
    del signum, frame
    print("clipgen: terminated; no training step was running, nothing to save", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


if __name__ == "__main__":
    run()
