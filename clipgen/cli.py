"""The `clipgen` command.

  clipgen train --config configs/<stage>.py:<preset> --workdir DIR [--config.key=value ...]
  clipgen embed --workdir CLIP_RUN --out DIR [--split test] [--config configs/clip.py:<preset>]
  clipgen shapes --data-dir DIR [--preset small|cascade|tiny]
  clipgen demo [--workdir DIR] [--minutes 30]
  clipgen eval --config configs/eval.py:<preset> --workdir OUT [--config.key=value ...]
  clipgen fid-stats --inception WEIGHTS --out STATS.npz (--coco-dir DIR | --shapes-split SPLIT)
      [--num N] [--resolution 256] [--resize-mode tf1_bilinear] [--seed 0] [--save-features]
  clipgen convert inception --pth FILE --out FILE.safetensors [--overwrite]
  clipgen sample --checkpoints DIR --captions "a ..." [...] --out GRID.png [--seed 0]
      [--prior-steps 64 --decoder-steps 250 --upsampler-steps ddim27 ...]
  clipgen vary --checkpoints DIR --image PNG --out GRID.png [--count 4 --eta 1.0]
  clipgen interpolate --checkpoints DIR --image-a PNG --image-b PNG --out GRID.png
      [--num 5 --slerp-noise]
  clipgen textdiff --checkpoints DIR --image PNG --from CAPTION --to CAPTION --out GRID.png
      [--thetas 0,0.1,0.2,0.3,0.4,0.5]
  clipgen pca --checkpoints DIR --image PNG --out GRID.png [--ks 1,2,4,8,16,32,64]

Heavy imports (JAX, TensorFlow) happen only after the arguments and the config are checked,
so a typo fails in a moment.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


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
    demo.add_argument(
        "--minutes", type=float, default=30.0, help="the time budget of the training stages"
    )

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

    _add_cascade_commands(commands)

    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").addFilter(_quiet_orbax)
    if args.command == "train":
        return _train(args.workdir, rest)
    if args.command == "embed":
        return _embed(args, rest)
    if args.command == "eval":
        return _eval(args.workdir, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "shapes":
        from clipgen.data import shapes_tfds

        builder = shapes_tfds.build(args.data_dir, args.preset)
        print(f"built {builder.info.full_name} in {builder.data_dir}")
        return 0
    if args.command == "fid-stats":
        return _fid_stats(args)
    if args.command == "convert":
        return _convert(args)
    if args.command in CASCADE_COMMANDS:
        return _cascade(args)
    from clipgen import demo as demo_lib
    from clipgen.train import loop

    try:
        demo_lib.run(args.workdir, minutes=args.minutes)
    except loop.Preempted as stop:
        print(f"clipgen demo: {stop}; run it again to resume", file=sys.stderr)
    except loop.NonFiniteError as error:
        print(f"clipgen demo: {error}", file=sys.stderr)
        return 1
    return 0


CASCADE_COMMANDS = ("sample", "vary", "interpolate", "textdiff", "pca")


def _add_cascade_commands(commands) -> None:
    """The commands that run a trained unCLIP cascade and write a PNG grid."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--checkpoints",
        required=True,
        help="the workdir holding the clip, prior, decoder, upsampler, upsampler2 runs",
    )
    common.add_argument("--out", required=True, help="the PNG grid to write")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--preset", default="demo", help="configs for runs that store none")
    common.add_argument("--columns", type=int, default=8, help="images per grid row")
    common.add_argument("--cell", type=int, default=128, help="grid cell size in pixels")
    steps = common.add_argument_group("sampling (default: each stage config's `sample`)")
    for stage in (*_diffusion_stages(), "invert"):
        steps.add_argument(
            f"--{stage}-steps",
            dest=f"{stage}_respacing",
            help=f"the {stage}'s respacing: N or ddimN steps",
        )
    steps.add_argument("--prior-guidance", type=float, help="classifier-free guidance scale")
    steps.add_argument("--decoder-guidance", type=float, help="classifier-free guidance scale")
    steps.add_argument("--best-of", dest="prior_best_of", type=int, help="prior draws per caption")

    sample = commands.add_parser("sample", parents=[common], help="text to image")
    sample.add_argument("--captions", nargs="+", required=True)
    vary = commands.add_parser("vary", parents=[common], help="variations of an image")
    vary.add_argument("--image", required=True)
    vary.add_argument("--count", type=int, default=7, help="variations to draw")
    vary.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0: reconstruction)")
    interpolate = commands.add_parser(
        "interpolate", parents=[common], help="slerp between two images' CLIP embeddings"
    )
    interpolate.add_argument("--image-a", required=True)
    interpolate.add_argument("--image-b", required=True)
    interpolate.add_argument("--num", type=int, default=8)
    interpolate.add_argument(
        "--slerp-noise",
        action="store_true",
        help="slerp the images' inverted decoder latents (default: one fixed random latent)",
    )
    textdiff = commands.add_parser(
        "textdiff", parents=[common], help="edit an image along a CLIP text direction"
    )
    textdiff.add_argument("--image", required=True)
    textdiff.add_argument("--from", dest="caption_from", required=True, help="the source text")
    textdiff.add_argument("--to", dest="caption_to", required=True, help="the target text")
    textdiff.add_argument("--thetas", default="0,0.1,0.2,0.3,0.4,0.5")
    pca = commands.add_parser(
        "pca", parents=[common], help="render an image from its first k CLIP principal components"
    )
    pca.add_argument("--image", required=True)
    pca.add_argument("--ks", help="comma-separated k (default: powers of 2 up to the dim)")
    pca.add_argument(
        "--basis-count", type=int, default=1024, help="shapes renders the PCA is fitted on"
    )
    pca.add_argument("--basis-split", default="train")


