"""Embedding shapes-world data with a trained CLIP, written once as shards
(clipgen.data.embeddings) for the stages that train on them: a split's image and text
embeddings and the text tower's token encodings (`run`; `clipgen embed`), or a pOps
operator's input and target image embeddings (and an instruction's token states and its
target caption's embedding: `run_operator`). `clipgen train` and the demo call
`ensure_embeddings` before a stage that reads shards, so missing ones are made first."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from clipgen import build, stages
from clipgen.data import embeddings, operator_data, preprocess, shapes, sources
from clipgen.errors import InputError
from clipgen.models.clip import CLIP


def run(
    clip_run: str | Path,
    out: str | Path,
    split: str = "test",
    num_examples: int = 1000,
    batch_size: int = 250,
    shard_size: int = 500,
    default_config: Callable[[], ml_collections.ConfigDict] | None = None,
) -> Path:
    """Embed the first `num_examples` of the shapes `split` in order with the CLIP trained
    in `clip_run` (its stored config; `default_config()` for a checkpoint that stores
    none); returns the directory of the shards."""
    trained = build.restore(clip_run, default_config, "clip")
    config = trained.config
    clip = build.clip_model(config, trained.params)
    module, tokenizer = clip.module, clip.tokenizer
    resolution = config.model.vision.image_size
    source = sources.open_source(
        config.data.get("source", "procedural"), (config.data.resolution,), split, config.data.seed
    )
    image_key = f"image_{config.data.resolution}"

    @jax.jit
    def encode(pixels, ids, mask):
        variables = {"params": clip.params}
        return {
            "image_embeds": module.apply(variables, pixels, method=CLIP.encode_image),
            "text_embeds": module.apply(variables, ids, mask, method=CLIP.encode_text),
            "text_tokens": module.apply(variables, ids, mask, method=CLIP.text_hidden),
        }

    def batches():
        for start in tqdm(range(0, num_examples, batch_size), desc=f"embed {split}"):
            examples = [source[i] for i in range(start, min(start + batch_size, num_examples))]
            inputs = build.clip_inputs(examples, tokenizer, image_key, resolution)
            mask = inputs["attention_mask"]
            outputs = jax.device_get(encode(inputs["pixels"], inputs["input_ids"], mask))
            yield dict(outputs, ids=np.array([e["id"] for e in examples]), text_mask=mask)

    metadata = {"split": split, "clip_workdir": str(clip_run), "clip_step": trained.step}
    directory = embeddings.write_shards(out, batches(), shard_size, metadata)
    logging.info("wrote %d embeddings of %s to %s", num_examples, split, directory)
    return directory


OPERATOR_FIELDS = ("ids", "inputs", "target")
INSTRUCTION_FIELDS = ("text_tokens", "text_mask", "target_text")
INSTRUCTION_TOKENS = 8  # an instruction's token slots: start, its word's tokens, end


def run_operator(
    clip_run: str | Path,
    out: str | Path,
    operator: str,
    split: str = "test",
    num_examples: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    shard_size: int = 1000,
    default_config: Callable[[], ml_collections.ConfigDict] | None = None,
) -> Path:
    """Embed the first `num_examples` shapes-world examples of a pOps `operator` on `split`
    (clipgen.data.operator_data) with the CLIP trained in `clip_run`: `inputs` (N, D) and
    `target` (D,) image embeddings; for instruct also the word's token states and mask
    and the CLIP text embedding of the target's caption."""
    trained = build.restore(clip_run, default_config, "clip")
    config = trained.config
    clip = build.clip_model(config, trained.params)
    module, tokenizer, params = clip.module, clip.tokenizer, clip.params
    size, resolution = config.data.resolution, config.model.vision.image_size
    encode_images = jax.jit(
        lambda pixels: module.apply({"params": params}, pixels, method=CLIP.encode_image)
    )
    encode_text = jax.jit(
        lambda ids, mask: (
            module.apply({"params": params}, ids, mask, method=CLIP.text_hidden),
            module.apply({"params": params}, ids, mask, method=CLIP.encode_text),
        )
    )

    def images(pictures: list) -> np.ndarray:
        return np.asarray(encode_images(preprocess.clip_preprocess(pictures, resolution)))

    def batches():
        for start in tqdm(range(0, num_examples, batch_size), desc=f"embed {operator} {split}"):
            indices = range(start, min(start + batch_size, num_examples))
            examples = [operator_data.example(operator, split, i, seed) for i in indices]
            count = len(examples[0].inputs)
            pictures = [operator_data.render_input(x, size) for e in examples for x in e.inputs]
            batch = {
                "ids": np.asarray(indices),
                "inputs": images(pictures).reshape(len(examples), count, -1),
                "target": images([shapes.render(e.target, size) for e in examples]),
            }
            if operator == "instruct":
                ids, mask = tokenizer.encode([e.word for e in examples])
                if mask[:, INSTRUCTION_TOKENS:].any():
                    raise ValueError(f"an instruction is over {INSTRUCTION_TOKENS} tokens")
                tokens, _ = jax.device_get(encode_text(ids, mask))
                tokens, mask = tokens[:, :INSTRUCTION_TOKENS], mask[:, :INSTRUCTION_TOKENS]
                target_ids, target_mask = tokenizer.encode(
                    [shapes.caption(e.target) for e in examples]
                )
                _, target_text = jax.device_get(encode_text(target_ids, target_mask))
                batch.update(text_tokens=tokens, text_mask=mask, target_text=target_text)
            yield batch

    fields = OPERATOR_FIELDS + (INSTRUCTION_FIELDS if operator == "instruct" else ())
    metadata = {
        "operator": operator,
        "split": split,
        "seed": seed,
        "clip_workdir": str(clip_run),
        "clip_step": trained.step,
    }
    directory = embeddings.write_shards(out, batches(), shard_size, metadata, fields)
    logging.info("wrote %d %s examples of %s to %s", num_examples, operator, split, directory)
    return directory


def ensure_embeddings(config: ml_collections.ConfigDict) -> None:
    """Write the embedding shards a stage reading them lacks (the splits of
    `config.data.num_examples` under `config.data.embeddings`) with the CLIP run in
    `config.data.clip_workdir`; refuse clearly when neither shards nor a CLIP run are there.
    Shards already there are checked (their manifest, split and every shard's layout:
    `embeddings.EmbeddingShards`), so damaged ones fail with an InputError naming the file
    before anything compiles. Does nothing for stages without shards or with synthetic
    ones."""
    data = config.get("data", {})
    if "embeddings" not in data or data.embeddings == "synthetic":
        return
    for split, count in data.num_examples.items():
        directory = embeddings.embedding_dir(data, split)
        if (directory / embeddings.MANIFEST).exists():
            embeddings.EmbeddingShards(directory, split)
            continue
        if not data.get("clip_workdir"):
            raise InputError(
                f"no embedding shards at {directory} (no {embeddings.MANIFEST}) and "
                "config.data.clip_workdir is empty: "
                f"run `clipgen embed` for split {split!r} or name the CLIP run to embed with"
            )
        logging.info("embedding the %s split with the CLIP in %s", split, data.clip_workdir)
        clip_preset = functools.partial(stages.get("clip").config, data.clip_preset)
        if "operator" in data:
            run_operator(
                data.clip_workdir,
                directory,
                data.operator,
                split,
                int(count),
                seed=data.seed,
                default_config=clip_preset,
            )
        else:
            run(data.clip_workdir, directory, split, int(count), default_config=clip_preset)
