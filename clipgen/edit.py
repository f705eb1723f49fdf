"""DiffusionCLIP (Kim, Kwon and Ye, CVPR 2022, arXiv 2110.02711): text-guided image editing by
fine-tuning a diffusion model with a directional CLIP loss. What its training stage
(`clipgen.train.edit`), the edit pipeline (`clipgen.pipelines.edit`), its evaluator, the CLI
and the demo share:

- the backbone to edit (`Backbone`, `load_backbone`): a clipgen unconditional UNet or
  decoder run, a diffusers `UNet2DModel` directory (the public 256 px DDPMs), or a random
  one for tests;
- DiffusionCLIP's time grid to t0 (`grid_process`), deterministic DDIM inversion to t0
  (`invert`) and generation back (`generate`), each one `lax.scan` through the samplers;
- the directional CLIP loss's parts (`clip_pixels`, `image_embeddings`, `text_direction`,
  `directional_cosine`, `clip_loss`);
- noise combination and the continuous transition (`combine`, `parse_schedule`);
- the latent cache (`LatentCache`, `fingerprint`), so that fine-tuning and later edits
  invert an image once per (model, image, t0, S_inv).

Conventions: images are NHWC in [-1, 1]; the grids are DiffusionCLIP's `int(linspace(0, 1,
S) * t0)`. Inversion here walks the grid from the clean image (alpha-bar 1) up, so it takes
one step more than DiffusionCLIP's, which starts from the image taken as x at t = 0
(alpha-bar 1 - beta_0 = 0.9999): the mirror image of generation, which ends at alpha-bar 1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from clipgen import build
from clipgen.data import degrade, files, prompts
from clipgen.data.preprocess import CLIP_MEAN, CLIP_STD
from clipgen.diffusion import samplers
from clipgen.diffusion.gaussian import Diffusion, ModelFn
from clipgen.diffusion.schedules import uniform_grid
from clipgen.models.clip import CLIP
from clipgen.models.decoder import Decoder
from clipgen.models.unet import UNet, UNetConfig, init_unet

CLIP_LOSSES = ("official", "paper")
CONDITIONS = ("none", "image")

# --- backbones ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A diffusion UNet to edit: its module (an unconditional `UNet`, or a `Decoder`), the
    unrespaced process it was trained with, the size of its images, and for a decoder what
    conditions it: "none" (image embedding and text dropped: its unconditional branch) or
    "image" (each input's own CLIP image embedding, the text dropped)."""

    module: nn.Module
    diffusion: Diffusion
    resolution: int
    condition: str = "none"

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"backbone condition {self.condition!r}; expected one of {CONDITIONS}")
        if self.condition == "image" and not isinstance(self.module, Decoder):
            raise ValueError("only a decoder backbone can be conditioned on image embeddings")
        if self.diffusion.num_timesteps != self.diffusion.original_num_timesteps:
            raise ValueError("a backbone's process must be the unrespaced one it was trained on")

    @property
    def channels(self) -> int:
        """Image channels (the first output channels; a learned variance adds as many)."""
        unet = self.module.config.unet if isinstance(self.module, Decoder) else self.module.config
        return unet.in_channels

    def model_fn(self, params: Any, embeds: jax.Array | None = None) -> ModelFn:
        """model_fn(x_t, t) of `params`; a decoder conditioned on "image" reads `embeds`
        (B, clip_embed_dim), the inputs' CLIP image embeddings."""
        module = self.module
        if not isinstance(module, Decoder):
            return lambda x_t, t: module.apply({"params": params}, x_t, t)
        if self.condition == "image" and embeds is None:
            raise ValueError("this decoder backbone is conditioned on the inputs' CLIP embeddings")

        def decoder_fn(x_t, t):
            batch = x_t.shape[0]
            if self.condition == "image":
                image, dropped = embeds, jnp.zeros((batch,), bool)
            else:
                image = jnp.zeros((batch, module.config.clip_embed_dim))
                dropped = jnp.ones((batch,), bool)
            return module.apply({"params": params}, x_t, t, image, None, None, None, dropped)

        return decoder_fn