def _cascade(args: argparse.Namespace) -> int:
    """Run one of CASCADE_COMMANDS and write its grid."""
    import numpy as np

    from clipgen import images
    from clipgen.pipelines import manipulate, unclip

    keys = [f"{stage}_respacing" for stage in (*_diffusion_stages(), "invert")]
    keys += ["prior_guidance", "decoder_guidance", "prior_best_of"]
    overrides = {key: getattr(args, key) for key in keys}
    settings = {"workdir": args.checkpoints, "preset": args.preset, "sampling": overrides}
    try:
        pipe = unclip.load_pipeline(settings)
        if args.command == "sample":
            pictures = pipe.generate(args.captions, args.seed, progress=True)
            labels = list(args.captions)
        elif args.command == "vary":
            image = _read_image(args.image)
            rendered = manipulate.variations(
                pipe, [image], args.seed, args.eta, count=args.count, progress=True
            )
            pictures = np.concatenate([pipe.finish(_resized(pipe, image)), rendered.images])
            labels = ["input", *(f"eta={args.eta:g} #{i}" for i in range(args.count))]
        elif args.command == "interpolate":
            rendered = manipulate.interpolate(
                pipe,
                _read_image(args.image_a),
                _read_image(args.image_b),
                args.num,
                args.seed,
                fix_noise=not args.slerp_noise,
                progress=True,
            )
            pictures, labels = rendered.images, list(rendered.labels)
        elif args.command == "textdiff":
            rendered = manipulate.text_diff(
                pipe,
                _read_image(args.image),
                args.caption_from,
                args.caption_to,
                _floats(args.thetas),
                args.seed,
                progress=True,
            )
            pictures, labels = rendered.images, list(rendered.labels)
        else:
            dim = pipe.embed_dim
            ks = [int(k) for k in _floats(args.ks)] if args.ks else _powers_of_two(dim)
            basis = _shapes_embeddings(pipe, args.basis_split, args.basis_count)
            rendered = manipulate.pca_probe(
                pipe, _read_image(args.image), basis, ks, args.seed, progress=True
            )
            pictures, labels = rendered.images, list(rendered.labels)
    except (ValueError, FileNotFoundError) as error:
        print(f"clipgen {args.command}: {error}", file=sys.stderr)
        return 2
    grid = images.grid(list(pictures), labels, columns=args.columns, cell=args.cell)
    print(f"wrote {images.save_png(args.out, grid)}")
    return 0


