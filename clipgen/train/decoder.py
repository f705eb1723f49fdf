"""Decoder stage: CLIP image embedding (+ caption) -> image, unCLIP's GLIDE-based decoder.

Batches pair the embedding shards of `clipgen embed` (image embedding, CLIP text token
encodings and text embedding: Karlo's frozen-CLIP text conditioning) with the shapes
render of the same example at the decoder's resolution. Learned variance with the hybrid
loss, cosine schedule; the CLIP embedding is dropped 10% and the text 50% of the time for
classifier-free guidance (paper, section 2.1). Its evaluation (`decoder_oracle`) draws
images for held-out scenes' true CLIP image embeddings and asks the shapes oracle for their
colour and shape.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen import build, sampling
from clipgen.data import embeddings, pipeline, sources
from clipgen.data.preprocess import to_unit_range
from clipgen.diffusion.gaussian import Diffusion
from clipgen.models.decoder import Decoder, init_decoder
from clipgen.train.loop import Stage


def decoder_loss(module: Decoder, diffusion: Diffusion, drop_image: float, drop_text: float):
    def loss(params, batch, rng):
        image_rng, text_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 5)
        x0 = batch["image"]
        size = x0.shape[0]
        dropped_image = jax.random.uniform(image_rng, (size,)) < drop_image
        dropped_text = jax.random.uniform(text_rng, (size,)) < drop_text

        def model_fn(x_t, t):
            return module.apply(
                {"params": params},
                x_t,
                t,
                batch["image_embed"],
                batch["text"],
                batch["text_mask"],
                batch.get("text_embed"),
                drop_image=dropped_image,
                drop_text=dropped_text,
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )

        t = diffusion.sample_timesteps(t_rng, size)
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        losses = diffusion.training_losses(model_fn, x0, t, noise)
        metrics = {name: value.mean() for name, value in losses.items() if name != "loss"}
        return losses["loss"].mean(), metrics

    return loss


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    synthetic = config.data.embeddings == "synthetic"
    if synthetic:
        model = config.model
        count = int(config.data.num_examples["train"])
        train = embeddings.synthetic_split(
            count, config.data.seed, model.clip_embed_dim, model.num_text_tokens, model.text_width
        )
    else:
        train = embeddings.load_split(embeddings.embedding_dir(config.data, "train"), True, "train")
    module = build.module(config)
    resolution, seed = config.data.resolution, config.data.seed
    train_source = sources.open_source(
        config.data.get("source", "procedural"), (resolution,), "train", seed
    )
    rows = embeddings.ArraySource(train)
    glide_text = module.config.text_transformer is not None

    def to_batch(examples: list[dict]) -> dict[str, np.ndarray]:
        if glide_text:
            raise NotImplementedError(
                "config.model.text_transformer: GLIDE-style text reads caption token ids, and "
                "the embedding shards hold CLIP text encodings only; train with CLIP text "
                "(text_transformer None) or feed batches that carry token ids"
            )
        arrays = embeddings.stack(examples)
        images = [train_source[int(i)][f"image_{resolution}"] for i in arrays["ids"]]
        return dict(sampling.decoder_condition(arrays), image=to_unit_range(np.stack(images)))

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict]:
        return pipeline.host_batches(rows, to_batch, first_batch, global_batch_size, config.seed)

    def batch_spec(global_batch_size: int):
        b, length = global_batch_size, config.model.num_text_tokens
        spec = {
            "image": jax.ShapeDtypeStruct((b, resolution, resolution, 3), jnp.float32),
            "image_embed": jax.ShapeDtypeStruct((b, config.model.clip_embed_dim), jnp.float32),
            "text": jax.ShapeDtypeStruct((b, length, config.model.text_width), jnp.float32),
            "text_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
            "text_embed": jax.ShapeDtypeStruct((b, config.model.clip_embed_dim), jnp.float32),
        }
        if glide_text:  # token ids for the decoder's own text transformer
            spec["text"] = jax.ShapeDtypeStruct((b, length), jnp.int32)
            del spec["text_embed"]
        return spec

    def init_params(rng):
        return init_decoder(module, rng, resolution, text_length=config.model.num_text_tokens)[
            "params"
        ]

    draw = sampling.image_sampler(config, module)

    def preview(state) -> dict[str, np.ndarray]:
        params = next(iter(state.ema.values()))
        arrays = embeddings.load_split(embeddings.embedding_dir(config.data, "test"), True, "test")
        cond = {k: v[:8] for k, v in sampling.decoder_condition(arrays).items()}
        truth = pipeline.renders("test", arrays["ids"][:8], resolution, seed)
        images = draw(params, cond, jax.random.key(0))
        return {"samples_over_truth": np.concatenate([images, truth], axis=1)}

    loss = decoder_loss(
        module, build.diffusion(config), config.data.drop_image, config.data.drop_text
    )
    return Stage(
        "decoder", init_params, loss, batches, batch_spec, preview=None if synthetic else preview
    )
