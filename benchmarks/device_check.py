"""The accelerator check: train-step figures of the benchmark presets and of one preset that
fills the accelerator, in bfloat16 and float32, and the cascade's sampling time, as JSON
lines. `benchmarks/device_check.sh` runs it (and installs what it needs from wheels).

  python benchmarks/device_check.py [--out DIR] [--cpu]

Without --cpu (on a GPU or TPU): the prior, decoder and upsampler `bench` presets and the
decoder at paper width (configs/decoder.py:paper, batch 64), each in both dtypes; then the
demo cascade (random weights) drawing 64 captions. With --cpu (any machine, so that the
script cannot rot): the prior's `tiny` preset, 2 timed steps, 4 captions of the tiny
cascade, and no device memory statistics. Imports nothing of TensorFlow,
tensorflow-datasets or clu.

Each line is one record. "machine": the device and the matmul peak. "train_step": preset,
dtype, devices, platform, global_batch, compile_s, step_s (median), examples_per_s,
step_gflop_per_device (XLA's cost analysis), mfu (that over the step time, against
`matmul_peak_tflops`: a bfloat16 matmul measured in the same run on an accelerator, float32
on the CPU), compiled_memory_gib (arguments + outputs + temporaries of the compiled step),
peak_memory_gib (the device's peak bytes in use; null on the CPU). "cascade_sampling":
captions, first_call_s (with compiling), seconds (a second call), images_per_s. "error":
what failed (a record that could not be taken does not stop the others).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

from train_step import matmul_peak_flops, step_times  # benchmarks/ is on sys.path

GPU_PRESETS = (
    ("prior", "bench", {}),
    ("decoder", "bench", {}),
    ("upsampler", "bench", {}),
    # The paper's decoder width with CLIP text (its GLIDE text transformer reads token ids,
    # which the synthetic batches lack), at batch 64.
    ("decoder", "paper", {"batch_size": 64, "model.text_transformer": None}),
)
CPU_PRESETS = (("prior", "tiny", {}),)  # the smoke mode exercises each record's code once


def train_step_record(name, preset, overrides, dtype, steps, warmup, peak) -> dict:
    """Figures of one preset's compiled train step in `dtype`."""
    import jax

    from clipgen import config as config_lib
    from clipgen import train
    from clipgen.train import loop

    config = config_lib.load_preset(name, preset, overrides)
    config.model.dtype = dtype
    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    if "embeddings" in config.data:
        config.data.embeddings = "synthetic"
        config.data.num_examples = dict(train=max(int(config.batch_size), 8))
    stage = train.trainer(config.stage).make_stage(config)
    run = loop.prepare(config, stage)
    times = step_times(run, stage, config.batch_size, steps, warmup)
    step = statistics.median(times)
    analysis = run.step.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    flops = float(analysis.get("flops", float("nan")))  # per device
    memory = run.step.memory_analysis()
    compiled = sum(
        getattr(memory, field, 0) or 0
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    )
    stats = jax.devices()[0].memory_stats() or {}
    peak_bytes = stats.get("peak_bytes_in_use")
    return {
        "record": "train_step",
        "preset": f"configs/{name}.py:{preset}",
        "overrides": overrides,
        "dtype": dtype,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "global_batch": int(config.batch_size),
        "compile_s": round(run.compile_seconds, 2),
        "step_s": round(step, 5),
        "examples_per_s": round(config.batch_size / step, 2),
        "step_gflop_per_device": round(flops / 1e9, 2),
        "mfu": round(flops / step / peak, 4),
        "matmul_peak_tflops": round(peak / 1e12, 2),
        "compiled_memory_gib": round(compiled / 2**30, 3),
        "peak_memory_gib": None if peak_bytes is None else round(peak_bytes / 2**30, 3),
    }