def _diffusion_stages() -> list[str]:
    """The cascade's diffusion stages (clipgen.stages), whose sampling the commands set."""
    from clipgen import stages

    return [spec.name for spec in stages.cascade() if spec.role != "clip"]


def _read_image(path: str):
    """A PNG (or any PIL-readable image) as uint8 RGB."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _resized(pipe, image):
    """An input image at the cascade's final size, in [-1, 1], beside its variations."""
    import jax.numpy as jnp

    from clipgen.data import preprocess

    resized = preprocess.resize_and_crop(image, pipe.resolution)
    return jnp.asarray(resized[None], jnp.float32) / 127.5 - 1.0


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _powers_of_two(dim: int) -> list[int]:
    ks = [1 << i for i in range(dim.bit_length()) if 1 << i < dim]
    return [*ks, dim]


def _shapes_embeddings(pipe, split: str, count: int):
    """CLIP image embeddings of `count` shapes-world renders of `split` (the PCA basis)."""
    import numpy as np
    from tqdm import tqdm

    from clipgen.data import pipeline

    size = pipe.clip.module.vision.image_size
    source = pipeline.ProceduralShapes((size,), split, 0)
    batch = 256
    embeds = []
    for start in tqdm(range(0, count, batch), desc="pca basis", leave=False):
        renders = [source[i][f"image_{size}"] for i in range(start, min(start + batch, count))]
        embeds.append(np.asarray(pipe.encode_images(renders)))
    return np.concatenate(embeds)


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
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    args = _resolved_config_args(args)
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
    config = flag_values.config
    if config is None:
        raise ValueError("--config=FILE[:ARG] is required")
    if not isinstance(config, ml_collections.ConfigDict):  # the file failed to load
        try:
            config.stage  # noqa: B018 - raises the loading error it holds
        except OSError as error:
            raise ValueError(f"--config: {error.__cause__ or error}") from None
    return config


def _resolved_config_args(args: Sequence[str]) -> list[str]:
    """The arguments with `--config[=]configs/<name>.py[:preset]` pointing at clipgen's own
    config file when there is no such file here (an installed clipgen run outside its
    checkout)."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        if arg.startswith("--config="):
            prefix, value = "--config=", arg.removeprefix("--config=")
        elif index > 0 and resolved[index - 1] == "--config":
            prefix, value = "", arg
        else:
            continue
        path, colon, preset = value.partition(":")
        if Path(path).exists() or Path(path).parent.name != "configs":
            continue
        from clipgen import config as config_lib

        try:
            resolved[index] = f"{prefix}{config_lib.preset_path(Path(path).stem)}{colon}{preset}"
        except FileNotFoundError:
            continue
    return resolved


def _embed(args: argparse.Namespace, config_args: Sequence[str]) -> int:
    """Embed a split with the CLIP run's stored config (`--config` only for a checkpoint
    that stores none)."""
    try:
        config = load_config(config_args) if config_args else None
    except ValueError as error:
        print(f"clipgen embed: {error}", file=sys.stderr)
        return 2
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


def _eval(workdir: str, args: Sequence[str]) -> int:
    from clipgen.eval import run

    try:
        config = load_config(args)
        run.validate(config)
        from clipgen import parallel

        parallel.initialize_distributed(config)
        report = run.evaluate(config, workdir)
    except (ValueError, FileNotFoundError) as error:
        print(f"clipgen eval: {error}", file=sys.stderr)
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
        print(f"clipgen fid-stats: {error}", file=sys.stderr)
        return 2
    print(run.describe_stats(args.out))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from clipgen.weights.inception import convert_inception

    try:
        out = convert_inception(args.pth, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"clipgen convert: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _train(workdir: str, args: Sequence[str]) -> int:
    from clipgen import config as config_lib

    try:
        config = load_config(args)
        config_lib.validate(config)
    except ValueError as error:
        print(f"clipgen train: {error}", file=sys.stderr)
        return 2
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
        print(f"clipgen train: {stop}", file=sys.stderr)
        return 0
    except loop.NonFiniteError as error:
        print(f"clipgen train: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