def load_backbone(
    base: Mapping[str, Any], config: ml_collections.ConfigDict | None = None, seed: int = 0
) -> tuple[Backbone, Any]:
    """(Backbone, host params) of `base`: {"source": a clipgen `unet` or `decoder` run (its
    `preset` for a checkpoint that stores no config), a diffusers UNet2DModel directory, or
    "random" (a UNet of `config.model` initialised from `seed`, for tests), "condition"}.
    A diffusers directory and "random" diffuse with `config.diffusion`."""
    source, condition = str(base["source"]), base.get("condition", "none")
    path = Path(source)
    if (path / "checkpoints").is_dir():
        preset = base.get("preset", "demo")

        def default(stage="unet"):
            from clipgen import stages

            return stages.get(stage).config(preset)

        trained = build.restore(path, default)
        stage_config = trained.config
        if stage_config.stage not in ("unet", "decoder"):
            raise ValueError(
                f"base {source} holds a {stage_config.stage!r} run; DiffusionCLIP edits a `unet` "
                "or a `decoder` run"
            )
        module = build.module(stage_config)
        backbone = Backbone(
            module, build.diffusion(stage_config), int(stage_config.data.resolution), condition
        )
        return backbone, _host(trained.params)
    if config is None:
        raise ValueError(f"base {source}: a diffusers directory or 'random' needs the edit config")
    diffusion = build.diffusion(config)
    if (path / "config.json").is_file():
        from clipgen.weights import load_unet

        module, variables = load_unet(path)
        if not isinstance(module, UNet):
            raise ValueError(f"base {source}: a {type(module).__name__}, not an unconditional UNet")
        size = json.loads((path / "config.json").read_text()).get("sample_size")
        resolution = int(size if isinstance(size, int) else config.data.resolution)
        return Backbone(module, diffusion, resolution, condition), _host(variables["params"])
    if source == "random":
        module = UNet(UNetConfig(**config.model.unet.to_dict()), jnp.dtype(config.model.dtype))
        size = int(config.data.resolution)
        params = jax.jit(lambda key: nn.meta.unbox(init_unet(module, key, size))["params"])(
            jax.random.key(seed)
        )
        return Backbone(module, diffusion, size, condition), _host(params)
    raise FileNotFoundError(
        f"base {source!r} is neither a clipgen unet/decoder run (no checkpoints/), a diffusers "
        "UNet2DModel directory (no config.json), nor 'random'"
    )


