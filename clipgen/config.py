"""Configs: the training loop's fields, which every stage's `get_config(arg)` starts from,
and the presets of `configs/<stage>.py` (found in the checkout, or in the copy that
`pip install` ships as `clipgen.configs`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections
from ml_collections import config_dict

import clipgen
from clipgen import parallel
from clipgen.errors import InputError

NONFINITE_POLICIES = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
    """Loop, mesh, optimizer and checkpoint settings with their defaults; a stage fills
    `stage`, `model` and `data` and adjusts the rest."""
    config = ml_collections.ConfigDict()
    config.stage = ""  # a module clipgen.train.<stage> (or an importable module) with make_stage
    config.seed = 0
    config.total_steps = 1000
    config.batch_size = 32  # global, over all devices and hosts
    config.log_every = 50
    config.eval_every = 0
    config.preview_every = 0
    config.on_nonfinite = "stop"  # or "skip": drop the update and count it

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding_rules = [list(rule) for rule in parallel.DEFAULT_RULES]
    config.fsdp_min_size = 2**14  # unnamed parameters smaller than this stay replicated

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 1e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.optim.warmup_steps = 0
    config.optim.schedule = "cosine"
    config.optim.decay_steps = config.get_ref("total_steps")
    config.optim.final_lr_fraction = 0.0
    config.optim.ema_decays = (0.9999,)
    config.optim.frozen = ()  # regexes over "/"-joined parameter paths never to update

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1000
    config.checkpoint.keep = 3
    config.checkpoint.keep_every = 0
    config.checkpoint.asynchronous = True

    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = config_dict.placeholder(str)
    config.distributed.num_processes = config_dict.placeholder(int)
    config.distributed.process_id = config_dict.placeholder(int)
    config.distributed.local_device_ids = config_dict.placeholder(tuple)

    config.model = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict()
    # Evaluators by name, each {"type": a module of clipgen.eval.evaluators, its settings};
    # `clipgen train` and the demo hand them to the loop, which runs them every eval_every.
    config.evals = ml_collections.ConfigDict()
    return config


def tiny_loop(config: ml_collections.ConfigDict, batch_size: int, eval_every: int = 0) -> None:
    """The loop settings of a `tiny` preset (tests): 4 steps of `batch_size`, metrics and
    checkpoints every 2, one warm-up step, no previews."""
    config.batch_size = batch_size
    config.total_steps = 4
    config.log_every = 2
    config.eval_every = eval_every
    config.preview_every = 0
    config.checkpoint.every = 2
    config.optim.warmup_steps = 1


def validate(config: ml_collections.ConfigDict) -> None:
    """Fail on values the loop cannot run with, naming the key, before anything compiles."""
    problems = []
    if not config.stage:
        problems.append("config.stage is empty: name the stage module")
    for key in ("total_steps", "batch_size", "log_every"):
        if config[key] < 1:
            problems.append(f"config.{key} must be >= 1, got {config[key]}")
    if config.checkpoint.every < 1:
        problems.append(f"config.checkpoint.every must be >= 1, got {config.checkpoint.every}")
    if config.on_nonfinite not in NONFINITE_POLICIES:
        problems.append(
            f"config.on_nonfinite must be one of {NONFINITE_POLICIES}, got {config.on_nonfinite!r}"
        )
    if config.optim.schedule not in ("cosine", "constant", "step"):
        problems.append(
            f"config.optim.schedule: {config.optim.schedule!r} (cosine, constant or step)"
        )
    elif config.optim.schedule == "step" and config.optim.get("step_every", 0) < 1:
        problems.append("config.optim.step_every must be >= 1 with the step schedule")
    if not config.optim.ema_decays:
        problems.append("config.optim.ema_decays is empty: give at least one decay")
    for decay in config.optim.ema_decays:
        if not 0.0 < decay < 1.0:
            problems.append(f"config.optim.ema_decays: {decay} is not in (0, 1)")
    unknown_axes = set(config.mesh) - set(parallel.MESH_AXES)
    if unknown_axes:
        problems.append(f"config.mesh: unknown axes {sorted(unknown_axes)}")
    sizes = list(config.mesh.values())
    if any(size == 0 or size < -1 for size in sizes) or sizes.count(-1) > 1:
        problems.append(f"config.mesh: sizes >= 1 and at most one -1; got {dict(config.mesh)}")
    if problems:
        raise InputError("bad config: " + "; ".join(problems))


def preset_path(name: str) -> Path:
    """`configs/<name>.py`: the copy installed with the package (`clipgen/configs/`), or
    the checkout's when clipgen runs from one."""
    package = Path(clipgen.__file__).parent
    for path in (package / "configs" / f"{name}.py", package.parent / "configs" / f"{name}.py"):
        if path.is_file():
            return path
    raise InputError(
        f"no config file {name}.py in {package / 'configs'} or {package.parent / 'configs'}; "
        "clipgen's own stages are clip, prior, ar_prior, decoder, upsampler and eval"
    )


def load_preset(name: str, preset: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """`configs/<name>.py:<preset>` (see `preset_path`) with `overrides` set, by dotted key
    ("batch_size", "model.unet.remat") -> value."""
    path = preset_path(name)
    spec = importlib.util.spec_from_file_location(f"clipgen_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.update_from_flattened_dict(overrides or {})
    return config
