"""The unCLIP cascade behind one call: captions -> CLIP text encodings -> prior -> CLIP image
embeddings -> decoder -> upsamplers -> images, and the pieces the manipulations reuse
(CLIP image encoding, DDIM inversion with the decoder, decoding from given latents).

Each stage is one jitted program over the whole batch, its inputs sharded over a 1-D mesh
of the pipeline's devices on the batch axis (replicated when the batch does not divide),
the parameters replicated; every stage draws from its own key folded from the seed, so a
result depends on the seed only, not on the devices. Conditioning follows the trainers:
L2-normalised CLIP text and image embeddings, CLIP `text_hidden` token encodings with the
tokenizer's mask (the prior and decoder trainers read the same from the embedding
shards). The stages and their order come from the stage table (clipgen.stages), the
modules from the builder layer (clipgen.build). The default sampling settings are the
paper's (Table 3): prior 64 strided steps (ancestral, without Analytic-DPM's variances)
keeping the best of 2, decoder 250 steps, upsamplers DDIM 27 and 15 steps; checkpoints
bring their configs' `sample`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image
from tqdm import tqdm

from clipgen import build, stages
from clipgen.build import ClipModel, DiffusionModel
from clipgen.data import preprocess
from clipgen.diffusion import samplers
from clipgen.models.clip import CLIP
from clipgen.models.decoder import Decoder
from clipgen.models.prior import PriorTransformer
from clipgen.pipelines.sampling_settings import Sampling, StageSampling
from clipgen.sampling import decoder_model_fn, sample_prior, sample_upsampler, to_uint8

# Salts of the pipeline's own draws, beside each stage's (clipgen.stages).
_SALT = {"render": 5, "noise": 6}


@dataclasses.dataclass(frozen=True)
class TextCondition:
    """Captions as the prior and decoder read them (arrays lead with the batch)."""

    input_ids: np.ndarray  # (B, L) int32 token ids
    mask: np.ndarray  # (B, L) int32, 1 = a real token
    embed: jax.Array  # (B, D) L2-normalised CLIP text embeddings
    tokens: jax.Array  # (B, L, width) CLIP text_hidden encodings


@dataclasses.dataclass(frozen=True)
class Stages:
    """Everything `UnCLIP.stages` computed: the text conditioning, the prior's image
    embeddings and the image at each resolution of the cascade (float32 in [-1, 1])."""

    captions: tuple[str, ...]
    text: TextCondition
    image_embed: jax.Array
    images: tuple[jax.Array, ...]

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(int(image.shape[1]) for image in self.images)

    def uint8(self) -> tuple[np.ndarray, ...]:
        """The image at each resolution as uint8 host arrays."""
        return tuple(np.asarray(to_uint8(image)) for image in self.images)


@dataclasses.dataclass(frozen=True)
class UnCLIP:
    """The cascade: CLIP, prior, decoder and upsamplers (in order), sampling settings and the
    devices its programs run on. Build it with `from_configs`, `from_params` or
    `load_pipeline`; `generate` and `stages` draw images from captions."""

    clip: ClipModel
    prior: DiffusionModel
    decoder: DiffusionModel
    upsamplers: tuple[DiffusionModel, ...] = ()
    sampling: Sampling = Sampling()
    devices: tuple[jax.Device, ...] = ()
    output_resolution: int | None = None  # final images resized to this (None: as drawn)
    _programs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        devices = tuple(self.devices) or tuple(jax.devices())
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "upsamplers", tuple(self.upsamplers))
        self._check_shapes()
        replicated = self.replicated
        place = functools.partial(jax.device_put, device=replicated)
        object.__setattr__(
            self, "clip", dataclasses.replace(self.clip, params=place(self.clip.params))
        )
        for name in ("prior", "decoder"):
            stage = getattr(self, name)
            object.__setattr__(self, name, dataclasses.replace(stage, params=place(stage.params)))
        object.__setattr__(
            self,
            "upsamplers",
            tuple(dataclasses.replace(u, params=place(u.params)) for u in self.upsamplers),
        )

    # -- placement ------------------------------------------------------------------------

    @functools.cached_property
    def mesh(self) -> Mesh:
        return Mesh(np.array(self.devices), ("data",))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, batch: int) -> NamedSharding:
        """Sharded over the devices on the batch axis when `batch` divides, else replicated."""
        split = batch % len(self.devices) == 0
        return NamedSharding(self.mesh, PartitionSpec("data") if split else PartitionSpec())

    def _put(self, tree: Any, batch: int) -> Any:
        return jax.device_put(tree, self.batch_sharding(batch))

    def _program(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        """The jitted program cached under `key` (settings that change its trace)."""
        if key not in self._programs:
            self._programs[key] = make()
        return self._programs[key]

    # -- sizes ----------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return int(self.clip.module.projection_dim)

    @property
    def upsampler_names(self) -> tuple[str, ...]:
        """The stage names of the upsamplers, in order (clipgen.stages)."""
        names = tuple(spec.name for spec in stages.cascade() if spec.role == "upsampler")
        return names[: len(self.upsamplers)]

    @property
    def resolution(self) -> int:
        """The size of the cascade's final images (before `output_resolution`)."""
        return (self.upsamplers[-1] if self.upsamplers else self.decoder).resolution

    def _check_shapes(self) -> None:
        clip, tokenizer = self.clip.module, self.clip.tokenizer
        problems = []
        prior = self.prior.module
        if isinstance(prior, PriorTransformer):
            cfg = prior.config
            expected = {
                "embedding_dim": (cfg.embedding_dim, "projection_dim", clip.projection_dim),
                "encoder_hidden_dim": (cfg.encoder_hidden_dim, "text width", clip.text.width),
                "num_embeddings": (cfg.num_embeddings, "context length", tokenizer.context_length),
            }
            problems += [
                f"prior {key} is {mine}, the CLIP's {what} is {theirs}"
                for key, (mine, what, theirs) in expected.items()
                if mine != theirs
            ]
        decoder = self.decoder.module
        if isinstance(decoder, Decoder):
            cfg = decoder.config
            if cfg.clip_embed_dim != clip.projection_dim:
                problems.append(
                    f"decoder clip_embed_dim is {cfg.clip_embed_dim}, the CLIP's projection_dim "
                    f"is {clip.projection_dim}"
                )
            if cfg.text_transformer is None and cfg.token_width != clip.text.width:
                problems.append(
                    f"decoder text_width is {cfg.token_width}, the CLIP text width is "
                    f"{clip.text.width}"
                )
            glide = cfg.text_transformer
            if glide is not None and glide.context_length != tokenizer.context_length:
                problems.append(
                    f"the decoder's text transformer reads {glide.context_length} tokens, the "
                    f"CLIP tokenizer gives {tokenizer.context_length}"
                )
        if len(self.upsampler_names) < len(self.upsamplers):
            problems.append(
                f"{len(self.upsamplers)} upsamplers, but the stage table has "
                f"{len(self.upsampler_names)} upsampler stages"
            )
        sizes = [self.decoder.resolution] + [u.resolution for u in self.upsamplers]
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            problems.append(f"the cascade's resolutions {sizes} do not increase")
        if problems:
            raise ValueError(
                "the stages do not fit together: "
                + "; ".join(problems)
                + ". Train the prior and decoder on this CLIP's embeddings (their configs' "
                "model dimensions must be the CLIP's)."
            )

    # -- CLIP -----------------------------------------------------------------------------

    def encode_text(self, captions: Sequence[str]) -> TextCondition:
        """The CLIP text conditioning of captions (one program)."""
        ids, mask = self.clip.tokenizer.encode(list(captions))
        batch = len(ids)

        def make():
            def encode(params, ids, mask):
                def both(module, ids, mask):
                    hidden = module.text_hidden(ids, mask)
                    embed = module.text_projection(module.text_tower.pool(hidden, ids))
                    return normalize(embed), hidden.astype(jnp.float32)

                return self.clip.module.apply({"params": params}, ids, mask, method=both)

            return jax.jit(encode, out_shardings=self.batch_sharding(batch))

        program = self._program(("text", batch % len(self.devices) == 0), make)
        embed, tokens = program(self.clip.params, *self._put((ids, mask), batch))
        return TextCondition(ids, mask, embed, tokens)

    def encode_images(self, images: Sequence[np.ndarray] | np.ndarray) -> jax.Array:
        """L2-normalised CLIP image embeddings (B, D) of uint8 images of any size."""
        size = self.clip.module.vision.image_size
        pixels = preprocess.clip_preprocess(list(images), size)
        batch = len(pixels)

        def make():
            def encode(params, pixels):
                embeds = self.clip.module.apply(
                    {"params": params}, pixels, method=CLIP.encode_image
                )
                return normalize(embeds)

            return jax.jit(encode, out_shardings=self.batch_sharding(batch))

        program = self._program(("image", batch % len(self.devices) == 0), make)
        return program(self.clip.params, self._put(pixels, batch))

    # -- the prior ------------------------------------------------------------------------

    def sample_prior(self, text: TextCondition, seed: int, sampling: Sampling) -> jax.Array:
        """L2-normalised CLIP image embeddings (B, D) drawn by the prior for `text`."""
        batch = len(text.input_ids)
        settings = sampling["prior"]

        def make():
            diffusion = self.prior.diffusion.respaced(settings.respacing)

            def draw(params, cond, rng):
                embeds = sample_prior(
                    self.prior.module,
                    params,
                    diffusion,
                    cond,
                    rng,
                    guidance_scale=settings.guidance,
                    best_of=settings.best_of,
                    method=settings.method,
                    eta=settings.eta,
                    clip_denoised=settings.clip,
                )
                return normalize(embeds)

            return jax.jit(draw, out_shardings=self.batch_sharding(batch))

        program = self._program(("prior", batch % len(self.devices) == 0, settings), make)
        cond = {
            "text_embed": text.embed,
            "text_tokens": text.tokens,
            "text_mask": jnp.asarray(text.mask),
        }
        return program(self.prior.params, self._put(cond, batch), stage_key(seed, "prior"))

    # -- the decoder ----------------------------------------------------------------------

    def decoder_condition(
        self, image_embed: jax.Array, text: TextCondition | None = None
    ) -> dict[str, Any]:
        """The decoder's inputs for image embeddings (B, D) and captions; `text` None gives
        the dropped text (every token masked, no pooled text embedding) that the decoder
        trained with for half its examples, which the manipulations use."""
        batch = image_embed.shape[0]
        length = self.clip.tokenizer.context_length
        glide = getattr(getattr(self.decoder.module, "config", None), "text_transformer", None)
        if text is None:
            tokens = (
                jnp.zeros((batch, length), jnp.int32)
                if glide
                else jnp.zeros((batch, length, self.clip.module.text.width), jnp.float32)
            )
            cond = {
                "text": tokens,
                "text_mask": jnp.zeros((batch, length), jnp.int32),
                "text_embed": None if glide else jnp.zeros((batch, self.embed_dim), jnp.float32),
                "drop_text": jnp.ones((batch,), bool),
            }
        else:
            cond = {
                "text": jnp.asarray(text.input_ids) if glide else text.tokens,
                "text_mask": jnp.asarray(text.mask),
                "text_embed": None if glide else text.embed,
                "drop_text": jnp.zeros((batch,), bool),
            }
        return dict(cond, image_embed=image_embed)

    def _decoder_fn(self, params: Any, cond: dict[str, Any], guidance: float):
        """model_fn(x_t, t) of the decoder, guided against the output with both the image
        embedding and the text dropped (guidance 1: none)."""
        return decoder_model_fn(self.decoder.module, params, guidance, cond)

    def sample_decoder(
        self,
        cond: dict[str, Any],
        rng: jax.Array,
        settings: StageSampling,
        x_T: jax.Array | None = None,
    ) -> jax.Array:
        """Decoder images (B, r, r, 3) in [-1, 1] for `decoder_condition`s, sampled as
        `settings` say from `x_T` or noise drawn from `rng`."""
        batch = cond["image_embed"].shape[0]
        size = self.decoder.resolution
        method, eta, guidance = settings.method, settings.eta, settings.guidance

        def make():
            diffusion = self.decoder.diffusion.respaced(settings.respacing)

            def draw(params, cond, x_T, rng):
                noise_rng, step_rng = jax.random.split(rng)
                if x_T is None:
                    shape = (cond["image_embed"].shape[0], size, size, 3)
                    x_T = jax.random.normal(noise_rng, shape)
                model_fn = self._decoder_fn(params, cond, guidance)
                return samplers.sample(
                    diffusion, model_fn, x_T, step_rng, method=method, eta=eta, clip=1.0
                )

            return jax.jit(draw, out_shardings=self.batch_sharding(batch))

        key = ("decoder", batch % len(self.devices) == 0, settings, x_T is None)
        program = self._program(key, make)
        inputs = self._put((cond, x_T), batch)
        return program(self.decoder.params, *inputs, rng)

    def invert(
        self, x_0: jax.Array, cond: dict[str, Any], sampling: Sampling | None = None
    ) -> jax.Array:
        """x_T that deterministic DDIM over `invert_respacing` decodes back to the decoder
        images `x_0` (B, r, r, 3) in [-1, 1] under `cond` (one program)."""
        s = sampling or self.sampling
        batch = x_0.shape[0]

        def make():
            diffusion = self.decoder.diffusion.respaced(s.invert_respacing)

            def invert(params, cond, x_0):
                model_fn = self._decoder_fn(params, cond, s.edit_guidance)
                return samplers.ddim_invert(
                    diffusion,
                    model_fn,
                    x_0,
                    clip=1.0,
                    fixed_point_iterations=s.invert_iterations,
                )

            return jax.jit(invert, out_shardings=self.batch_sharding(batch))

        split = batch % len(self.devices) == 0
        key = ("invert", split, s.invert_respacing, s.invert_iterations, s.edit_guidance)
        program = self._program(key, make)
        return program(self.decoder.params, *self._put((cond, x_0), batch))

    def decoder_input(self, images: Sequence[np.ndarray] | np.ndarray) -> jax.Array:
        """uint8 images of any size -> the decoder's resolution (antialiased bicubic on the
        short side, centre crop) in [-1, 1]."""
        size = self.decoder.resolution
        resized = np.stack([preprocess.resize_and_crop(np.asarray(i), size) for i in images])
        return jnp.asarray(resized, jnp.float32) / 127.5 - 1.0

    # -- the upsamplers -------------------------------------------------------------------

    def upsample(
        self, images: jax.Array, seed: int, sampling: Sampling, bar: tqdm | None = None
    ) -> tuple[jax.Array, ...]:
        """Each upsampler's output in turn from decoder images (B, r, r, 3) in [-1, 1]."""
        outputs = []
        batch = images.shape[0]
        for name, stage in zip(self.upsampler_names, self.upsamplers, strict=True):
            settings = sampling[name]

            def make(stage=stage, settings=settings):
                diffusion = stage.diffusion.respaced(settings.respacing)

                def draw(params, low_res, rng):
                    return sample_upsampler(
                        stage.module,
                        params,
                        diffusion,
                        low_res,
                        rng,
                        stage.resolution,
                        method=settings.method,
                        eta=settings.eta,
                    )

                return jax.jit(draw, out_shardings=self.batch_sharding(batch))

            split = batch % len(self.devices) == 0
            key = (name, split, settings.respacing, settings.method, settings.eta)
            program = self._program(key, make)
            images = program(stage.params, self._put(images, batch), stage_key(seed, name))
            outputs.append(tick(images, bar, name))
        return tuple(outputs)

    # -- text to image --------------------------------------------------------------------

    def stages(
        self, captions: Sequence[str], seed: int = 0, *, progress: bool = False, **overrides
    ) -> Stages:
        """Every intermediate of the cascade for `captions`; `overrides` are `Sampling`
        fields (e.g. decoder_respacing="50", prior_guidance=4.0)."""
        if not captions:
            raise ValueError("stages() needs at least one caption")
        sampling = self.sampling.replace(**overrides)
        with progress_bar(progress, 3 + len(self.upsamplers), "unclip") as bar:
            text = tick(self.encode_text(captions), bar, "clip")
            image_embed = tick(self.sample_prior(text, seed, sampling), bar, "prior")
            images = self.sample_decoder(
                self.decoder_condition(image_embed, text),
                stage_key(seed, "decoder"),
                sampling["decoder"],
            )
            images = tick(images, bar, "decoder")
            upsampled = self.upsample(images, seed, sampling, bar)
        return Stages(tuple(captions), text, image_embed, (images, *upsampled))

    def generate(
        self, captions: Sequence[str], seed: int = 0, *, progress: bool = False, **overrides
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3) at the final resolution (or `output_resolution`)."""
        final = self.stages(captions, seed, progress=progress, **overrides).images[-1]
        return self.finish(final)

    def finish(self, images: jax.Array) -> np.ndarray:
        """Final [-1, 1] images -> uint8 host arrays, resized to `output_resolution` if set."""
        pictures = np.asarray(to_uint8(images))
        size = self.output_resolution
        if size and size != pictures.shape[1]:
            pictures = np.stack(
                [
                    np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC))
                    for p in pictures
                ]
            )
        return pictures

    # -- decoding given latents (the manipulations) ---------------------------------------

    def render(
        self,
        image_embed: jax.Array,
        x_T: jax.Array,
        seed: int = 0,
        *,
        eta: float = 0.0,
        text: TextCondition | None = None,
        sampling: Sampling | None = None,
        bar: tqdm | None = None,
    ) -> tuple[jax.Array, ...]:
        """The cascade's images at each resolution from image embeddings and decoder start
        latents x_T, by DDIM(eta) over `invert_respacing` with `edit_guidance` (the process
        `invert` runs backwards), then the upsamplers."""
        s = sampling or self.sampling
        cond = self.decoder_condition(jnp.asarray(image_embed, jnp.float32), text)
        settings = StageSampling(s.invert_respacing, "ddim", float(eta), s.edit_guidance)
        images = self.sample_decoder(
            cond, stage_key(seed, "render"), settings, x_T=jnp.asarray(x_T, jnp.float32)
        )
        images = tick(images, bar, "decoder")
        return (images, *self.upsample(images, seed, s, bar))


# -- helpers ------------------------------------------------------------------------------------


def normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm, float32."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def stage_key(seed: int, stage: str) -> jax.Array:
    """The key a stage (or the pipeline's "render" and "noise" draws) draws from for `seed`."""
    salt = _SALT[stage] if stage in _SALT else stages.get(stage).salt
    return jax.random.fold_in(jax.random.key(seed), salt)


def progress_bar(enabled: bool | tqdm, total: int, desc: str):
    """A tqdm bar over stages (disabled unless asked for)."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def tick(value: Any, bar: tqdm | None, stage: str) -> Any:
    """Mark a stage done on the progress bar once its arrays are ready."""
    if bar is not None and not bar.disable:
        jax.block_until_ready(value)
        bar.set_postfix_str(stage)
        bar.update()
    return value


# -- building -----------------------------------------------------------------------------------


def from_params(
    *,
    clip: ClipModel,
    prior: DiffusionModel,
    decoder: DiffusionModel,
    upsamplers: Sequence[DiffusionModel] = (),
    sampling: Sampling | None = None,
    devices: Sequence[jax.Device] | None = None,
    output_resolution: int | None = None,
) -> UnCLIP:
    """A pipeline from modules and parameters already in hand (tests, converted weights)."""
    return UnCLIP(
        clip,
        prior,
        decoder,
        tuple(upsamplers),
        sampling or Sampling(),
        tuple(devices or ()),
        output_resolution,
    )


def from_configs(
    configs: Mapping[str, ml_collections.ConfigDict],
    params: Mapping[str, Any],
    *,
    devices: Sequence[jax.Device] | None = None,
    output_resolution: int | None = None,
    **overrides,
) -> UnCLIP:
    """A pipeline from stage configs and parameters keyed by stage name (clipgen.stages:
    clip, prior, decoder, then the upsamplers present, in order), sampling as the configs'
    `sample` sections say, then `overrides` (Sampling's flat names)."""
    models: dict[str, list] = {role: [] for role in stages.ROLES}
    for spec in stages.cascade():
        if spec.name not in configs:
            if spec.role != "upsampler":
                raise ValueError(f"the cascade needs the {spec.name} stage's config and params")
            continue
        make = build.clip_model if spec.role == "clip" else build.diffusion_model
        models[spec.role].append(make(configs[spec.name], params[spec.name]))
    sampling = Sampling.from_configs(configs).replace(**overrides)
    return from_params(
        clip=models["clip"][0],
        prior=models["prior"][0],
        decoder=models["decoder"][0],
        upsamplers=models["upsampler"],
        sampling=sampling,
        devices=devices,
        output_resolution=output_resolution,
    )


def load_pipeline(settings: ml_collections.ConfigDict | Mapping[str, Any]) -> UnCLIP:
    """The cascade trained in `settings.workdir`: a `clipgen train` run per stage of the
    cascade (clipgen.stages: clip, prior, decoder, then upsampler and upsampler2 where
    present) in the subdirectory of its name. Other settings (all optional): `preset` (the
    configs of runs whose checkpoints store none), `resolution` (resize the final images;
    0: as drawn), `sampling` (Sampling overrides; None values ignored)."""
    settings = dict(settings.to_dict() if hasattr(settings, "to_dict") else settings)
    if not settings.get("workdir"):
        raise ValueError("the unclip generator needs `workdir`: the directory of the stage runs")
    workdir = Path(settings["workdir"])
    preset = settings.get("preset") or "demo"
    configs, params, steps = {}, {}, {}
    for spec in stages.cascade():
        run_dir = workdir / spec.name
        if spec.role == "upsampler" and not (run_dir / "checkpoints").is_dir():
            logging.info("no %s run in %s: the cascade stops before it", spec.name, workdir)
            break
        trained = build.restore(run_dir, functools.partial(spec.config, preset))
        configs[spec.name], params[spec.name] = trained.config, trained.params
        steps[spec.name] = trained.step
    logging.info("unCLIP cascade from %s at steps %s", workdir, steps)
    sampling = {k: v for k, v in (settings.get("sampling") or {}).items() if v is not None}
    return from_configs(
        configs, params, output_resolution=int(settings.get("resolution") or 0) or None, **sampling
    )
