"""`clipgen op`: apply a trained pOps operator to images or embedding files, write the output
embedding file and its rendering through the cascade."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipgen.errors import one_line


def add_commands(commands) -> dict:
    op = commands.add_parser(
        "op", help="apply a pOps operator (union, recolour, scene, instruct) to inputs"
    )
    op.add_argument("name", help="the operator: union, recolour, scene or instruct")
    op.add_argument(
        "--inputs", nargs="+", required=True, help="images, or .npz files an earlier op wrote"
    )
    op.add_argument(
        "--checkpoints", required=True, help="the cascade's workdir (clip, prior, decoder, ...)"
    )
    op.add_argument("--operator", help="the operator run (default CHECKPOINTS/operators/NAME)")
    op.add_argument("--out", required=True, help="PREFIX: writes PREFIX.npz and PREFIX.png")
    op.add_argument("--word", help="instruct's word (larger, smaller, a position, a colour)")
    op.add_argument("--drop", type=int, nargs="*", default=(), help="input indices to leave out")
    op.add_argument("--guidance", type=float, help="classifier-free guidance (default: its own)")
    op.add_argument("--mean", action="store_true", help="also render the mean-of-inputs baseline")
    op.add_argument("--seed", type=int, default=0)
    op.add_argument("--preset", default="demo", help="configs for runs that store none")
    return {"op": run}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from clipgen import images
    from clipgen.data import preprocess
    from clipgen.data.image_input import read_image
    from clipgen.pipelines import embed, unclip
    from clipgen.pipelines import operators as operator_pipeline

    read = {path: read_image(path) for path in args.inputs if not path.endswith(".npz")}
    try:
        pipe = unclip.load_pipeline({"workdir": args.checkpoints, "preset": args.preset})
        run_dir = args.operator or Path(args.checkpoints) / "operators" / args.name
        operator = operator_pipeline.load_operator(run_dir)
        if operator.spec.name != args.name:
            raise ValueError(f"{run_dir} holds the {operator.spec.name} operator, not {args.name}")
        inputs, pictures = [], []
        for path in args.inputs:
            if path.endswith(".npz"):
                embeds = operator_pipeline.load_embeddings(path, operator)
                pictures.append(operator_pipeline.render(pipe, embeds, args.seed)[0])
            else:
                image = read[path]
                embeds = np.asarray(pipe.encode_images([image]))
                pictures.append(preprocess.resize_and_crop(image, pipe.resolution))
            inputs.append(embeds)
        text = {}
        if operator.spec.text:
            if not args.word:
                raise ValueError("instruct needs --word")
            encoded = pipe.encode_text([args.word])
            slots = embed.INSTRUCTION_TOKENS
            text = dict(text_states=encoded.tokens[:, :slots], text_mask=encoded.mask[:, :slots])
        dropped = [i in args.drop for i in range(len(inputs))]
        output = operator(inputs, args.seed, guidance=args.guidance, dropped=dropped, **text)
        operator_pipeline.save_embeddings(
            f"{args.out}.npz", output, operator=args.name, inputs=list(args.inputs)
        )
        pictures.append(operator_pipeline.render(pipe, output, args.seed)[0])
        labels = [*(Path(p).name for p in args.inputs), f"{args.name} {args.word or ''}".strip()]
        if args.mean:
            baseline = operator.mean_baseline(inputs)
            pictures.append(operator_pipeline.render(pipe, baseline, args.seed)[0])
            labels.append("mean baseline")
    except (ValueError, FileNotFoundError) as error:
        print(f"clipgen op: {one_line(error)}", file=sys.stderr)
        return 2
    grid = images.grid(pictures, labels, columns=len(pictures), cell=128)
    print(f"wrote {args.out}.npz and {images.save_png(f'{args.out}.png', grid)}")
    return 0
