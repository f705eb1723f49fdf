"""CLIP score (image-caption agreement) and the Frechet distance in CLIP image-embedding
space, with the conventions every report must name: backbone, scale, clamp, caption prefix.

Published conventions differ (see shared/reference/evaluation.md):
- torchmetrics `CLIPScore`: 100 * cos per sample, the clamp at 0 on the *mean*, ViT-L/14 by
  default, no prefix: `clip_score(..., **CONVENTIONS["torchmetrics"])`.
- Hessel et al. CLIPScore: 2.5 * max(cos, 0) per sample, ViT-B/32, captions prefixed with
  "A photo depicts ": `clip_score(..., **CONVENTIONS["clipscore_paper"])`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clipgen.eval.fid import frechet_distance, mean_cov

CLAMP_PLACES = ("per_sample", "mean", "none")
CONVENTIONS: dict[str, dict[str, Any]] = {
    "torchmetrics": {"scale": 100.0, "clamp": "mean", "caption_prefix": ""},
    "clipscore_paper": {"scale": 2.5, "clamp": "per_sample", "caption_prefix": "A photo depicts "},
}


def _unit(embeds: Any) -> np.ndarray:
    embeds = np.asarray(embeds, np.float64)
    if embeds.ndim != 2:
        raise ValueError(f"expected embeddings (N, d), got shape {embeds.shape}")
    return embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)


def clip_score(
    image_embeds: Any,
    text_embeds: Any,
    *,
    backbone: str,
    scale: float = 100.0,
    clamp: str = "per_sample",
    caption_prefix: str = "",
) -> dict[str, Any]:
    """Mean of scale * cos(image_i, caption_i) over paired projected embeddings (N, d),
    L2-normalised here, with the clamp at 0 per sample before the mean, on the mean, or none.

    `backbone` and `caption_prefix` (which the caller put before each caption before
    encoding) are only recorded. Returns {"clip_score", "per_sample", "num_samples",
    "backbone", "scale", "clamp", "caption_prefix"}.
    """
    if clamp not in CLAMP_PLACES:
        raise ValueError(f"unknown clamp {clamp!r}; expected one of {CLAMP_PLACES}")
    images, texts = _unit(image_embeds), _unit(text_embeds)
    if images.shape != texts.shape:
        raise ValueError(f"image {images.shape} and text {texts.shape} embeddings do not pair")
    per_sample = scale * np.sum(images * texts, axis=-1)
    if clamp == "per_sample":
        per_sample = np.maximum(per_sample, 0.0)
    score = float(per_sample.mean())
    if clamp == "mean":
        score = max(score, 0.0)
    return {
        "clip_score": score,
        "per_sample": per_sample,
        "num_samples": len(per_sample),
        "backbone": backbone,
        "scale": float(scale),
        "clamp": {
            "per_sample": "max(., 0) per sample, before the mean",
            "mean": "max(., 0) on the mean",
            "none": "none",
        }[clamp],
        "caption_prefix": caption_prefix,
    }


def clip_frechet_distance(real_embeds: Any, fake_embeds: Any, normalize: bool = False) -> float:
    """Frechet distance between Gaussians fitted to two sets of CLIP image embeddings (N, d),
    float64; clean-fid's CLIP-FID uses the embeddings as the image encoder returns them
    (`normalize=False`)."""
    if normalize:
        real_embeds, fake_embeds = _unit(real_embeds), _unit(fake_embeds)
    mu_real, sigma_real = mean_cov(real_embeds)
    mu_fake, sigma_fake = mean_cov(fake_embeds)
    return frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
