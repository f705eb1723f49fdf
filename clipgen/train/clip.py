"""CLIP stage: contrastive training of both towers on image-caption pairs.

The loss is CLIP's symmetric cross-entropy over the global batch: under jit the
similarity matrix spans every device's and every host's examples. Evaluation is
zero-shot caption<->image retrieval on held-out scenes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipgen.data import pipeline, preprocess, shapes
from clipgen.data.tokenizer import Tokenizer
from clipgen.eval.retrieval import retrieval_accuracy
from clipgen.models.clip import CLIP, TextConfig, VisionConfig, init_clip
from clipgen.train.loop import Stage

MAX_LOGIT_SCALE = math.log(100.0)  # OpenAI clamps the learned temperature at 100


def build_model(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> CLIP:
    """The CLIP module a config describes (config.model.{vision,text}, projection_dim)."""
    model = config.model
    return CLIP(
        vision=VisionConfig(**model.vision.to_dict()),
        text=TextConfig(
            vocab_size=tokenizer.vocab_size,
            context_length=tokenizer.context_length,
            eos_token_id=tokenizer.end_id,
            **model.text.to_dict(),
        ),
        projection_dim=model.projection_dim,
        dtype=jnp.dtype(model.dtype),
    )


@functools.cache
def shapes_tokenizer(num_merges: int, context_length: int, seed: int = 0) -> Tokenizer:
    """The demo tokenizer: a BPE learnt from 5,000 training-split captions (the same in
    every process)."""
    source = pipeline.ProceduralShapes((), split="train", seed=seed)
    captions = [source[i]["caption"] for i in range(5000)]
    return Tokenizer.train(captions, num_merges=num_merges, context_length=context_length)


def make_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """`config.data.tokenizer`: "shapes" (trained on the captions), OpenAI's
    bpe_simple_vocab .txt.gz, an HF tokenizer directory, or a clipgen tokenizer JSON."""
    name, length = config.data.tokenizer, config.data.context_length
    if name == "shapes":
        return shapes_tokenizer(config.data.num_merges, length, config.data.seed)
    path = Path(name)
    if path.is_dir():
        return Tokenizer.from_hf_directory(path, length)
    if path.name.endswith(".txt.gz"):
        return Tokenizer.from_bpe_vocab(path, length)
    if path.suffix == ".json":
        return Tokenizer.load(path)
    raise ValueError(f"config.data.tokenizer={name!r}: not 'shapes', a .txt.gz, dir or .json")


def clip_inputs(
    examples: list[dict], tokenizer: Tokenizer, image_key: str, resolution: int
) -> dict[str, np.ndarray]:
    """Examples (image, caption) -> CLIP's inputs: preprocessed pixels, ids and mask."""
    ids, mask = tokenizer.encode([pipeline.decode_text(e["caption"]) for e in examples])
    pixels = preprocess.clip_preprocess([e[image_key] for e in examples], resolution)
    return {"pixels": pixels, "input_ids": ids, "attention_mask": mask}


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
    tokenizer = make_tokenizer(config)
    model = build_model(config, tokenizer)
    resolution = config.model.vision.image_size
    key = f"image_{config.data.resolution}"
    train_source = pipeline.ProceduralShapes((config.data.resolution,), "train", config.data.seed)

    def to_arrays(examples):
        return clip_inputs(examples, tokenizer, key, resolution)

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

    encode = jax.jit(
        lambda params, batch: (
            model.apply({"params": params}, batch["pixels"], method=CLIP.encode_image),
            model.apply(
                {"params": params},
                batch["input_ids"],
                batch["attention_mask"],
                method=CLIP.encode_text,
            ),
        )
    )

    def evaluate(state) -> dict[str, float]:
        params = next(iter(state.ema.values())) if config.eval.use_ema else state.params
        results = {}
        for split in ("test", "heldout"):
            source = pipeline.ProceduralShapes((config.data.resolution,), split, config.data.seed)
            examples = [source[i] for i in range(config.eval.num_examples)]
            images, texts = [], []
            for start in range(0, len(examples), config.eval.batch_size):
                chunk = to_arrays(examples[start : start + config.eval.batch_size])
                image_embeds, text_embeds = jax.device_get(encode(params, chunk))
                images.append(image_embeds)
                texts.append(text_embeds)
            keys = [shapes.scene_from_json(e["scene"]) for e in examples]
            accuracy = retrieval_accuracy(np.concatenate(images), np.concatenate(texts), keys)
            results.update({f"{split}/{name}": value for name, value in accuracy.items()})
        return results

    return Stage("clip", init_params, loss, batches, batch_spec, evaluate=evaluate)
