"""diffusers pipeline folders (`DiffusionPipeline.save_pretrained`): the `model_index.json`
that names the pipeline and its components, and the `UnCLIPScheduler` configs that Karlo's
and Kandinsky 2.2's prior pipelines sample with, read into clipgen's diffusion processes.
The components themselves load with `load_clip`, `load_prior` and `load_unet`; which
pipelines clipgen assembles from them is `clipgen.pipelines.public`'s business.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from clipgen.data.json_input import (
    BOOL,
    NUMBER,
    POSITIVE_INT,
    STR,
    Fields,
    either,
    list_of,
    optional,
    read_json_object,
)
from clipgen.diffusion.gaussian import Diffusion, make_diffusion
from clipgen.errors import InputError

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
    """A pipeline folder's model_index.json: `_class_name` and component -> [library, class]
    (or null for a component the pipeline was saved without); an InputError names the file
    otherwise."""
    index_path = Path(path) / MODEL_INDEX
    index = read_json_object(
        index_path,
        "a diffusers pipeline folder's index (save_pretrained)",
        fix="fix it, or re-save the pipeline with save_pretrained",
    )
    _index_fields(index, path).get("_class_name", None, STR)
    return index


def _index_fields(index: dict[str, Any], path: str | Path) -> Fields:
    return Fields(
        index, str(Path(path) / MODEL_INDEX), "fix it, or re-save the pipeline with save_pretrained"
    )


def component_dir(
    path: str | Path, index: dict[str, Any], name: str, class_names: str | tuple[str, ...]
) -> Path:
    """The folder of component `name`, checked to hold one of `class_names` per the index."""
    allowed = (class_names,) if isinstance(class_names, str) else tuple(class_names)
    entry = _index_fields(index, path).get(name, None, optional(list_of(optional(STR), 2)))
    if not entry or entry[-1] not in allowed:
        found = entry[-1] if entry else "nothing"
        raise InputError(
            f"{Path(path) / MODEL_INDEX}: component {name!r} is {found}; clipgen reads "
            f"{' or '.join(allowed)} there"
        )
    directory = Path(path) / name
    if not directory.is_dir():
        raise InputError(
            f"{directory} is missing ({MODEL_INDEX} lists the component {name!r}, a "
            f"{entry[-1]}): copy the whole pipeline folder, or re-save it with save_pretrained"
        )
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
    clipgen cannot read or express raises an InputError naming the file and the field."""
    config_path = Path(path) / "scheduler_config.json"
    config = read_json_object(config_path, "a diffusers UnCLIPScheduler config")
    fields = Fields(config, str(config_path))
    class_name = fields.get("_class_name", "UnCLIPScheduler", STR)
    if class_name != "UnCLIPScheduler":
        raise fields.error(f"a {class_name}; clipgen reads UnCLIPScheduler")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _SCHEDULER_FIELDS)
    if unknown:
        raise fields.error(f"scheduler fields clipgen does not know: {unknown}")
    schedule = fields.get("beta_schedule", "squaredcos_cap_v2", STR)
    prediction = fields.get("prediction_type", "epsilon", STR)
    variance = fields.get("variance_type", "fixed_small_log", STR)
    for field, value, known in (
        ("beta_schedule", schedule, ("squaredcos_cap_v2",)),
        ("prediction_type", prediction, tuple(_PREDICTIONS)),
        ("variance_type", variance, tuple(_VARIANCES)),
    ):
        if value not in known:
            fields.fail(field, f"is {value!r}; clipgen reads {known}")
    steps = fields.get("num_train_timesteps", 1000, POSITIVE_INT)
    clipped = fields.get("clip_sample", True, BOOL)
    clip_range = fields.get("clip_sample_range", 1.0, NUMBER)
    if clip_range <= 0:
        fields.fail("clip_sample_range", f"is {clip_range}; it must be positive")
    diffusion = make_diffusion(
        "cosine",  # squaredcos_cap_v2: s = 0.008, betas capped at 0.999
        steps,
        prediction=_PREDICTIONS[prediction],
        variance=_VARIANCES[variance],
        arithmetic="float32",  # the scheduler's own
    )
    return Scheduler(diffusion, float(clip_range) if clipped else math.inf)


def sample_size(path: str | Path) -> int:
    """A diffusers UNet folder's `sample_size` (the resolution it draws at)."""
    config_path = Path(path) / "config.json"
    fields = Fields(read_json_object(config_path, "a diffusers model config"), str(config_path))
    size = fields.get("sample_size", None, either(POSITIVE_INT, list_of(POSITIVE_INT, 1)))
    if isinstance(size, list):
        if len(set(size)) != 1:
            fields.fail("sample_size", f"is {size}, not square; clipgen draws square images")
        size = size[0]
    if size is None:
        fields.fail("sample_size", "is missing; clipgen needs the resolution the UNet draws at")
    return size
