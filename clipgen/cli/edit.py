"""`clipgen edit`: DiffusionCLIP on one image or a folder. With --source and --target it
fine-tunes an edit on those images (configs/edit.py, any `--config.key=value` override)
and applies it; with --edit it applies saved edits (run directories or .safetensors edit
files), mixed over time with --combine. Writes OUT/grid.png (inputs, then each output),
each output image, and for a fine-tuned edit OUT/edit.safetensors and its run OUT/run.

  clipgen edit --image face.png --source face --target "angry face" \\
      --base ddpm-celebahq-256 --clip clip-vit-base-patch16 --preset paper --out runs/angry
  clipgen edit --image shapes/ --edit red2blue.safetensors --gamma 0.25 0.5 1 --out g
  clipgen edit --image shapes/ --combine red2blue.safetensors:1,0.3 circle2square:0,0.7 \\
      --thresholds 300,0 --out both          # DiffusionCLIP's {300: [1, 0], 0: [.3, .7]}
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def add_commands(commands) -> dict:
    parser = commands.add_parser(
        "edit", help="DiffusionCLIP: fine-tune a text edit and apply it, or apply saved edits"
    )
    parser.add_argument("--image", required=True, help="an image, or a folder of images")
    parser.add_argument("--out", required=True, help="the folder to write to")
    parser.add_argument("--source", help="source text, e.g. 'red' (fine-tunes a new edit)")
    parser.add_argument("--target", help="target text, e.g. 'blue'")
    parser.add_argument("--edit", nargs="+", default=(), help="saved edits to apply")
    parser.add_argument(
        "--combine",
        nargs="+",
        default=(),
        metavar="EDIT:RATIOS",
        help="edits mixed by noise combination, each with its ratio per --thresholds row",
    )
    parser.add_argument(
        "--thresholds", default="0", help="combination rows' timesteps, high to low (300,0)"
    )
    parser.add_argument("--preset", default="demo", help="configs/edit.py preset to fine-tune")
    parser.add_argument("--base", help="the model to edit: a unet/decoder run, diffusers dir")
    parser.add_argument("--clip", help="the CLIP: a clipgen CLIP run or a transformers dir")
    parser.add_argument("--t0", type=int, help="the inversion depth (default: the edit's)")
    parser.add_argument("--steps", type=int, help="generation steps S_test (default 40)")
    parser.add_argument("--inv-steps", type=int, help="inversion steps S_inv (default 40)")
    parser.add_argument("--gamma", type=float, nargs="+", default=(1.0,), help="edit strengths")
    parser.add_argument(
        "--unseen",
        type=int,
        default=0,
        help="first translate into the model's domain: N stochastic forward + 6-step rounds",
    )
    parser.add_argument("--seed", type=int, default=0)
    return {"edit": run}


def _options(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, or None."""
    new = args.source is not None or args.target is not None
    if new and (args.source is None or args.target is None):
        return "--source and --target go together"
    if sum(map(bool, (new, args.edit, args.combine))) != 1:
        return "give one of --source/--target, --edit or --combine"
    return None


