"""Decoder stage: CLIP image embedding (+ caption) -> image, unCLIP's GLIDE-based decoder.

Batches pair the embedding shards of `clipgen embed` (image embedding, CLIP text token
encodings and text embedding: Karlo's frozen-CLIP text conditioning) with the shapes
render of the same example at the decoder's resolution. Learned variance with the hybrid
loss, cosine schedule; the CLIP embedding is dropped 10% and the text 50% of the time for
classifier-free guidance (paper, section 2.1). Evaluation draws images for held-out
scenes' true CLIP image embeddings and asks the shapes oracle for their colour and shape.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen.data import pipeline, shapes
from clipgen.diffusion.gaussian import Diffusion, make_diffusion
from clipgen.models.clip import TextConfig
from clipgen.models.decoder import Decoder, DecoderConfig, init_decoder
from clipgen.models.unet import UNetConfig
from clipgen.pipelines.decoder import sample_decoder, to_uint8
from clipgen.train import prior as prior_stage
from clipgen.train.loop import Stage

CONDITION_FIELDS = ("image_embed", "text", "text_mask", "text_embed")


def build_model(config: ml_collections.ConfigDict) -> Decoder:
    """The decoder config.model describes: frozen CLIP text encodings (Karlo), or with
    `model.text_transformer` (TextConfig fields) GLIDE's trainable text transformer."""
    model = config.model
    unet = UNetConfig(**model.unet.to_dict())
    text_transformer = model.get("text_transformer")
    scale = model.get("image_embed_scale", 1.0)
    if text_transformer:
        decoder_config = DecoderConfig(
            unet=unet,
            clip_embed_dim=model.clip_embed_dim,
            clip_extra_tokens=model.clip_extra_tokens,
            text_transformer=TextConfig(**text_transformer.to_dict()),
            image_embed_scale=scale,
        )
    else:
        decoder_config = DecoderConfig(
            unet=unet,
            clip_embed_dim=model.clip_embed_dim,
            clip_extra_tokens=model.clip_extra_tokens,
            text_width=model.text_width,
            text_embed_dim=model.clip_embed_dim,
            image_embed_scale=scale,
        )
    return Decoder(decoder_config, dtype=jnp.dtype(model.dtype))


def build_diffusion(config: ml_collections.ConfigDict, respacing: str | None = None) -> Diffusion:
    settings = config.diffusion
    return make_diffusion(
        settings.schedule,
        settings.timesteps,
        prediction=settings.prediction,
        variance=settings.variance,
        respacing=respacing,
    )


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def conditions(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder's condition fields from prior-style embedding arrays."""
    return {
        "image_embed": arrays["image_embeds"],
        "text": arrays["text_tokens"],
        "text_mask": arrays["text_mask"],
        "text_embed": arrays["text_embed"],
    }


def rendered(split: str, ids: np.ndarray, resolution: int, seed: int) -> np.ndarray:
    """The shapes renders (uint8) of examples `ids` of a split."""
    source = pipeline.ProceduralShapes((resolution,), split, seed)
    return np.stack([source[int(i)][f"image_{resolution}"] for i in ids])


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


def oracle_scores(images: np.ndarray, scenes: list[shapes.Scene], resolution: int) -> dict:
    """Oracle agreement of generated images with their scenes, read at `resolution` (images
    are enlarged bicubically first when smaller, the oracle needing 32 px or more)."""
    images = np.asarray(images)
    if images.shape[1] < resolution:
        shape = (len(images), resolution, resolution, 3)
        enlarged = jax.image.resize(jnp.asarray(images, jnp.float32), shape, "cubic")
        images = np.asarray(jnp.clip(jnp.round(enlarged), 0, 255).astype(jnp.uint8))
    results = [
        shapes.attribute_accuracy(shapes.oracle(image), scene)
        for image, scene in zip(images, scenes, strict=True)
    ]
    scores = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
    scores["colour_and_shape"] = float(np.mean([r["colour"] and r["shape"] for r in results]))
    return scores


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    eval_config = config.eval
    synthetic = config.data.embeddings == "synthetic"
    if synthetic:
        model = config.model
        count = int(config.data.num_examples["train"])
        train = prior_stage.synthetic_split(
            count, config.data.seed, model.clip_embed_dim, model.num_text_tokens, model.text_width
        )
    else:
        prior_stage.ensure_embeddings(config, ("train", *eval_config.splits))
        train = prior_stage.load_split(prior_stage.embedding_dir(config, "train"), True)
    module = build_model(config)
    diffusion = build_diffusion(config)
    resolution, seed = config.data.resolution, config.data.seed
    train_source = pipeline.ProceduralShapes((resolution,), "train", seed)
    rows = prior_stage.ArraySource(train)

    def to_batch(examples: list[dict]) -> dict[str, np.ndarray]:
        if glide_text:
            raise NotImplementedError(
                "config.model.text_transformer: GLIDE-style text reads caption token ids, and "
                "the embedding shards hold CLIP text encodings only; train with CLIP text "
                "(text_transformer None) or feed batches that carry token ids"
            )
        arrays = prior_stage.stack(examples)
        images = [train_source[int(i)][f"image_{resolution}"] for i in arrays["ids"]]
        return dict(conditions(arrays), image=to_unit_range(np.stack(images)))

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict]:
        return pipeline.host_batches(rows, to_batch, first_batch, global_batch_size, config.seed)

    glide_text = module.config.text_transformer is not None

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

    sampler = jax.jit(
        functools.partial(
            sample_decoder,
            module,
            diffusion=build_diffusion(config, config.sample.respacing),
            image_size=resolution,
            guidance_scale=config.sample.guidance_scale,
            method=config.sample.method,
        )
    )

    def draw(params, cond, rng) -> np.ndarray:
        """uint8 images for a batch of conditions."""
        return np.asarray(to_uint8(sampler(params=params, cond=cond, rng=rng)))

    def evaluate(state) -> dict[str, float]:
        params = next(iter(state.ema.values())) if eval_config.use_ema else state.params
        results = {}
        for split in eval_config.splits:
            arrays = prior_stage.load_split(prior_stage.embedding_dir(config, split), True)
            arrays = {k: v[: eval_config.num_examples] for k, v in arrays.items()}
            source = pipeline.ProceduralShapes((), split, seed)
            scenes = [shapes.scene_from_json(source[int(i)]["scene"]) for i in arrays["ids"]]
            cond = conditions(arrays)
            images = np.concatenate(
                [
                    draw(
                        params,
                        {k: v[start : start + eval_config.batch_size] for k, v in cond.items()},
                        jax.random.fold_in(jax.random.key(eval_config.seed), start),
                    )
                    for start in range(0, len(scenes), eval_config.batch_size)
                ]
            )
            scores = oracle_scores(images, scenes, eval_config.oracle_resolution)
            results.update({f"{split}/{key}": value for key, value in scores.items()})
        return results

    def preview(state) -> dict[str, np.ndarray]:
        params = next(iter(state.ema.values()))
        arrays = prior_stage.load_split(prior_stage.embedding_dir(config, "test"), True)
        cond = {k: v[:8] for k, v in conditions(arrays).items()}
        truth = rendered("test", arrays["ids"][:8], resolution, seed)
        images = draw(params, cond, jax.random.key(0))
        return {"samples_over_truth": np.concatenate([images, truth], axis=1)}

    loss = decoder_loss(module, diffusion, config.data.drop_image, config.data.drop_text)
    if synthetic:
        return Stage("decoder", init_params, loss, batches, batch_spec)
    return Stage(
        "decoder", init_params, loss, batches, batch_spec, preview=preview, evaluate=evaluate
    )
