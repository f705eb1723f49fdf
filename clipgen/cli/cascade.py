"""The commands that run a trained unCLIP cascade and write a PNG grid: sample, vary,
interpolate, textdiff, pca."""

from __future__ import annotations

import argparse
import sys

from clipgen.errors import one_line

COMMANDS = ("sample", "vary", "interpolate", "textdiff", "pca")


def add_commands(commands) -> dict:
    """The commands that run a trained unCLIP cascade and write a PNG grid."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--checkpoints",
        required=True,
        help="the workdir holding the clip, prior, decoder, upsampler, upsampler2 runs, or a "
        "diffusers pipeline folder with its model_index.json (Karlo's UnCLIPPipeline)",
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
            help=f"the {stage}'s respacing: N, ddimN or unclipN steps (Karlo: unclipN)",
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
    return dict.fromkeys(COMMANDS, run)


def run(args: argparse.Namespace) -> int:
    """Run one of COMMANDS and write its grid."""
    import numpy as np

    from clipgen import images
    from clipgen.data.image_input import read_image
    from clipgen.pipelines import manipulate, unclip

    paths = [getattr(args, key, None) for key in ("image", "image_a", "image_b")]
    inputs = {path: read_image(path) for path in paths if path}  # before anything loads
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
            image = inputs[args.image]
            rendered = manipulate.variations(
                pipe, [image], args.seed, args.eta, count=args.count, progress=True
            )
            pictures = np.concatenate([pipe.finish(_resized(pipe, image)), rendered.images])
            labels = ["input", *(f"eta={args.eta:g} #{i}" for i in range(args.count))]
        elif args.command == "interpolate":
            rendered = manipulate.interpolate(
                pipe,
                inputs[args.image_a],
                inputs[args.image_b],
                args.num,
                args.seed,
                fix_noise=not args.slerp_noise,
                progress=True,
            )
            pictures, labels = rendered.images, list(rendered.labels)
        elif args.command == "textdiff":
            rendered = manipulate.text_diff(
                pipe,
                inputs[args.image],
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
                pipe, inputs[args.image], basis, ks, args.seed, progress=True
            )
            pictures, labels = rendered.images, list(rendered.labels)
    except (ValueError, FileNotFoundError) as error:
        print(f"clipgen {args.command}: {one_line(error)}", file=sys.stderr)
        return 2
    grid = images.grid(list(pictures), labels, columns=args.columns, cell=args.cell)
    print(f"wrote {images.save_png(args.out, grid)}")
    return 0


def _diffusion_stages() -> list[str]:
    """The cascade's diffusion stages (clipgen.stages), whose sampling the commands set."""
    from clipgen import stages

    return [spec.name for spec in stages.cascade() if spec.role != "clip"]


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
