"""The unCLIP cascade behind one call: captions -> CLIP text encodings -> prior -> CLIP image
embeddings -> decoder -> upsamplers -> images, and the pieces the manipulations reuse
(CLIP image encoding, the decoder's condition and programs, decoding from given latents).

Each stage is one jitted program over the whole batch, its inputs sharded over a 1-D mesh
of the pipeline's devices on the batch axis (replicated when the batch does not divide),
the parameters replicated; every stage draws from its own key folded from the seed, so a
result depends on the seed only, not on the devices, unless the caller gives a stage its
starting latents and per-step noise (`stages(..., latents=, noise=)`), e.g. to reproduce
another implementation's sample. Conditioning is CLIP `text_hidden` token encodings with
the tokenizer's mask and the CLIP embeddings, L2-normalised or raw as the cascade's
conventions (`Sampling`) say: clipgen's trained stages read normalised ones from their
embedding shards; Karlo and Kandinsky feed them raw, and guide against the empty caption
rather than against a dropped text. The stages and their order come from the stage table
(clipgen.stages), the modules from the builder layer (clipgen.build). The default sampling
settings are the paper's (Table 3): prior 64 strided steps (ancestral, without
Analytic-DPM's variances) keeping the best of 2, decoder 250 steps, upsamplers DDIM 27 and
15 steps; checkpoints bring their configs' `sample`, public folders their own.
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
from clipgen.data.image_input import to_rgb_batch
from clipgen.diffusion import samplers
from clipgen.errors import InputError
from clipgen.models.clip import CLIP
from clipgen.pipelines import public
from clipgen.pipelines.common import (
    Stages,
    TextCondition,
    explicit_inputs,
    normalize,
    progress_bar,
    stage_key,
    tick,
)
from clipgen.pipelines.fit import check_fit
from clipgen.pipelines.sampling_settings import Sampling, StageSampling
from clipgen.sampling import (
    sample_decoder,
    sample_prior,
    sample_upsampler,
    to_uint8,
)


@dataclasses.dataclass(frozen=True)
class UnCLIP:
    """The cascade: CLIP, prior, decoder and upsamplers (in order), sampling settings and the
    devices its programs run on; a decoder of None leaves a prior-only cascade (Kandinsky
    2.2's prior pipeline). Build it with `from_configs`, `from_params` or `load_pipeline`;
    `generate` and `stages` draw images from captions."""

    clip: ClipModel
    prior: DiffusionModel
    decoder: DiffusionModel | None
    upsamplers: tuple[DiffusionModel, ...] = ()
    sampling: Sampling = Sampling()
    devices: tuple[jax.Device, ...] = ()
    output_resolution: int | None = None  # final images resized to this (None: as drawn)
    _programs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        devices = tuple(self.devices) or tuple(jax.devices())
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "upsamplers", tuple(self.upsamplers))
        check_fit(self.clip, self.prior, self.decoder, self.upsamplers, self.upsampler_names)
        place = functools.partial(jax.device_put, device=self.replicated)
        object.__setattr__(
            self, "clip", dataclasses.replace(self.clip, params=place(self.clip.params))
        )

        def placed(stage: DiffusionModel) -> DiffusionModel:
            last = stage.last_step_params
            last = None if last is None else place(last)
            return dataclasses.replace(stage, params=place(stage.params), last_step_params=last)

        for name in ("prior", "decoder"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, placed(getattr(self, name)))
        object.__setattr__(self, "upsamplers", tuple(placed(u) for u in self.upsamplers))

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

    def put(self, tree: Any, batch: int) -> Any:
        """`tree` placed for a program over `batch` examples (batch_sharding)."""
        return jax.device_put(tree, self.batch_sharding(batch))

    def program(self, key: tuple, make: Callable[[], Callable]) -> Callable:
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
        """The size of the cascade's final images (before `output_resolution`; 0: none)."""
        last = self.upsamplers[-1] if self.upsamplers else self.decoder
        return last.resolution if last is not None else 0

    # -- CLIP -----------------------------------------------------------------------------

    def encode_text(
        self, captions: Sequence[str], sampling: Sampling | None = None
    ) -> TextCondition:
        """The CLIP text conditioning of captions (one program), the embeddings normalised
        as `sampling` (default: the pipeline's) says."""
        ids, mask = self.clip.tokenizer.encode(list(captions))
        batch = len(ids)
        norm = (sampling or self.sampling).embed_norm

        def make():
            def encode(params, ids, mask):
                def both(module, ids, mask):
                    hidden = module.text_hidden(ids, mask)
                    embed = module.text_projection(module.text_tower.pool(hidden, ids))
                    return normalize(embed, norm), hidden.astype(jnp.float32)

                return self.clip.module.apply({"params": params}, ids, mask, method=both)

            return jax.jit(encode, out_shardings=self.batch_sharding(batch))

        program = self.program(("text", batch % len(self.devices) == 0, norm), make)
        embed, tokens = program(self.clip.params, *self.put((ids, mask), batch))
        return TextCondition(ids, mask, embed, tokens)

    def encode_images(self, images: Sequence[np.ndarray] | np.ndarray) -> jax.Array:
        """CLIP image embeddings (B, D) of images of any size and kind (read by
        `image_input.to_rgb_batch`), normalised as the pipeline's `sampling.embed_norm` says."""
        if self.clip.module.vision is None:
            raise ValueError("this cascade's CLIP has no image tower: it cannot encode images")
        size = self.clip.module.vision.image_size
        pixels = preprocess.clip_preprocess(to_rgb_batch(images), size)
        batch = len(pixels)
        norm = self.sampling.embed_norm

        def make():
            def encode(params, pixels):
                embeds = self.clip.module.apply(
                    {"params": params}, pixels, method=CLIP.encode_image
                )
                return normalize(embeds, norm)

            return jax.jit(encode, out_shardings=self.batch_sharding(batch))

        program = self.program(("image", batch % len(self.devices) == 0, norm), make)
        return program(self.clip.params, self.put(pixels, batch))

    # -- the prior ------------------------------------------------------------------------

    def sample_prior(
        self,
        text: TextCondition,
        seed: int,
        sampling: Sampling,
        *,
        null: TextCondition | None = None,
        x_T: jax.Array | None = None,
        noise: samplers.StepNoise | None = None,
    ) -> jax.Array:
        """CLIP image embeddings (B, D) drawn by the prior for `text`, normalised as
        `sampling.embed_norm` says; `null` is the empty caption's conditioning where the
        prior's guidance null is "empty_caption" (computed when not given); `x_T` (B * best_of,
        D) and `noise` fix the starting latents and each step's noise (samplers.sample)."""
        batch = len(text.input_ids)
        settings = sampling["prior"]
        if settings.guidance_null == "empty_caption" and settings.guidance != 1.0:
            null = null or self.encode_text([""] * batch, sampling)
            uncond = {"text_embed": null.embed, "text_tokens": null.tokens}
            uncond["text_mask"] = jnp.asarray(null.mask)
        else:
            uncond = None
        x_T, steps, noise_fn = explicit_inputs(self.mesh, x_T, noise, batch)

        def make():
            diffusion = self.prior.diffusion.respaced(settings.respacing)

            def draw(params, cond, uncond, x_T, steps, rng):
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
                    uncond=uncond,
                    x_T=x_T,
                    noise=noise_fn or steps,
                )
                return normalize(embeds, sampling.embed_norm)

            return jax.jit(draw, out_shardings=self.batch_sharding(batch))

        explicit = (x_T is None, steps is None, noise_fn, uncond is None)
        key = ("prior", batch % len(self.devices) == 0, settings, sampling.embed_norm, explicit)
        program = self.program(key, make)
        cond = {
            "text_embed": text.embed,
            "text_tokens": text.tokens,
            "text_mask": jnp.asarray(text.mask),
        }
        cond, uncond = self.put((cond, uncond), batch)
        return program(self.prior.params, cond, uncond, x_T, steps, stage_key(seed, "prior"))

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

    def decoder_null(self, image_embed: jax.Array, null: TextCondition) -> dict[str, Any]:
        """Karlo's guidance null for the decoder: the null image embedding with the empty
        caption's conditioning `null` (the pipeline's guidance_null "empty_caption")."""
        batch = image_embed.shape[0]
        return dict(self.decoder_condition(image_embed, null), drop_image=jnp.ones((batch,), bool))

    def sample_decoder(
        self,
        cond: dict[str, Any],
        rng: jax.Array,
        settings: StageSampling,
        x_T: jax.Array | None = None,
        *,
        uncond: dict[str, Any] | None = None,
        noise: samplers.StepNoise | None = None,
    ) -> jax.Array:
        """Decoder images (B, r, r, 3) in [-1, 1] for `decoder_condition`s, sampled as
        `settings` say from `x_T` or noise drawn from `rng`, guided against `uncond` (None:
        image and text dropped; `decoder_null` gives Karlo's); `noise` fixes each step's."""
        batch = cond["image_embed"].shape[0]
        x_T, steps, noise_fn = explicit_inputs(self.mesh, x_T, noise, batch)

        def make():
            diffusion = self.decoder.diffusion.respaced(settings.respacing)

            def draw(params, cond, uncond, x_T, steps, rng):
                return sample_decoder(
                    self.decoder.module,
                    params,
                    diffusion,
                    cond,
                    rng,
                    self.decoder.resolution,
                    guidance_scale=settings.guidance,
                    method=settings.method,
                    eta=settings.eta,
                    x_T=x_T,
                    noise=noise_fn or steps,
                    uncond=uncond,
                    clip=settings.clip,
                )

            return jax.jit(draw, out_shardings=self.batch_sharding(batch))

        explicit = (x_T is None, steps is None, noise_fn, uncond is None)
        split = batch % len(self.devices) == 0
        program = self.program(("decoder", split, settings, explicit), make)
        cond, uncond = self.put((cond, uncond), batch)
        return program(self.decoder.params, cond, uncond, x_T, steps, rng)

    def decoder_input(self, images: Sequence[np.ndarray] | np.ndarray) -> jax.Array:
        """Images of any size and kind (`image_input.to_rgb_batch`) -> the decoder's
        resolution (antialiased bicubic on the short side, centre crop) in [-1, 1]."""
        size = self.decoder.resolution
        resized = np.stack([preprocess.resize_and_crop(i, size) for i in to_rgb_batch(images)])
        return jnp.asarray(resized, jnp.float32) / 127.5 - 1.0

    # -- the upsamplers -------------------------------------------------------------------

    def upsample(
        self,
        images: jax.Array,
        seed: int,
        sampling: Sampling,
        bar: tqdm | None = None,
        *,
        latents: Mapping[str, Any] | None = None,
        noise: Mapping[str, Any] | None = None,
    ) -> tuple[jax.Array, ...]:
        """Each upsampler's output in turn from decoder images (B, r, r, 3) in [-1, 1];
        `latents` and `noise` (by upsampler name) as `stages` takes them."""
        outputs = []
        batch = images.shape[0]
        latents, noise = latents or {}, noise or {}
        for name, stage in zip(self.upsampler_names, self.upsamplers, strict=True):
            settings = sampling[name]
            x_T, steps, noise_fn = explicit_inputs(
                self.mesh, latents.get(name), noise.get(name), batch
            )

            def make(stage=stage, settings=settings, noise_fn=noise_fn):
                diffusion = stage.diffusion.respaced(settings.respacing)

                def draw(params, last, low, start, rows, draw_key):
                    return sample_upsampler(
                        stage.module,
                        params,
                        diffusion,
                        low,
                        draw_key,
                        stage.resolution,
                        method=settings.method,
                        eta=settings.eta,
                        x_T=start,
                        noise=noise_fn or rows,
                        clip=settings.clip,
                        last_step_params=last,
                        condition_blur=settings.condition_blur,
                    )

                return jax.jit(draw, out_shardings=self.batch_sharding(batch))

            split = batch % len(self.devices) == 0
            key = (name, split, settings, x_T is None, steps is None, noise_fn)
            program = self.program(key, make)
            rng = stage_key(seed, name)
            low_res = self.put(images, batch)
            images = program(stage.params, stage.last_step_params, low_res, x_T, steps, rng)
            outputs.append(tick(images, bar, name))
        return tuple(outputs)

    # -- text to image --------------------------------------------------------------------

    def stages(
        self,
        captions: Sequence[str],
        seed: int = 0,
        *,
        progress: bool = False,
        latents: Mapping[str, Any] | None = None,
        noise: Mapping[str, Any] | None = None,
        **overrides,
    ) -> Stages:
        """Every intermediate of the cascade for `captions`; `overrides` are `Sampling`
        fields (e.g. decoder_respacing="50", prior_guidance=4.0).

        `latents` and `noise` map stage names ("prior", "decoder", "upsampler", ...) to a
        stage's starting latents (the prior's (B * best_of, D) in its latent space, an image
        stage's (B, r, r, 3)) and the noise its S sampling steps add: (S - 1, *latents'
        shape) rows, row k for step k (k = 0 the noisiest; the last step adds none), or a
        function of k (a traced int32) giving one such array. A stage not named draws them
        from `seed`, as it does by default."""
        if not captions:
            raise ValueError("stages() needs at least one caption")
        latents, noise = dict(latents or {}), dict(noise or {})
        named = {"prior", *(("decoder",) if self.decoder else ()), *self.upsampler_names}
        if (set(latents) | set(noise)) - named:
            unknown = sorted((set(latents) | set(noise)) - named)
            raise ValueError(f"no stage {unknown} in this cascade; its stages: {sorted(named)}")
        sampling = self.sampling.replace(**overrides)
        guided = [sampling[name] for name in ("prior", "decoder") if name in named]
        empty = any(s.guidance_null == "empty_caption" and s.guidance != 1.0 for s in guided)
        count = 2 + (self.decoder is not None) + len(self.upsamplers)
        with progress_bar(progress, count, "unclip") as bar:
            text = tick(self.encode_text(captions, sampling), bar, "clip")
            null = self.encode_text([""] * len(captions), sampling) if empty else None
            image_embed = self.sample_prior(
                text, seed, sampling, null=null, x_T=latents.get("prior"), noise=noise.get("prior")
            )
            image_embed = tick(image_embed, bar, "prior")
            if self.decoder is None:
                return Stages(tuple(captions), text, image_embed, ())
            settings = sampling["decoder"]
            uncond = None
            if settings.guidance_null == "empty_caption" and settings.guidance != 1.0:
                uncond = self.decoder_null(image_embed, null)
            images = self.sample_decoder(
                self.decoder_condition(image_embed, text),
                stage_key(seed, "decoder"),
                settings,
                latents.get("decoder"),
                uncond=uncond,
                noise=noise.get("decoder"),
            )
            images = tick(images, bar, "decoder")
            upsampled = self.upsample(images, seed, sampling, bar, latents=latents, noise=noise)
        return Stages(tuple(captions), text, image_embed, (images, *upsampled))

    def generate(
        self, captions: Sequence[str], seed: int = 0, *, progress: bool = False, **overrides
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3) at the final resolution (or `output_resolution`);
        `overrides` as `stages` takes them (Sampling fields, `latents`, `noise`)."""
        drawn = self.stages(captions, seed, progress=progress, **overrides).images
        if not drawn:
            raise ValueError("a prior-only cascade draws no images: use stages(...).image_embed")
        return self.finish(drawn[-1])

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


# -- building -----------------------------------------------------------------------------------


def from_params(
    *,
    clip: ClipModel,
    prior: DiffusionModel,
    decoder: DiffusionModel | None,
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


def load_pipeline(settings: ml_collections.ConfigDict | Mapping[str, Any] | str | Path) -> UnCLIP:
    """The cascade in `settings.workdir` (or in the path given alone): a public diffusers
    pipeline folder (one with a model_index.json: Karlo's UnCLIPPipeline, Kandinsky 2.2's
    prior pipeline), with its own conventions (clipgen.pipelines.public), or a `clipgen
    train` run per stage of the cascade (clipgen.stages: clip, prior, decoder, then
    upsampler and upsampler2 where present) in the subdirectory of its name. Other settings
    (all optional): `preset` (the configs of runs whose checkpoints store none),
    `resolution` (resize the final images; 0: as drawn), `sampling` (Sampling overrides;
    None values ignored)."""
    if isinstance(settings, (str, Path)):
        settings = {"workdir": str(settings)}
    settings = dict(settings.to_dict() if hasattr(settings, "to_dict") else settings)
    if not settings.get("workdir"):
        raise ValueError("the unclip generator needs `workdir`: the directory of the stage runs")
    workdir = Path(settings["workdir"])
    sampling = {k: v for k, v in (settings.get("sampling") or {}).items() if v is not None}
    resolution = int(settings.get("resolution") or 0) or None
    if public.is_pipeline_folder(workdir):
        parts = public.read_folder(workdir)
        logging.info("%s cascade from %s", type(parts["prior"].module).__name__, workdir)
        parts["sampling"] = parts["sampling"].replace(**sampling)
        try:
            return from_params(**parts, output_resolution=resolution)
        except ValueError as error:  # components that load but do not fit together
            raise InputError(f"{workdir}: {error}") from None
    preset = settings.get("preset") or "demo"
    configs, params, steps = {}, {}, {}
    for spec in stages.cascade():
        run_dir = workdir / spec.name
        if spec.role == "upsampler" and not (run_dir / "checkpoints").is_dir():
            logging.info("no %s run in %s: the cascade stops before it", spec.name, workdir)
            break
        trained = build.restore(run_dir, functools.partial(spec.config, preset), spec.name)
        configs[spec.name], params[spec.name] = trained.config, trained.params
        steps[spec.name] = trained.step
    logging.info("unCLIP cascade from %s at steps %s", workdir, steps)
    return from_configs(configs, params, output_resolution=resolution, **sampling)
