"""CLIP stage: contrastive training of both towers on image-caption pairs.

The loss is CLIP's symmetric cross-entropy over the global batch: under jit the
similarity matrix spans every device's and every host's examples. Its evaluation is
zero-shot caption<->image retrieval on held-out scenes (the `clip_retrieval` evaluator).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax

from clipgen import build
from clipgen.data import pipeline, siblings, sources
from clipgen.models.clip import init_clip
from clipgen.train.loop import Stage

MAX_LOGIT_SCALE = math.log(100.0)  # OpenAI clamps the learned temperature at 100


def contrastive_loss(image_embeds, text_embeds, logit_scale):
    """Symmetric InfoNCE over the (global) batch; embeddings L2-normalised. Returns the loss
    and the in-batch top-1 accuracies."""
    scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
    logits = scale * image_embeds @ text_embeds.T
    labels = jnp.arange(logits.shape[0])
    image_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    text_loss = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    metrics = {
        "image_to_text_accuracy": jnp.mean(jnp.argmax(logits, 1) == labels),
        "text_to_image_accuracy": jnp.mean(jnp.argmax(logits, 0) == labels),
        "logit_scale": scale,
    }
    return (image_loss + text_loss) / 2, metrics


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    tokenizer = build.tokenizer(config)
    model = build.clip_module(config, tokenizer)
    resolution = config.model.vision.image_size
    key = f"image_{config.data.resolution}"
    source = config.data.get("source", "procedural")
    hard_negatives = tuple(config.data.get("hard_negatives", ()))
    if hard_negatives and source != "procedural":
        raise ValueError(
            f"config.data.hard_negatives={hard_negatives!r} needs the procedural shapes source "
            f"(it changes a scene's attributes), not config.data.source={source!r}: set "
            "config.data.hard_negatives=()"
        )
    train_source = sources.open_source(source, (config.data.resolution,), "train", config.data.seed)
    if hard_negatives:
        train_source = siblings.ShapesSiblings(train_source, hard_negatives)

    def to_arrays(examples):
        return build.clip_inputs(examples, tokenizer, key, resolution)

    def init_params(rng):
        return init_clip(model, rng)["params"]

    def loss(params, batch, rng):
        del rng
        out = model.apply(
            {"params": params}, batch["pixels"], batch["input_ids"], batch["attention_mask"]
        )
        return contrastive_loss(out["image_embeds"], out["text_embeds"], params["logit_scale"])

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict]:
        return pipeline.host_batches(
            train_source, to_arrays, first_batch, global_batch_size, shuffle=False
        )

    def batch_spec(global_batch_size: int):
        length = config.data.context_length
        return {
            "pixels": jax.ShapeDtypeStruct(
                (global_batch_size, resolution, resolution, 3), jnp.float32
            ),
            "input_ids": jax.ShapeDtypeStruct((global_batch_size, length), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((global_batch_size, length), jnp.int32),
        }

    return Stage("clip", init_params, loss, batches, batch_spec)
