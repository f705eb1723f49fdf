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

Heavy imports (JAX, TensorFlow) happen only after the arguments and the config are checked,
so a typo fails in a moment.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from clipgen.cli import cascade, evaluation, operators, training
from clipgen.cli.config_args import load_config

__all__ = ["load_config", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="clipgen", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for family in (training, evaluation, cascade, operators):
        handlers.update(family.add_commands(commands))
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").addFilter(_quiet_orbax)
    if args.command in TAKES_CONFIG:
        return handlers[args.command](args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return handlers[args.command](args)


TAKES_CONFIG = ("train", "embed", "eval")  # commands whose other arguments are --config ones


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
    sys.exit(main())
