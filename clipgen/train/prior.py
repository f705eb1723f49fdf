"""Diffusion prior stage: caption (CLIP text embedding and token encodings) -> CLIP image
embedding, trained on the embedding shards that `clipgen embed` writes.

The prior denoises image embeddings in a normalised latent space: x = (z - mean) / std,
with (mean, std) either (0, 1 / scale) (the paper's z * 17.2) or per-dimension statistics
of the training embeddings (Karlo). Both live in the prior's `clip_mean` / `clip_std`
parameters, as in diffusers' `PriorTransformer`, frozen by the optimizer. The text is
dropped (zero embedding, every token masked) for a `text_drop` fraction of the batch, so
the same network also gives the unconditional output for classifier-free guidance.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipgen.data import embeddings, pipeline, shapes
from clipgen.diffusion.gaussian import Diffusion, make_diffusion
from clipgen.eval.prior import prior_metrics
from clipgen.models.prior import PriorConfig, PriorTransformer, init_prior
from clipgen.pipelines.prior import sample_prior
from clipgen.train.loop import Stage

EMBEDDING_SCALINGS = ("scale", "mean_std")
CONDITION_FIELDS = ("text_embed", "text_tokens", "text_mask")


# --- embeddings ------------------------------------------------------------------------------


def embedding_dir(config: ml_collections.ConfigDict, split: str) -> Path:
    return Path(config.data.embeddings) / split


def ensure_embeddings(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> None:
    """Write the embedding shards a split lacks by running the CLIP of
    `config.data.clip_workdir` (configured by `configs/clip.py:<config.data.clip_preset>`)
    over it; refuse clearly when neither shards nor a CLIP run are there."""
    from clipgen import embed
    from clipgen.train import config as config_lib

    for split in splits:
        directory = embedding_dir(config, split)
        if (directory / embeddings.MANIFEST).exists():
            continue
        if not config.data.clip_workdir:
            raise FileNotFoundError(
                f"no embedding shards at {directory} and config.data.clip_workdir is empty: "
                f"run `clipgen embed` for split {split!r} or name the CLIP run to embed with"
            )
        clip_config = config_lib.load_preset("clip", config.data.clip_preset)
        logging.info("embedding the %s split with the CLIP in %s", split, config.data.clip_workdir)
        embed.run(
            clip_config,
            config.data.clip_workdir,
            directory,
            split=split,
            num_examples=int(config.data.num_examples[split]),
        )


def load_split(directory: Path, normalize: bool) -> dict[str, np.ndarray]:
    """A split's embeddings as the prior's inputs: ids, image_embeds, text_embed,
    text_tokens, text_mask (embeddings L2-normalised when `normalize`)."""
    arrays = embeddings.EmbeddingShards(directory).arrays()
    image, text = arrays["image_embeds"].astype(np.float32), arrays["text_embeds"]
    text = text.astype(np.float32)
    if normalize:
        image = image / np.linalg.norm(image, axis=-1, keepdims=True)
        text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    return {
        "ids": arrays["ids"],
        "image_embeds": image,
        "text_embed": text,
        "text_tokens": arrays["text_tokens"].astype(np.float32),
        "text_mask": arrays["text_mask"].astype(np.int32),
    }


def synthetic_split(
    count: int, seed: int, dim: int, length: int, token_dim: int
) -> dict[str, np.ndarray]:
    """Random unit embeddings (dim) and token encodings (length x token_dim), for
    benchmarks and tests; ids 0..count-1."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    lengths = rng.integers(1, length + 1, count)
    return {
        "ids": np.arange(count),
        "image_embeds": unit((count, dim)),
        "text_embed": unit((count, dim)),
        "text_tokens": rng.standard_normal((count, length, token_dim)).astype(np.float32),
        "text_mask": (np.arange(length)[None] < lengths[:, None]).astype(np.int32),
    }


def training_split(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The training embeddings (written first if need be), checked against config.model."""
    if config.data.embeddings == "synthetic":
        model = config.model
        return synthetic_split(
            int(config.data.num_examples["train"]),
            config.data.seed,
            model.embedding_dim,
            model.num_text_tokens,
            model.text_token_dim,
        )
    ensure_embeddings(config, ("train", *config.eval.splits))
    train = load_split(embedding_dir(config, "train"), config.data.normalize)
    check_dimensions(config, train)
    return train


class ArraySource:
    """Rows of equally long arrays as a random-access example source."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: value[index] for name, value in self.arrays.items()}


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([e[name] for e in examples]) for name in examples[0]}


