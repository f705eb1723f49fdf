"""DiffusionCLIP: the memory of one fine-tuning step at 256 px, and the seconds of an edit at
the demo's size.

  python benchmarks/edit.py memory [--modes exact exact_unrolled exact_steps efficient official]
      [--dtypes float32 bfloat16]
  python benchmarks/edit.py speed [--images 16] [--steps 5]

`memory`: one fine-tuning step of configs/edit.py:paper (the 256 px DDPM of
google/ddpm-celebahq-256, batch 1, S_gen 6, a ViT-B/16-shaped CLIP image tower at 224 px
in the loss, Adam), lowered and compiled for the CPU, never run; XLA's memory analysis of
the compiled step (arguments, outputs, temporaries; donated state aliases its output).
"exact" checkpoints every generation step and, inside the UNet, every block (the paper
preset's remat); "exact_steps" only every generation step; "official" is the exact step
without any checkpointing, as the official code backpropagates (the activations of all
S_gen UNet calls held); "exact_unrolled" is "exact" with its steps unrolled (`edit.unroll`,
the demo's choice for speed on the CPU). The official README states 24 GB (exact) and
12 GB (efficient) of GPU memory at 256 px. Prints one JSON line per variant.

`speed`: at the demo's size (configs/edit.py:demo: the 32 px `unet` demo shape, the demo CLIP
shape, random weights: timing does not depend on them), the seconds to invert and edit
`--images` images with S_inv = S_test = 40, and the median seconds of an exact (its S_gen
steps unrolled, and "exact_rolled" a scan) and of an efficient fine-tuning step (batch 8).
One JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

GIB = 2**30
# OpenAI's ViT-B/16 image tower (DiffusionCLIP's default CLIP) at 224 px.
VIT_B16 = dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072)


def memory(mode: str, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from clipgen import build, edit
    from clipgen import config as config_lib
    from clipgen.models.clip import CLIP, VisionConfig, init_clip
    from clipgen.models.unet import UNet, UNetConfig, init_unet
    from clipgen.train import edit as edit_stage
    from clipgen.train import loop

    config = config_lib.load_preset("edit", "paper")
    official = mode == "official"
    config.edit.mode = "efficient" if mode == "efficient" else "exact"
    config.model.dtype = dtype
    config.model.unet.remat = mode in ("exact", "efficient")
    unet = UNet(UNetConfig(**config.model.unet.to_dict()), jnp.dtype(dtype))
    backbone = edit.Backbone(unet, build.diffusion(config), 256)
    clip = CLIP(VisionConfig(**VIT_B16, act="quick_gelu"), None, 512, dtype=jnp.dtype(dtype))
    clip_shapes = jax.eval_shape(lambda k: nn.meta.unbox(init_clip(clip, k)), jax.random.key(0))
    direction = np.full((512,), 512**-0.5, np.float32)
    config.edit.remat = not official
    config.edit.unroll = mode == "exact_unrolled"
    loss = edit_stage.edit_loss(config, backbone, clip, None, 0.0)

    def batch_spec(size):
        image = jax.ShapeDtypeStruct((size, 256, 256, 3), jnp.float32)
        return {"image": image, "latent": image, "step": jax.ShapeDtypeStruct((size,), jnp.int32)}

    def constants():
        zeros = lambda s: np.zeros(s.shape, np.float32)  # noqa: E731
        return {
            "clip": jax.tree_util.tree_map(zeros, clip_shapes["params"]),
            "direction": direction,
        }

    stage = loop.Stage(
        "edit",
        lambda rng: init_unet(unet, rng, 256)["params"],
        loss,
        None,
        batch_spec,
        constants=constants,
    )
    started = time.perf_counter()
    run = loop.prepare(config, stage, jax.devices()[:1], compile_step=False)
    compiled = run.step.compile()
    seconds = time.perf_counter() - started
    analysis = compiled.memory_analysis()
    arguments, outputs = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
    temporaries, aliased = analysis.temp_size_in_bytes, analysis.alias_size_in_bytes
    peak = arguments + outputs - aliased + temporaries
    stated = 12 if mode == "efficient" else 24
    return {
        "benchmark": "edit_memory",
        "mode": mode,
        "dtype": dtype,
        "resolution": 256,
        "gen_steps": config.edit.gen_steps,
        "batch": 1,
        "peak_gib": round(peak / GIB, 2),
        "arguments_gib": round(arguments / GIB, 2),
        "temporaries_gib": round(temporaries / GIB, 2),
        "official_stated_gib": stated,
        "unet_parameters_m": round(
            sum(x.size for x in jax.tree.leaves(run.abstract_state.params)) / 1e6, 1
        ),
        "compile_seconds": round(seconds, 1),
        "device": jax.devices()[0].device_kind,
    }


def speed(images: int, steps: int) -> dict:
    import jax

    from clipgen import build, edit, parallel
    from clipgen import config as config_lib
    from clipgen.pipelines import edit as edit_pipeline
    from clipgen.train import edit as edit_stage
    from clipgen.train import loop

    result = {"benchmark": "edit_speed", "images": images, "device": jax.devices()[0].device_kind}
    config = config_lib.load_preset("edit", "demo")
    config.base.source = "random"
    config.clip = dict(build.CLIP_SOURCE, source="random", preset="demo")
    inputs = edit.shapes_with("red", "heldout", images, config.data.resolution)[0]
    editor = edit_pipeline.Editor(config)
    found = edit_pipeline.Edit(config, editor.base)
    for label in ("first (compiling)", "second"):
        started = time.perf_counter()
        editor.cache.memory.clear()
        editor.apply(inputs, [found])
        result[f"edit_seconds_per_image_{label.split()[0]}"] = round(
            (time.perf_counter() - started) / images, 3
        )
    for mode in ("exact", "exact_rolled", "efficient"):
        config.edit.mode = "exact" if mode == "exact_rolled" else mode
        config.edit.unroll = mode != "exact_rolled"
        stage = edit_stage.make_stage(config)
        run = loop.prepare(config, stage, jax.devices()[:1])
        state, batches, times = run.init_state(), stage.batches(0, config.batch_size), []
        with jax.set_mesh(run.mesh):
            for index in range(steps + 1):
                batch = parallel.global_batch(next(batches), run.mesh)
                started = time.perf_counter()
                state, metrics = run.step(state, batch, run.constants)
                jax.block_until_ready(metrics)
                if index:
                    times.append(time.perf_counter() - started)
        result[f"{mode}_step_seconds"] = round(statistics.median(times), 3)
        result[f"{mode}_steps_per_image"] = config.edit.gen_steps if mode == "efficient" else 1
    result["batch"] = config.batch_size
    result["resolution"] = config.data.resolution
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory")
    modes = ["exact", "exact_unrolled", "exact_steps", "efficient", "official"]
    mem.add_argument("--modes", nargs="+", default=modes, choices=modes)
    mem.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    fast = sub.add_parser("speed")
    fast.add_argument("--images", type=int, default=16)
    fast.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.what == "memory":
        for mode in args.modes:
            for dtype in args.dtypes:
                print(json.dumps(memory(mode, dtype)), flush=True)
    else:
        print(json.dumps(speed(args.images, args.steps)), flush=True)


if __name__ == "__main__":
    main()
