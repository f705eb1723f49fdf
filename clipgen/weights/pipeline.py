"""diffusers pipeline folders (`DiffusionPipeline.save_pretrained`): the `model_index.json`
that names the pipeline and its components, and the `UnCLIPScheduler` configs that Karlo's
and Kandinsky 2.2's prior pipelines sample with, read into clipgen's diffusion processes.
The components themselves load with `load_clip`, `load_prior` and `load_unet`; which
pipelines clipgen assembles from them is `clipgen.pipelines.public`'s business.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from clipgen.diffusion.gaussian import Diffusion, make_diffusion

MODEL_INDEX = "model_index.json"

# UnCLIPScheduler's names -> clipgen's.
_PREDICTIONS = {"epsilon": "eps", "sample": "x0"}
_VARIANCES = {"fixed_small_log": "fixed_small", "learned_range": "learned_range"}
_SCHEDULER_FIELDS = {
    "num_train_timesteps",
    "variance_type",
    "clip_sample",
    "clip_sample_range",
    "prediction_type",
    "beta_schedule",
}


def read_model_index(path: str | Path) -> dict[str, Any]:
    """A pipeline folder's model_index.json: `_class_name` and component -> [library, class]."""
    index = Path(path) / MODEL_INDEX
    if not index.is_file():
        raise FileNotFoundError(
            f"{path} has no {MODEL_INDEX} (expected a diffusers pipeline folder written by "
            "save_pretrained)"
        )
    return json.loads(index.read_text())


def component_dir(
    path: str | Path, index: dict[str, Any], name: str, class_names: str | tuple[str, ...]
) -> Path:
    """The folder of component `name`, checked to hold one of `class_names` per the index."""
    allowed = (class_names,) if isinstance(class_names, str) else tuple(class_names)
    entry = index.get(name)
    if not entry or entry[-1] not in allowed:
        found = entry[-1] if entry else "nothing"
        raise ValueError(
            f"{Path(path) / MODEL_INDEX}: component {name!r} is {found}; clipgen reads "
            f"{' or '.join(allowed)} there"
        )
    directory = Path(path) / name
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing (model_index.json lists it)")
    return directory


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """What an `UnCLIPScheduler` config says about sampling: the (unspaced) diffusion process
    with its prediction and variance and the scheduler's float32 arithmetic, and the clamp
    of the x0 estimate (inf: none). Its timesteps are clipgen's "unclipN" respacing
    (clipgen.diffusion.schedules)."""

    diffusion: Diffusion
    clip: float


def load_scheduler(path: str | Path) -> Scheduler:
    """An `UnCLIPScheduler` folder (scheduler_config.json) as a clipgen process; anything
    clipgen cannot express raises a ValueError naming the field."""
    config_path = Path(path) / "scheduler_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no scheduler_config.json")
    config = json.loads(config_path.read_text())
    source = str(config_path)
    if config.get("_class_name", "UnCLIPScheduler") != "UnCLIPScheduler":
        raise ValueError(f"{source}: a {config['_class_name']}; clipgen reads UnCLIPScheduler")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _SCHEDULER_FIELDS)
    if unknown:
        raise ValueError(f"{source}: scheduler fields clipgen does not know: {unknown}")
    schedule = config.get("beta_schedule", "squaredcos_cap_v2")
    prediction = config.get("prediction_type", "epsilon")
    variance = config.get("variance_type", "fixed_small_log")
    for field, value, known in (
        ("beta_schedule", schedule, ("squaredcos_cap_v2",)),
        ("prediction_type", prediction, tuple(_PREDICTIONS)),
        ("variance_type", variance, tuple(_VARIANCES)),
    ):
        if value not in known:
            raise ValueError(f"{source}: unsupported {field}={value!r}; clipgen reads {known}")
    diffusion = make_diffusion(
        "cosine",  # squaredcos_cap_v2: s = 0.008, betas capped at 0.999
        int(config.get("num_train_timesteps", 1000)),
        prediction=_PREDICTIONS[prediction],
        variance=_VARIANCES[variance],
        arithmetic="float32",  # the scheduler's own
    )
    clipped = config.get("clip_sample", True)
    return Scheduler(
        diffusion, float(config.get("clip_sample_range", 1.0)) if clipped else math.inf
    )


def sample_size(path: str | Path) -> int:
    """A diffusers UNet folder's `sample_size` (the resolution it draws at)."""
    config = json.loads((Path(path) / "config.json").read_text())
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{path}/config.json: non-square sample_size {size}")
        size = size[0]
    if not size:
        raise ValueError(f"{path}/config.json gives no sample_size")
    return int(size)