def check_dimensions(config: ml_collections.ConfigDict, data: dict[str, np.ndarray]) -> None:
    """The shards' embedding, token-width and length against config.model."""
    model = config.model
    found = {
        "embedding_dim": data["image_embeds"].shape[-1],
        "text_token_dim": data["text_tokens"].shape[-1],
        "num_text_tokens": data["text_tokens"].shape[1],
    }
    wrong = {key: value for key, value in found.items() if model[key] != value}
    if wrong:
        raise ValueError(
            "the embedding shards do not fit config.model: "
            + ", ".join(
                f"{k} is {model[k]} in the config, {v} in the shards" for k, v in wrong.items()
            )
        )


def latent_stats(data_config: ml_collections.ConfigDict, image_embeds: np.ndarray):
    """(mean, std), each (1, D), mapping image embeddings to the prior's latents."""
    if data_config.scaling == "scale":
        dim = image_embeds.shape[-1]
        return np.zeros((1, dim), np.float32), np.full(
            (1, dim), 1.0 / data_config.scale, np.float32
        )
    if data_config.scaling == "mean_std":
        return (
            image_embeds.mean(0, keepdims=True).astype(np.float32),
            image_embeds.std(0, keepdims=True).astype(np.float32) + 1e-6,
        )
    raise ValueError(f"config.data.scaling: {data_config.scaling!r}, expected {EMBEDDING_SCALINGS}")


def with_latent_stats(params: Any, mean: np.ndarray, std: np.ndarray) -> Any:
    """params with clip_mean / clip_std replaced (inside their logical-axis boxes, if any)."""

    def put(old, value):
        value = jnp.asarray(value, jnp.float32).reshape(jnp.shape(getattr(old, "value", old)))
        return old.replace_boxed(value) if hasattr(old, "replace_boxed") else value

    return dict(
        params, clip_mean=put(params["clip_mean"], mean), clip_std=put(params["clip_std"], std)
    )


# --- the evaluation shared by the diffusion and autoregressive priors ---------------------------


@functools.cache
def _scenes(split: str, ids: tuple[int, ...], seed: int, resolution: int):
    """(what each caption says, what the oracle reads in each image) for examples `ids`."""
    source = pipeline.ProceduralShapes((resolution,), split, seed)
    examples = [source[i] for i in ids]
    captions = [shapes.parse(pipeline.decode_text(e["caption"])) for e in examples]
    seen = [shapes.oracle(e[f"image_{resolution}"]) for e in examples]
    return captions, seen


def make_evaluator(
    config: ml_collections.ConfigDict,
    sample: Callable[[Any, dict[str, np.ndarray], jax.Array], jax.Array],
) -> Callable[[Any], dict[str, float]]:
    """evaluate(state) for a prior whose `sample(params, condition batch, rng)` draws image
    embeddings: `prior_metrics` on each of config.eval.splits, with the EMA parameters."""
    eval_config = config.eval
    splits = tuple(eval_config.splits)
    data = {
        split: load_split(embedding_dir(config, split), config.data.normalize) for split in splits
    }

    def evaluate(state) -> dict[str, float]:
        params = next(iter(state.ema.values())) if eval_config.use_ema else state.params
        results = {}
        for split in splits:
            arrays = {k: v[: eval_config.num_examples] for k, v in data[split].items()}
            caption_scenes, gallery_scenes = _scenes(
                split,
                tuple(int(i) for i in arrays["ids"]),
                config.data.seed,
                eval_config.oracle_resolution,
            )
            rng = jax.random.key(eval_config.seed)
            sampled = []
            for start in range(0, len(arrays["ids"]), eval_config.batch_size):
                cond = {
                    k: arrays[k][start : start + eval_config.batch_size] for k in CONDITION_FIELDS
                }
                sampled.append(np.asarray(sample(params, cond, jax.random.fold_in(rng, start))))
            metrics = prior_metrics(
                np.concatenate(sampled),
                arrays["text_embed"],
                arrays["image_embeds"],
                caption_scenes,
                gallery_scenes,
            )
            results.update({f"{split}/{name}": value for name, value in metrics.items()})
        return results

    return evaluate