def cascade_sampling_record(preset: str, captions: int) -> dict:
    """Seconds the demo-size cascade (random weights: timing only) takes for `captions`."""
    import jax
    from flax import linen as nn

    from clipgen import build, stages
    from clipgen.data.pipeline import ProceduralShapes
    from clipgen.models.clip import init_clip
    from clipgen.models.decoder import init_decoder
    from clipgen.models.prior import init_prior
    from clipgen.models.upsampler import init_upsampler
    from clipgen.pipelines import unclip

    configs = {spec.name: spec.config(preset) for spec in stages.cascade()}
    size = configs["decoder"].data.resolution
    for name in ("upsampler", "upsampler2"):
        size *= configs[name].data.scale
        configs[name].data.update(resolution=size, crop=min(configs[name].data.crop, size))
    clip = configs["clip"]
    dims = dict(
        embedding_dim=clip.model.projection_dim,
        text_token_dim=clip.model.text.width,
        num_text_tokens=clip.data.context_length,
    )
    configs["prior"].model.update(**dims)
    configs["decoder"].model.update(
        clip_embed_dim=dims["embedding_dim"],
        text_width=dims["text_token_dim"],
        num_text_tokens=dims["num_text_tokens"],
    )
    key = jax.random.key(0)
    inits = {
        "clip": lambda m, c: init_clip(m, key),
        "prior": lambda m, c: init_prior(m, key),
        "decoder": lambda m, c: init_decoder(
            m, key, c.data.resolution, text_length=c.model.num_text_tokens
        ),
        "upsampler": lambda m, c: init_upsampler(m, key, c.data.crop, c.data.crop // c.data.scale),
    }
    params = {}
    for spec in stages.cascade():
        config = configs[spec.name]
        init = inits[spec.role]
        params[spec.name] = nn.meta.unbox(init(build.module(config), config))["params"]
    pipe = unclip.from_configs(configs, params)
    texts = [ProceduralShapes((), "test", 0)[i]["caption"] for i in range(captions)]
    start = time.perf_counter()
    pipe.generate(texts, seed=0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    pipe.generate(texts, seed=1)
    seconds = time.perf_counter() - start
    return {
        "record": "cascade_sampling",
        "preset": preset,
        "captions": captions,
        "resolution": pipe.resolution,
        "platform": jax.devices()[0].platform,
        "first_call_s": round(first, 2),
        "seconds": round(seconds, 3),
        "images_per_s": round(captions / seconds, 2),
    }


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="device_check_out", help="JSON lines go here")
    parser.add_argument("--cpu", action="store_true", help="the smoke mode (see the docstring)")
    parser.add_argument("--steps", type=int, help="timed steps per preset (10; --cpu: 2)")
    args = parser.parse_args(argv)
    import jax

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "device_check.jsonl"
    accelerator = jax.devices()[0].platform != "cpu"
    if not accelerator and not args.cpu:
        parser.error("no accelerator here: pass --cpu for the smoke mode")
    presets, steps, captions = (
        (GPU_PRESETS, args.steps or 10, 64) if not args.cpu else (CPU_PRESETS, args.steps or 2, 4)
    )
    peak_dtype = "bfloat16" if accelerator else "float32"
    peak = matmul_peak_flops(8192 if accelerator else 1024, dtype=peak_dtype)
    records = [
        {
            "record": "machine",
            "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(),
            "jax": jax.__version__,
            "python": platform.python_version(),
            "matmul_peak_tflops": round(peak / 1e12, 2),
            "matmul_dtype": peak_dtype,
        }
    ]
    jobs = [
        (lambda n=n, p=p, o=o, d=d: train_step_record(n, p, o, d, steps, 2, peak))
        for n, p, o in presets
        for d in ("bfloat16", "float32")
    ]
    jobs.append(lambda: cascade_sampling_record("tiny" if args.cpu else "demo", captions))
    with lines.open("w") as file:
        file.write(json.dumps(records[0]) + "\n")
        for job in jobs:
            try:
                record = job()
            except Exception as error:  # noqa: BLE001 - one failure must not stop the check
                record = {"record": "error", "error": repr(error), "trace": traceback.format_exc()}
            records.append(record)
            file.write(json.dumps(record) + "\n")
            file.flush()
            print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
