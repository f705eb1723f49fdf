"""Prompt templates for text directions: OpenAI CLIP's ImageNet templates (the 79
DiffusionCLIP averages its text direction over, `utils/text_templates.py`), and templates
drawn from the shapes world's own captions, which a shapes-world CLIP has read."""

from __future__ import annotations

import re

import numpy as np

from clipgen.data import shapes

IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def shapes_templates(word: str, count: int = 32, seed: int = 0) -> tuple[str, ...]:
    """Up to `count` distinct shapes-world captions that hold `word` (a colour, shape, size,
    position or background word), with its first occurrence replaced by "{}": an edit's
    source and target words put in the same caption give its text direction."""
    pattern = re.compile(rf"\b{re.escape(word)}\b")
    rng = np.random.default_rng([seed, 7])
    found: list[str] = []
    for _ in range(200 * count):
        caption = shapes.caption(shapes.sample_scene(rng, "train"))
        if pattern.search(caption):
            template = pattern.sub("{}", caption, count=1)
            if template not in found:
                found.append(template)
            if len(found) == count:
                break
    if not found:
        raise ValueError(f"no shapes-world caption holds the word {word!r}")
    return tuple(found)
