"""The DiffusionCLIP stage (configs/edit.py): a copy of a diffusion UNet fine-tuned so that
generating from the DDIM inversion of an image moves it along the CLIP direction from
`edit.source` to `edit.target`, with L1 and identity terms keeping the rest.

The training images (shapes-world scenes whose caption holds the source word, or a folder)
are inverted once with the base model to x_t0 (cached per model, image, t0 and S_inv);
each step then, for a batch of images:
- exact mode: generates with S_gen DDIM steps from x_t0 through the model being trained,
  every step a `jax.checkpoint`, and takes the loss on the result, gradients through all
  the steps (DiffusionCLIP's `clip_finetune`, whose memory holds every step's activations);
- efficient mode: one optimizer step per generation step k, on that step's x0 estimate
  (DiffusionCLIP's `clip_finetune_eff`): x_t at step k is regenerated without gradient
  from x_t0 by the current model (the official code carries it over from the step before,
  made by the model before that step's update: a difference of one learning-rate step),
  and the L1 and identity terms take the x0 estimate, so both have gradients (the
  official code's identity term reads the detached x_{t-1} and has none).
The loss: w_clip * clip_loss(S_dir) + w_L1 * |x_hat - x0| + w_ID * (1 - cos(phi(x_hat),
phi(x0))), phi the CLIP's unit image embedding or any images -> features function
(`edit.identity` = "module:function", called with the config, returning (apply, variables);
apply(variables, images in [-1, 1]) -> features (B, D)); S_dir reads both images through
`edit.clip_blur`'s low-pass (none by default). With `lora.rank` only adapters on
the UNet's convolutions and attention train, the base frozen as a constant of the step.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from clipgen import build, edit, lora
from clipgen.data import files
from clipgen.data.preprocess import to_unit_range
from clipgen.diffusion import samplers
from clipgen.models.decoder import Decoder, init_decoder
from clipgen.models.unet import init_unet
from clipgen.train.loop import Stage

MODES = ("exact", "efficient")


def training_images(config: ml_collections.ConfigDict, resolution: int) -> np.ndarray:
    """The images to fine-tune on, uint8 (N, res, res, 3): `data.folder`'s, or shapes-world
    scenes of `data.split` whose caption holds the source word."""
    data = config.data
    if data.folder:
        return files.read_images(data.folder, resolution)[1][: data.num_train]
    word = config.edit.source if config.edit.templates == "shapes" else None
    return edit.shapes_with(word, data.split, data.num_train, resolution, data.seed)[0]


def identity_features(config: ml_collections.ConfigDict, clip: build.ClipModel):
    """(apply(variables, images) -> features, variables) of `edit.identity`."""
    name = config.edit.identity
    if name == "clip":
        return (
            lambda variables, images: edit.image_embeddings(clip.module, variables, images),
            clip.params,
        )
    module_name, _, attribute = name.partition(":")
    if not attribute:
        raise ValueError(f"edit.identity={name!r}: 'clip' or 'module:function'")
    return getattr(importlib.import_module(module_name), attribute)(config)


def edit_loss(config, backbone: edit.Backbone, clip_module, identity_apply, alpha):
    """loss(params, batch, rng, constants) of the stage (see the module docstring); the CLIP
    text direction is constants["direction"], an argument, so that edits of one backbone
    share one compiled step."""
    settings = config.edit
    t0, steps = settings.t0, settings.gen_steps
    weights = (settings.clip_weight, settings.l1_weight, settings.id_weight)
    process = edit.grid_process(backbone.diffusion, t0, steps)

    def terms(edited, x0, constants):
        clip_params = constants["clip"]
        after, before = (
            edit.image_embeddings(clip_module, clip_params, edit.low_pass(x, settings.clip_blur))
            for x in (edited, x0)
        )
        cosine = edit.directional_cosine(after, before, constants["direction"])
        metrics = {
            "clip_loss": jnp.mean(edit.clip_loss(cosine, settings.clip_loss)),
            "directional_cosine": jnp.mean(cosine),
            "l1": jnp.mean(jnp.abs(edited - x0)),
        }
        if weights[2]:
            variables = constants.get("identity", clip_params)
            mine, theirs = identity_apply(variables, edited), identity_apply(variables, x0)
            metrics["identity_loss"] = jnp.mean(
                1.0 - jnp.sum(edit.unit(mine) * edit.unit(theirs), axis=-1)
            )
        total = weights[0] * metrics["clip_loss"] + weights[1] * metrics["l1"]
        if weights[2]:
            total = total + weights[2] * metrics["identity_loss"]
        return total, metrics

    def model_params(params, constants):
        return lora.merge(constants["base"], params["lora"], alpha) if alpha else params

    def exact(params, batch, rng, constants):
        del rng
        model_fn = backbone.model_fn(model_params(params, constants), batch.get("embed"))
        edited = edit.generate(
            backbone.diffusion,
            model_fn,
            batch["latent"],
            t0,
            steps,
            remat=settings.remat,
            unroll=settings.unroll,
        )
        return terms(edited, batch["image"], constants)

    def efficient(params, batch, rng, constants):
        del rng
        current = model_params(params, constants)
        model_fn = backbone.model_fn(current, batch.get("embed"))
        frozen_fn = backbone.model_fn(jax.lax.stop_gradient(current), batch.get("embed"))
        x, size = batch["latent"], batch["latent"].shape[0]
        k = batch["step"][0]

        def regenerate(i, x):
            t = jnp.full((size,), steps - 1 - i, jnp.int32)
            output = frozen_fn(x, process.model_timesteps(t))
            return samplers.ddim_step(process, output, x, t, jnp.zeros_like(x))[0]

        x = jax.lax.stop_gradient(jax.lax.fori_loop(0, k, regenerate, x))
        t = jnp.full((size,), steps - 1, jnp.int32) - k
        output = model_fn(x, process.model_timesteps(t))
        x0_estimate = process.p_mean_variance(output, x, t).pred_x0
        return terms(x0_estimate, batch["image"], constants)

    if settings.mode not in MODES:
        raise ValueError(f"edit.mode={settings.mode!r}; expected one of {MODES}")
    return exact if settings.mode == "exact" else efficient


def latents(
    config: ml_collections.ConfigDict,
    backbone: edit.Backbone,
    params: Any,
    images: np.ndarray,
    embeds: np.ndarray | None,
) -> np.ndarray:
    """x_t0 of the images (floats in [-1, 1]) by the base model, through the latent cache."""
    settings = config.edit
    t0, steps, refine = settings.t0, settings.inv_steps, settings.inv_refine

    @jax.jit
    def invert(params, x0, cond):
        model_fn = backbone.model_fn(params, cond)
        return edit.invert(backbone.diffusion, model_fn, x0, t0, steps, refine)

    cache = edit.LatentCache(settings.cache or None)
    model = f"{edit.fingerprint(backbone, params)}-refine{refine}"
    return cache.latents(
        model, images, t0, steps, lambda x, c: invert(params, x, c), embeds, config.batch_size
    )


def make_stage(config: ml_collections.ConfigDict) -> Stage:
    settings = config.edit
    backbone, base = edit.load_backbone(config.base, config, config.seed)
    clip, description = build.load_clip(config.clip.to_dict(), "clip")
    logging.info("edit %r -> %r with %s", settings.source, settings.target, description)
    direction = edit.text_direction(clip, settings.source, settings.target, edit.templates(config))
    identity_apply, identity_variables = identity_features(config, clip)
    _check_schedule(config)

    x0 = to_unit_range(training_images(config, backbone.resolution))
    embeds = None
    if backbone.condition == "image":
        embed = jax.jit(lambda params, images: edit.image_embeddings(clip.module, params, images))
        embeds = np.asarray(embed(clip.params, x0))
    x_t0 = latents(config, backbone, base, x0, embeds)
    examples = [
        {"image": x0[i], "latent": x_t0[i], **({} if embeds is None else {"embed": embeds[i]})}
        for i in range(len(x0))
    ]
    rank, alpha = config.lora.rank, float(config.lora.alpha) if config.lora.rank else 0.0
    repeats = settings.gen_steps if settings.mode == "efficient" else 1

    def to_batch(chosen: list[dict]) -> dict[str, np.ndarray]:
        return {key: np.stack([e[key] for e in chosen]) for key in chosen[0]}

    def batches(first_batch: int, global_batch_size: int):
        from clipgen.data import pipeline

        groups = pipeline.host_batches(
            examples, to_batch, first_batch // repeats, global_batch_size, config.seed
        )
        skip = first_batch % repeats
        for batch in groups:
            for k in range(skip, repeats):
                yield dict(batch, step=np.full((len(batch["image"]),), k, np.int32))
            skip = 0

    def batch_spec(global_batch_size: int):
        spec = {
            key: jax.ShapeDtypeStruct((global_batch_size, *np.shape(value)), jnp.float32)
            for key, value in examples[0].items()
        }
        spec["step"] = jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)
        return spec

    def init_model(rng):
        module, size = backbone.module, backbone.resolution
        if isinstance(module, Decoder):
            return init_decoder(module, rng, size)["params"]
        return init_unet(module, rng, size)["params"]

    def init_params(rng):
        if not rank:
            return init_model(rng)
        model = nn.meta.unbox(jax.eval_shape(init_model, rng))
        return {"lora": lora.init(model, config.lora.targets, rank, rng)}

    def pretrained():
        if not rank:
            return base
        adapters = lora.init(base, config.lora.targets, rank, jax.random.key(config.seed))
        return {"lora": jax.tree_util.tree_map(np.asarray, adapters)}

    def constants():
        frozen = {"clip": clip.params, "direction": direction}
        if rank:
            frozen["base"] = base
        if settings.id_weight and settings.identity != "clip":
            frozen["identity"] = identity_variables
        return jax.tree_util.tree_map(np.asarray, frozen)

    loss = edit_loss(config, backbone, clip.module, identity_apply, alpha)
    return Stage(
        "edit", init_params, loss, batches, batch_spec, pretrained=pretrained, constants=constants
    )


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    """Warn when total_steps and the learning rate's epoch length do not follow from the
    edit's epochs, images, batch and mode (a command-line override changed one of them)."""
    per_epoch = -(-config.data.num_train // config.batch_size)
    if config.edit.mode == "efficient":
        per_epoch *= config.edit.gen_steps
    expected = (config.edit.epochs * per_epoch, per_epoch)
    if (config.total_steps, config.optim.get("step_every")) != expected:
        logging.warning(
            "edit: %d epochs of %d images in batches of %d (%s mode) are %d steps of which %d "
            "make an epoch; the config says total_steps %d, optim.step_every %s",
            config.edit.epochs,
            config.data.num_train,
            config.batch_size,
            config.edit.mode,
            *expected,
            config.total_steps,
            config.optim.get("step_every"),
        )
