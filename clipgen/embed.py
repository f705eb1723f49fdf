"""`clipgen embed`: run a trained CLIP over a dataset split once and write embedding shards
(image and text embeddings, the text tower's token encodings) for the later stages."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from clipgen.checkpoint import Checkpointer
from clipgen.data import embeddings, pipeline
from clipgen.models.clip import CLIP
from clipgen.train import clip as clip_stage


def load_trained_clip(config: ml_collections.ConfigDict, workdir: str | Path):
    """(tokenizer, module, EMA params, step) from a CLIP run's newest checkpoint."""
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    try:
        _, ema, step = checkpointer.restore_for_inference()
    finally:
        checkpointer.close()
    tokenizer = clip_stage.make_tokenizer(config)
    module = clip_stage.build_model(config, tokenizer)
    params = next(iter(ema.values()))
    return tokenizer, module, params, step


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    out: str | Path,
    split: str = "test",
    num_examples: int = 1000,
    batch_size: int = 250,
    shard_size: int = 500,
) -> Path:
    """Embed the first `num_examples` of the shapes `split` in order; returns the directory."""
    tokenizer, module, params, step = load_trained_clip(config, workdir)
    resolution = config.model.vision.image_size
    source = pipeline.ProceduralShapes((config.data.resolution,), split, config.data.seed)

    image_key = f"image_{config.data.resolution}"

    @jax.jit
    def encode(pixels, ids, mask):
        variables = {"params": params}
        return {
            "image_embeds": module.apply(variables, pixels, method=CLIP.encode_image),
            "text_embeds": module.apply(variables, ids, mask, method=CLIP.encode_text),
            "text_tokens": module.apply(variables, ids, mask, method=CLIP.text_hidden),
        }

    def batches():
        for start in tqdm(range(0, num_examples, batch_size), desc=f"embed {split}"):
            examples = [source[i] for i in range(start, min(start + batch_size, num_examples))]
            inputs = clip_stage.clip_inputs(examples, tokenizer, image_key, resolution)
            mask = inputs["attention_mask"]
            outputs = jax.device_get(encode(inputs["pixels"], inputs["input_ids"], mask))
            yield dict(outputs, ids=np.array([e["id"] for e in examples]), text_mask=mask)

    metadata = {"split": split, "clip_workdir": str(workdir), "clip_step": step}
    directory = embeddings.write_shards(out, batches(), shard_size, metadata)
    logging.info("wrote %d embeddings of %s to %s", num_examples, split, directory)
    return directory
