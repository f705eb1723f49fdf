"""Zero-shot retrieval between captions and images in a CLIP embedding space."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def retrieval_accuracy(
    image_embeds: np.ndarray, text_embeds: np.ndarray, keys: Sequence[Hashable]
) -> dict[str, float]:
    """Top-1 caption->image and image->caption accuracy over one pool of pairs.

    Pair i is (image i, caption i). A retrieval is right when the retrieved item's key
    equals the query's (the key is what the caption says, e.g. the shapes scene), so
    distinct pairs that show the same thing do not count as mistakes.
    """
    images = image_embeds / np.linalg.norm(image_embeds, axis=-1, keepdims=True)
    texts = text_embeds / np.linalg.norm(text_embeds, axis=-1, keepdims=True)
    similarity = texts @ images.T
    keys = list(keys)
    text_to_image = [keys[j] == keys[i] for i, j in enumerate(similarity.argmax(axis=1))]
    image_to_text = [keys[j] == keys[i] for i, j in enumerate(similarity.argmax(axis=0))]
    return {
        "text_to_image_top1": float(np.mean(text_to_image)),
        "image_to_text_top1": float(np.mean(image_to_text)),
    }
