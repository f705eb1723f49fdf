"""Converters from public checkpoint formats into clipgen params."""

from clipgen.weights.clip import clip_config_from_hf, load_clip, load_openai_clip

__all__ = ["clip_config_from_hf", "load_clip", "load_openai_clip"]