# --- the diffusion prior -----------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict) -> PriorTransformer:
    """The prior transformer config.model describes."""
    model = config.model
    prior_config = PriorConfig(
        num_attention_heads=model.heads,
        attention_head_dim=model.head_dim,
        num_layers=model.layers,
        embedding_dim=model.embedding_dim,
        num_embeddings=model.num_text_tokens,
        encoder_hidden_dim=model.text_token_dim,
        additional_embeddings=4,
        dropout=model.dropout,
        added_emb_type="prd",
        encoder_hid_proj_type="linear",
    )
    return PriorTransformer(prior_config, dtype=jnp.dtype(model.dtype))


def build_diffusion(config: ml_collections.ConfigDict, respacing: str | None = None) -> Diffusion:
    return make_diffusion(
        config.diffusion.schedule,
        config.diffusion.timesteps,
        prediction=config.diffusion.prediction,
        variance="fixed_small",
        respacing=respacing,
    )


def diffusion_loss(module, diffusion, text_drop: float):
    """loss(params, batch, rng) of the diffusion prior: the simple loss on the latents, with
    the text dropped for a `text_drop` fraction of examples."""

    def loss(params, batch, rng):
        drop_rng, t_rng, noise_rng, dropout_rng = jax.random.split(rng, 4)
        latents = module.apply(
            {"params": jax.lax.stop_gradient(params)},
            batch["image_embeds"],
            method=PriorTransformer.normalize_latents,
        )
        batch_size = latents.shape[0]
        keep = jax.random.uniform(drop_rng, (batch_size,)) >= text_drop
        text_embed = batch["text_embed"] * keep[:, None]
        text_tokens = batch["text_tokens"] * keep[:, None, None]
        text_mask = batch["text_mask"] * keep[:, None]

        def model_fn(x_t, t):
            return module.apply(
                {"params": params},
                x_t,
                t,
                text_embed,
                text_tokens,
                text_mask,
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )

        t = diffusion.sample_timesteps(t_rng, batch_size)
        noise = jax.random.normal(noise_rng, latents.shape, latents.dtype)
        losses = diffusion.training_losses(model_fn, latents, t, noise)
        return losses["loss"].mean(), {"mse": losses["mse"].mean()}

    return loss


def make_sampler(config: ml_collections.ConfigDict, module: PriorTransformer):
    """sample(params, condition, rng) -> image embeddings, as config.sample says; jitted."""
    settings = config.sample
    diffusion = build_diffusion(config, settings.respacing)
    return jax.jit(
        functools.partial(
            sample_prior,
            module,
            diffusion=diffusion,
            guidance_scale=settings.guidance_scale,
            best_of=settings.best_of,
            method=settings.method,
            eta=settings.eta,
            clip_denoised=settings.clip_denoised,
        ),
    )


def batch_spec_for(config: ml_collections.ConfigDict, global_batch_size: int):
    model = config.model
    b, length = global_batch_size, model.num_text_tokens
    return {
        "image_embeds": jax.ShapeDtypeStruct((b, model.embedding_dim), jnp.float32),
        "text_embed": jax.ShapeDtypeStruct((b, model.embedding_dim), jnp.float32),
        "text_tokens": jax.ShapeDtypeStruct((b, length, model.text_token_dim), jnp.float32),
        "text_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
    }


def train_batches(config: ml_collections.ConfigDict, train: dict[str, np.ndarray]):
    """batches(first_batch, global_batch_size) over the training embeddings, shuffled."""
    source = ArraySource({k: v for k, v in train.items() if k != "ids"})

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict]:
        return pipeline.host_batches(source, stack, first_batch, global_batch_size, config.seed)

    return batches


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    train = training_split(config)
    mean, std = latent_stats(config.data, train["image_embeds"])
    module = build_model(config)
    diffusion = build_diffusion(config)
    sampler = make_sampler(config, module)

    def init_params(rng):
        return with_latent_stats(init_prior(module, rng)["params"], mean, std)

    def sample(params, cond, rng):
        return sampler(params=params, cond=cond, rng=rng)

    return Stage(
        "prior",
        init_params,
        diffusion_loss(module, diffusion, config.data.text_drop),
        train_batches(config, train),
        functools.partial(batch_spec_for, config),
        evaluate=None if config.data.embeddings == "synthetic" else make_evaluator(config, sample),
    )