def fine_tune_config(args: argparse.Namespace, overrides: Sequence[str], count: int):
    """The edit stage config for --source/--target on the given images."""
    from clipgen.cli.config_args import load_config

    spec = f"--config=configs/edit.py:{args.preset},{args.source},{args.target}"
    config = load_config([spec, *overrides])
    config.data.folder = str(args.image)
    config.data.num_train = count
    config.edit.cache = str(Path(args.out) / "latents")  # the edits after reuse the latents
    if args.base:
        config.base.source = args.base
    if args.clip:
        is_run = (Path(args.clip) / "checkpoints").is_dir()
        config.clip.update(source="clipgen" if is_run else "transformers")
        config.clip.update(workdir=args.clip if is_run else "", path="" if is_run else args.clip)
    if config.edit.templates == "shapes" and not _shapes_word(args.source):
        config.edit.templates = "imagenet"
    for key, value in (("t0", args.t0), ("inv_steps", args.inv_steps), ("test_steps", args.steps)):
        if value:
            config.edit[key] = value
    per_epoch = -(-count // config.batch_size)
    if config.edit.mode == "efficient":
        per_epoch *= config.edit.gen_steps
    config.optim.step_every = per_epoch
    config.total_steps = config.edit.epochs * per_epoch
    return config


def _shapes_word(word: str) -> bool:
    from clipgen.data import shapes

    values = (shapes.COLOURS, shapes.SHAPES, shapes.SIZES, shapes.POSITIONS, shapes.BACKGROUNDS)
    return any(word in group for group in values)


def run(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    problem = _options(args)
    if problem:
        print(f"clipgen edit: {problem}", file=sys.stderr)
        return 2
    import numpy as np

    from clipgen import edit, images
    from clipgen.data import files
    from clipgen.pipelines import edit as edit_pipeline

    out = Path(args.out)
    try:
        if args.source is not None:
            names = files.read_images(args.image)[0]
            config = fine_tune_config(args, overrides, len(names))
            found, editor = _fine_tune(config, out)
            edits, schedule = [found], None
        else:
            if overrides:
                raise ValueError(f"unrecognized arguments: {' '.join(overrides)}")
            paths = list(args.edit) or [spec.rpartition(":")[0] for spec in args.combine]
            edits = [edit_pipeline.load_edit(path) for path in paths]
            schedule = None
            if args.combine:
                thresholds = [int(t) for t in args.thresholds.split(",")]
                rows = [
                    [float(r) for r in spec.rpartition(":")[2].split(",")] for spec in args.combine
                ]
                if any(len(row) != len(thresholds) for row in rows):
                    raise ValueError("each --combine EDIT:RATIOS needs one ratio per threshold")
                schedule = edit.parse_schedule(
                    {t: [row[j] for row in rows] for j, t in enumerate(thresholds)}, len(rows)
                )
            editor = None
        if editor is None:
            editor = edit_pipeline.Editor(
                edits[0].config,
                cache=out / "latents",
                t0=args.t0,
                inv_steps=args.inv_steps,
                steps=args.steps,
            )
        names, inputs = files.read_images(args.image, editor.backbone.resolution)
        pictures, labels = [inputs], ["input"]
        if args.unseen:
            inputs = editor.unseen(inputs, args.unseen, args.seed)
            pictures.append(inputs)
            labels.append(f"in domain ({args.unseen} rounds)")
        if schedule is not None:
            pictures.append(editor.apply(inputs, edits, schedule))
            labels.append("+".join(found.name for found in edits))
        else:
            for gamma in args.gamma:
                pictures.append(editor.apply(inputs, edits, gamma=gamma))
                labels.append(f"{edits[0].name} gamma={gamma:g}")
    except (ValueError, FileNotFoundError) as error:
        print(f"clipgen edit: {error}", file=sys.stderr)
        return 2
    tiles, captions = [], []
    for row, name in enumerate(names):
        for picture, label in zip(pictures, labels, strict=True):
            tiles.append(picture[row])
            captions.append(f"{name}: {label}")
            stem = Path(name).stem
            tag = label.replace(" ", "_").replace(">", "").replace("=", "")
            images.save_png(out / f"{stem}_{tag}.png", np.asarray(picture[row]))
    grid = images.save_png(out / "grid.png", images.grid(tiles, captions, columns=len(pictures)))
    print(f"wrote {grid}")
    return 0


def _fine_tune(config, out: Path):
    import jax

    from clipgen import config as config_lib
    from clipgen import train
    from clipgen.pipelines import edit as edit_pipeline
    from clipgen.train import loop

    config_lib.validate(config)
    stage = train.trainer("edit").make_stage(config)
    state = loop.train(config, out / "run", stage)
    editor = edit_pipeline.Editor(config, cache=config.edit.cache)
    params = jax.device_get(next(iter(state.ema.values())))
    found = edit_pipeline.Edit(config, params, editor.fingerprint)
    path = edit_pipeline.save_edit(out / "edit.safetensors", found)
    print(f"fine-tuned {found.name} in {int(state.step)} steps: {path}")
    return found, editor
