"""Converters from public checkpoint formats into clipgen params."""

from clipgen.weights.clip import (
    clip_config_from_hf,
    load_clip,
    load_clip_towers,
    load_openai_clip,
)
from clipgen.weights.inception import load_inception
from clipgen.weights.pipeline import load_scheduler, read_model_index
from clipgen.weights.prior import load_prior, load_prior_state_dict
from clipgen.weights.unet import load_unet

__all__ = [
    "clip_config_from_hf",
    "load_clip",
    "load_clip_towers",
    "load_inception",
    "load_openai_clip",
    "load_prior",
    "load_prior_state_dict",
    "load_scheduler",
    "read_model_index",
    "load_unet",
]