def _host(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


# --- grids, inversion and generation ----------------------------------------------------------


def grid_process(diffusion: Diffusion, t0: int, steps: int) -> Diffusion:
    """`diffusion` visiting only DiffusionCLIP's grid of `steps` points up to t0."""
    return diffusion.respaced(tuple(uniform_grid(t0, steps)))


def invert(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    t0: int,
    steps: int,
    refine: int = 0,
) -> jax.Array:
    """Deterministic DDIM inversion (eta 0) of images x0 to x_t0 on the grid of `steps`;
    `refine` > 0 fixed-point iterations a step make generation return x0 more closely
    (DiffusionCLIP: 0)."""
    process = grid_process(diffusion, t0, steps)
    return samplers.ddim_invert(process, model_fn, x0, fixed_point_iterations=refine)


def generate(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_t0: jax.Array,
    t0: int,
    steps: int,
    *,
    remat: bool = False,
    unroll: bool = False,
) -> jax.Array:
    """Deterministic DDIM generation (eta 0) from x_t0 down the grid of `steps`; with
    `remat` every step is a `jax.checkpoint` (differentiating through all of them keeps one
    UNet call's activations at a time); `unroll` unrolls the steps (samplers.sample)."""
    process = grid_process(diffusion, t0, steps)
    no_noise = lambda k: jnp.zeros_like(x_t0)  # noqa: E731  (DDIM with eta 0 adds none)
    return samplers.sample(
        process, model_fn, x_t0, None, method="ddim", noise=no_noise, remat=remat, unroll=unroll
    )


def forward_noise(diffusion: Diffusion, x0: jax.Array, t0: int, rng: jax.Array) -> jax.Array:
    """A stochastic x_t0 ~ q(x_t0 | x0) (DiffusionCLIP's SDEdit-style start, alpha-bar of
    step t0 - 1 as its code takes)."""
    abar = float(diffusion.alphas_cumprod[t0 - 1])
    noise = jax.random.normal(rng, x0.shape, x0.dtype)
    return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise


# --- noise combination ------------------------------------------------------------------------

Schedule = tuple[tuple[int, tuple[float, ...]], ...]


def parse_schedule(spec: Mapping[Any, Sequence[float]] | Sequence, count: int) -> Schedule:
    """A combination schedule of `count` models from DiffusionCLIP's {threshold: ratios}
    form (e.g. {300: [1, 0], 0: [0.3, 0.7]}: at t >= 300 the first model alone, below it
    30% / 70%) or a sequence of (threshold, ratios) pairs. Thresholds are sorted high to low;
    each ratio row is normalised to sum 1; some row must cover t = 0."""
    pairs = list(spec.items()) if isinstance(spec, Mapping) else [tuple(p) for p in spec]
    rows = []
    for threshold, ratios in sorted(pairs, key=lambda pair: -int(pair[0])):
        ratios = tuple(float(r) for r in ratios)
        if len(ratios) != count:
            raise ValueError(
                f"combination row {threshold}: {len(ratios)} ratios for {count} models (the "
                "official default {300: [1, 0], 0: [.3, .7, ...]} fails exactly so)"
            )
        if min(ratios) < 0 or sum(ratios) <= 0:
            raise ValueError(f"combination row {threshold}: ratios {ratios}: >= 0, not all 0")
        total = sum(ratios)
        rows.append((int(threshold), tuple(r / total for r in ratios)))
    if not rows or rows[-1][0] > 0:
        raise ValueError("a combination schedule needs a row with threshold 0 (it covers t = 0)")
    return tuple(rows)


def gamma_schedule(gamma: float) -> Schedule:
    """DiffusionCLIP's continuous transition: eps = (1 - gamma) eps_base + gamma eps_edited."""
    return ((0, (1.0 - float(gamma), float(gamma))),)


def schedule_arrays(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds (R,) int32, ratios (R, models) float32) of a schedule, `combine`'s
    operands: traced, one compiled program serves every schedule of that shape."""
    thresholds = np.asarray([row[0] for row in schedule], np.int32)
    return thresholds, np.asarray([row[1] for row in schedule], np.float32)


def combine(model_fns: Sequence[ModelFn], thresholds: Any, ratios: Any) -> ModelFn:
    """The model whose output at timestep t is sum_i r_i(t) * model_i(x_t, t), r(t) the
    row of the highest threshold t reaches (`schedule_arrays`; every output channel mixed,
    learned log-variances too, as DiffusionCLIP does)."""
    thresholds, ratios = jnp.asarray(thresholds), jnp.asarray(ratios, jnp.float32)

    def mixed(x_t, t):
        reached = t[:, None] >= thresholds[None, :]  # (B, R), thresholds high to low
        row = jnp.argmax(reached, axis=1)
        weights = ratios[row]  # (B, models)
        total = 0.0
        for i, model_fn in enumerate(model_fns):
            weight = weights[:, i].reshape(t.shape + (1,) * (x_t.ndim - 1))
            total = total + weight * model_fn(x_t, t)
        return total

    return mixed


# --- the directional CLIP loss ----------------------------------------------------------------


def clip_pixels(images: jax.Array, size: int) -> jax.Array:
    """Images in [-1, 1] as CLIP reads them, differentiably: bicubic (antialiased) resize to
    size x size, then CLIP's mean and std (DiffusionCLIP's Resize-CenterCrop-Normalize of
    square images)."""
    images = (jnp.asarray(images, jnp.promote_types(images.dtype, jnp.float32)) + 1.0) / 2.0
    if images.shape[1:3] != (size, size):
        shape = (images.shape[0], size, size, images.shape[-1])
        images = jax.image.resize(images, shape, "bicubic", antialias=True)
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def low_pass(images: jax.Array, sigma: float) -> jax.Array:
    """Images blurred by a gaussian of `sigma` pixels (0: unchanged), so that the CLIP loss
    cannot be met by pixel-scale patterns that fool a CLIP reading small images."""
    if not sigma:
        return images
    return degrade.gaussian_blur(images, sigma, 2 * math.ceil(2 * sigma) + 1)


def unit(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def image_embeddings(module: CLIP, params: Any, images: jax.Array) -> jax.Array:
    """Unit CLIP image embeddings (B, D) of images in [-1, 1], differentiable."""
    pixels = clip_pixels(images, module.vision.image_size)
    return unit(module.apply({"params": params}, pixels, method=CLIP.encode_image))


def text_embeddings(clip: build.ClipModel, texts: Sequence[str]) -> np.ndarray:
    """Unit CLIP text embeddings (N, D) of `texts`."""
    ids, mask = clip.tokenizer.encode(list(texts))
    embed = clip.module.apply({"params": clip.params}, ids, mask, method=CLIP.encode_text)
    return np.asarray(unit(embed))


def templates(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The prompt templates an edit config's text direction averages over: "shapes"
    (shapes-world captions holding the source word), "imagenet" (DiffusionCLIP's 79) or
    "plain" (the words alone)."""
    settings = config.edit
    if settings.templates == "shapes":
        return prompts.shapes_templates(settings.source, settings.num_templates, config.seed)
    if settings.templates == "imagenet":
        return prompts.IMAGENET_TEMPLATES[: settings.num_templates]
    if settings.templates == "plain":
        return ("{}",)
    raise ValueError(f"edit.templates={settings.templates!r}: shapes, imagenet or plain")


def text_direction(
    clip: build.ClipModel, source: str, target: str, templates: Sequence[str] = ("{}",)
) -> np.ndarray:
    """DiffusionCLIP's text direction (D,): the mean over templates of the unit target
    embedding minus the unit source embedding, normalised."""
    sources = text_embeddings(clip, [t.format(source) for t in templates])
    targets = text_embeddings(clip, [t.format(target) for t in templates])
    direction = (targets - sources).mean(axis=0)
    norm = float(np.linalg.norm(direction))
    if norm == 0.0:
        raise ValueError(f"the CLIP gives {source!r} and {target!r} the same text embeddings")
    return (direction / norm).astype(np.float32)


