"""How good a prior's image embeddings are, in the shapes world.

For each caption: the cosine of the sampled image embedding to the caption's true image
embedding and to its text embedding, and retrieval: the sampled embedding's nearest true
image embedding in a gallery (the evaluation split's images) must show a scene that
matches the caption, as the shapes oracle reads the gallery image. The same retrieval
with the text embedding itself as the query is the baseline a prior has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipgen.data import shapes


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def matching_retrieval(
    queries: np.ndarray,
    gallery: np.ndarray,
    caption_scenes: Sequence[shapes.Scene],
    gallery_scenes: Sequence[shapes.Scene],
) -> dict[str, float]:
    """The fraction of queries whose nearest gallery embedding (cosine) shows a scene that
    matches the query's caption, whole and per attribute."""
    nearest = (_unit(queries) @ _unit(gallery).T).argmax(axis=1)
    results = [
        shapes.attribute_accuracy(gallery_scenes[j], caption_scenes[i])
        for i, j in enumerate(nearest)
    ]
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def prior_metrics(
    sampled: np.ndarray,
    text_embeds: np.ndarray,
    image_embeds: np.ndarray,
    caption_scenes: Sequence[shapes.Scene],
    gallery_scenes: Sequence[shapes.Scene],
) -> dict[str, float]:
    """Sampled embeddings (N, D) for N captions against their text (N, D) and true image
    embeddings (N, D); the true image embeddings are also the retrieval gallery."""
    sampled_unit, text_unit, image_unit = _unit(sampled), _unit(text_embeds), _unit(image_embeds)
    prior = matching_retrieval(sampled, image_embeds, caption_scenes, gallery_scenes)
    baseline = matching_retrieval(text_embeds, image_embeds, caption_scenes, gallery_scenes)
    return {
        "cosine_to_image": float(np.mean(np.sum(sampled_unit * image_unit, -1))),
        "cosine_to_text": float(np.mean(np.sum(sampled_unit * text_unit, -1))),
        "text_cosine_to_image": float(np.mean(np.sum(text_unit * image_unit, -1))),
        "retrieval": prior["whole"],
        "text_baseline_retrieval": baseline["whole"],
        **{f"retrieval_{key}": value for key, value in prior.items() if key != "whole"},
    }