def directional_cosine(edited: jax.Array, original: jax.Array, direction: jax.Array) -> jax.Array:
    """(B,) cosine between each image direction unit(edited - original) (unit CLIP image
    embeddings) and the text direction (D,): DiffusionCLIP's S_dir."""
    return jnp.sum(unit(edited - original) * direction, axis=-1)


def clip_loss(cosine: jax.Array, form: str = "official") -> jax.Array:
    """The directional loss of each cosine: the paper's 1 - cos, or the official code's
    -log((1 + cos) / 2) (the same minimum, steeper away from it)."""
    if form == "paper":
        return 1.0 - cosine
    if form == "official":
        return -jnp.log(jnp.maximum((1.0 + cosine) / 2.0, 1e-12))
    raise ValueError(f"clip loss form {form!r}; expected one of {CLIP_LOSSES}")


# --- the latent cache -------------------------------------------------------------------------


def fingerprint(backbone: Backbone, params: Any) -> str:
    """A hash of a backbone and its parameters: latents made with it are keyed by it."""
    digest = hashlib.sha256(repr((backbone.module, backbone.condition)).encode())
    digest.update(repr(backbone.diffusion.betas.tobytes()).encode())
    for path, leaf in sorted(traverse_util.flatten_dict(_plain(params), sep="/").items()):
        digest.update(path.encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()[:24]


def _plain(tree: Any) -> Any:
    return tree.to_dict() if hasattr(tree, "to_dict") else dict(tree)


class LatentCache:
    """Inverted latents x_t0 by (model fingerprint, image, t0, S_inv) (and the image's
    condition), in memory and, with a directory, as .npy files there (no pickles)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else None
        self.memory: dict[str, np.ndarray] = {}

    @staticmethod
    def key(model: str, image: np.ndarray, t0: int, steps: int, cond: Any = None) -> str:
        digest = hashlib.sha256(f"{model}|{t0}|{steps}|{image.shape}".encode())
        digest.update(np.ascontiguousarray(np.asarray(image, np.float32)).tobytes())
        if cond is not None:
            digest.update(np.ascontiguousarray(np.asarray(cond, np.float32)).tobytes())
        return digest.hexdigest()[:32]

    def get(self, key: str) -> np.ndarray | None:
        if key in self.memory:
            return self.memory[key]
        if self.directory is not None and (self.directory / f"{key}.npy").is_file():
            self.memory[key] = np.load(self.directory / f"{key}.npy", allow_pickle=False)
            return self.memory[key]
        return None

    def put(self, key: str, latent: np.ndarray) -> None:
        self.memory[key] = np.asarray(latent, np.float32)
        if self.directory is not None:
            data = self.memory[key]
            files.atomic_write(self.directory / f"{key}.npy", lambda f: np.save(f, data))

    def latents(
        self,
        model: str,
        images: np.ndarray,
        t0: int,
        steps: int,
        compute: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
        conds: np.ndarray | None = None,
        batch_size: int = 64,
    ) -> np.ndarray:
        """x_t0 of every image (N, H, W, C) in [-1, 1], inverting with `compute(images,
        conds)` only those not cached (in chunks of `batch_size`)."""
        keys = [
            self.key(model, image, t0, steps, None if conds is None else conds[i])
            for i, image in enumerate(images)
        ]
        missing = [i for i, key in enumerate(keys) if self.get(key) is None]
        for start in range(0, len(missing), batch_size):
            rows = missing[start : start + batch_size]
            chunk_conds = None if conds is None else conds[rows]
            inverted = np.asarray(compute(images[rows], chunk_conds))
            for row, latent in zip(rows, inverted, strict=True):
                self.put(keys[row], latent)
        return np.stack([self.get(key) for key in keys])


# --- shapes-world inputs ----------------------------------------------------------------------


def shapes_with(
    word: str | None, split: str, count: int, resolution: int, seed: int = 0
) -> tuple[np.ndarray, list]:
    """(uint8 renders (count, res, res, 3), scenes) of the first `count` scenes of a
    shapes-world split whose caption holds `word` as a word (any scene for None)."""
    from clipgen.data import pipeline, shapes

    source = pipeline.ProceduralShapes((resolution,), split, seed)
    images, scenes = [], []
    for index in range(10_000 * max(count, 1)):
        example = source[index]
        if word is None or word in example["caption"].split():
            images.append(example[f"image_{resolution}"])
            scenes.append(shapes.scene_from_json(example["scene"]))
            if len(images) == count:
                return np.stack(images), scenes
    raise ValueError(f"the {split} split has fewer than {count} scenes with {word!r}")
