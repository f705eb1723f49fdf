"""DiffusionCLIP edits at inference: invert images with the base model to x_t0 (cached), then
generate with an edited model, a blend of the base and an edited model (the continuous
transition gamma), or a time-scheduled mix of several edits (noise combination); and
unseen-domain translation (stochastic forward to t0 and a 6-step generation by the base,
repeated, then the inversion and the edit).

An edit is an `edit` stage run (`clipgen train --config configs/edit.py`, or `clipgen edit
--source --target`) or a file `save_edit` wrote: safetensors holding the fine-tuned UNet's
parameters, or only the LoRA adapters, with the stage's config as JSON metadata; the base
they apply to is the config's `base` (checked by fingerprint when the file holds adapters).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from flax import traverse_util

import clipgen
from clipgen import build, edit, lora
from clipgen.data.files import atomic_write
from clipgen.data.preprocess import to_unit_range
from clipgen.sampling import to_uint8


@dataclasses.dataclass(frozen=True)
class Edit:
    """A fine-tuned edit: the stage config it was trained with and its trained parameters
    (the UNet's, or {"lora": adapters} over the config's base)."""

    config: ml_collections.ConfigDict
    params: Any
    base_fingerprint: str = ""  # `edit.fingerprint` of the base it was fine-tuned from

    @property
    def name(self) -> str:
        return f"{self.config.edit.source}->{self.config.edit.target}"


def load_edit(path: str | Path) -> Edit:
    """The edit in an `edit` run directory (its newest checkpoint) or a `save_edit` file."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        trained = build.restore(path)
        if trained.config.get("stage") != "edit":
            raise ValueError(f"{path} holds a {trained.config.get('stage')!r} run, not an edit")
        return Edit(trained.config, trained.params)
    if not path.is_file():
        raise FileNotFoundError(f"no edit run (checkpoints/) or edit file at {path}")
    tensors = safetensors.numpy.load_file(str(path))
    with safetensors.safe_open(str(path), framework="numpy") as file:
        metadata = file.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} is a safetensors file without an edit's config in its metadata")
    config = ml_collections.ConfigDict(build._tuples(json.loads(metadata["config"])))
    params = traverse_util.unflatten_dict(tensors, sep="/")
    return Edit(config, params, metadata.get("base_fingerprint", ""))


def save_edit(path: str | Path, found: Edit) -> Path:
    """Write an edit as safetensors: its parameters ("/"-joined names; only the adapters
    of a LoRA edit), its config and clipgen's version as metadata."""
    flat = traverse_util.flatten_dict(jax.device_get(found.params), sep="/")
    tensors = {name: np.ascontiguousarray(np.asarray(value)) for name, value in flat.items()}
    metadata = {
        "config": found.config.to_json(),
        "clipgen_version": clipgen.__version__,
        "base_fingerprint": found.base_fingerprint,
    }
    payload = safetensors.numpy.save(tensors, metadata=metadata)
    return atomic_write(path, lambda file: file.write(payload))


class Editor:
    """Edits images of one base model: inverts them once (cached by model, image, t0 and
    S_inv) and generates with any mix of the base and edited parameters."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        cache: str | Path | None = None,
        t0: int | None = None,
        inv_steps: int | None = None,
        steps: int | None = None,
        base: tuple[edit.Backbone, Any] | None = None,
    ):
        """The base of edit config `config` (its t0, S_inv and S_test unless given);
        `base` reuses an already loaded (Backbone, params)."""
        settings = config.edit
        self.config = config
        self.backbone, params = base or edit.load_backbone(config.base, config, config.seed)
        self.base = jax.tree_util.tree_map(jnp.asarray, params)
        self.t0 = int(t0 or settings.t0)
        self.inv_steps = int(inv_steps or settings.inv_steps)
        self.steps = int(steps or settings.test_steps)
        self.refine = int(settings.inv_refine)
        self.cache = edit.LatentCache(cache)
        self.fingerprint = edit.fingerprint(self.backbone, params)
        self.model = f"{self.fingerprint}-refine{self.refine}"
        self._clip = None
        self._programs: dict = {}

    # -- parameters of edits ------------------------------------------------------------------

    def params_of(self, found: Edit) -> Any:
        """The edit's full UNet parameters over this editor's base (LoRA merged); an edit
        fine-tuned from another base is refused."""
        if found.base_fingerprint and found.base_fingerprint != self.fingerprint:
            raise ValueError(
                f"the {found.name} edit was fine-tuned from another model (fingerprint "
                f"{found.base_fingerprint}) than this base {self.config.base.source} "
                f"({self.fingerprint})"
            )
        if found.config.get("lora") and found.config.lora.rank:
            return lora.merge(self.base, found.params["lora"], found.config.lora.alpha)
        return jax.tree_util.tree_map(jnp.asarray, found.params)

    # -- the pieces -----------------------------------------------------------------------------

    @property
    def clip(self) -> build.ClipModel:
        """The CLIP of the editor's config (the edit's loss CLIP), loaded on first use."""
        if self._clip is None:
            self._clip = build.load_clip(self.config.clip.to_dict(), "clip")[0]
        return self._clip

    def inputs(self, images: np.ndarray) -> jax.Array:
        """uint8 images at the backbone's size -> floats in [-1, 1]."""
        images = np.asarray(images)
        size = self.backbone.resolution
        if images.shape[1:3] != (size, size):
            raise ValueError(f"images are {images.shape[1:3]}, the backbone draws {size} px")
        return jnp.asarray(to_unit_range(images))

    def embeds(self, x0: jax.Array) -> jax.Array | None:
        """The inputs' CLIP image embeddings when the backbone is conditioned on them."""
        if self.backbone.condition != "image":
            return None
        module = self.clip.module
        program = self._program(
            "embed", lambda: lambda params, x: edit.image_embeddings(module, params, x)
        )
        return program(self.clip.params, x0)

    def latents(self, images: np.ndarray) -> np.ndarray:
        """x_t0 of uint8 images by the base model (deterministic DDIM, cached)."""
        x0 = self.inputs(images)
        embeds = self.embeds(x0)
        t0, steps, refine = self.t0, self.inv_steps, self.refine

        def build_program():
            backbone = self.backbone

            def invert(params, x, cond):
                model_fn = backbone.model_fn(params, cond)
                return edit.invert(backbone.diffusion, model_fn, x, t0, steps, refine)

            return invert

        invert = self._program(("invert", t0, steps, refine), build_program)
        return self.cache.latents(
            self.model,
            np.asarray(x0),
            t0,
            steps,
            lambda x, c: invert(self.base, x, c),
            None if embeds is None else np.asarray(embeds),
        )

    def generate(
        self,
        latents: np.ndarray,
        models: Sequence[Any],
        schedule: edit.Schedule,
        embeds: jax.Array | None = None,
        steps: int | None = None,
    ) -> np.ndarray:
        """uint8 images generated from x_t0 `latents` by the mix `schedule` of `models`
        (parameter trees); models at weight 0 everywhere are left out before compiling."""
        used = [i for i in range(len(models)) if any(row[1][i] for row in schedule)]
        schedule = tuple((t, tuple(row[i] for i in used)) for t, row in schedule)
        thresholds, ratios = edit.schedule_arrays(schedule)
        steps = int(steps or self.steps)

        def build_program():
            backbone = self.backbone

            def draw(params_list, latents, cond, thresholds, ratios):
                fns = [backbone.model_fn(p, cond) for p in params_list]
                model_fn = edit.combine(fns, thresholds, ratios)
                images = edit.generate(backbone.diffusion, model_fn, latents, self.t0, steps)
                return to_uint8(images)

            return draw

        program = self._program(("generate", len(used), steps, self.t0), build_program)
        chosen = [models[i] for i in used]
        return np.asarray(program(chosen, jnp.asarray(latents), embeds, thresholds, ratios))

    def _program(self, key, build_program):
        if key not in self._programs:
            self._programs[key] = jax.jit(build_program())
        return self._programs[key]

    # -- editing --------------------------------------------------------------------------------

    def apply(
        self,
        images: np.ndarray,
        edits: Sequence[Edit],
        schedule: edit.Schedule | None = None,
        gamma: float = 1.0,
    ) -> np.ndarray:
        """Edited uint8 images: one edit at strength `gamma` (eps = (1 - gamma) eps_base +
        gamma eps_edit), or several mixed by `schedule` over [edits...] (DiffusionCLIP's
        {threshold: ratios}, see `edit.parse_schedule`)."""
        latents = self.latents(images)
        embeds = self.embeds(self.inputs(images))
        models = [self.params_of(found) for found in edits]
        if schedule is None:
            if len(edits) != 1:
                raise ValueError("several edits need a combination schedule")
            schedule = edit.gamma_schedule(gamma)
            return self.generate(latents, [self.base, models[0]], schedule, embeds)
        return self.generate(latents, models, schedule, embeds)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """Inversion then generation by the base model alone (how faithful the inversion is)."""
        latents = self.latents(images)
        embeds = self.embeds(self.inputs(images))
        return self.generate(latents, [self.base], ((0, (1.0,)),), embeds)

    def unseen(self, images: np.ndarray, iterations: int = 8, seed: int = 0) -> np.ndarray:
        """DiffusionCLIP's unseen-domain translation into the base's domain: `iterations`
        times a stochastic forward to t0 and a 6-step generation by the base, from the
        previous result; edit the output with `apply` (which inverts it)."""
        from clipgen.pipelines.unclip import stage_key

        x = self.inputs(images)
        embeds = self.embeds(x)
        backbone, t0 = self.backbone, self.t0

        def build_program():
            def translate(params, x, cond, rng):
                model_fn = backbone.model_fn(params, cond)
                x_t = edit.forward_noise(backbone.diffusion, x, t0, rng)
                return edit.generate(backbone.diffusion, model_fn, x_t, t0, 6)

            return translate

        program = self._program(("unseen", t0), build_program)
        key = stage_key(seed, "edit")
        for iteration in range(iterations):
            x = program(self.base, x, embeds, jax.random.fold_in(key, iteration))
        return np.asarray(to_uint8(x))

    def direction_scores(self, inputs: np.ndarray, outputs: np.ndarray, found: Edit) -> np.ndarray:
        """S_dir (N,) of each (input, output) uint8 pair: the cosine of its CLIP image
        direction with `found`'s text direction, by this editor's CLIP."""
        settings = found.config.edit
        direction = edit.text_direction(
            self.clip, settings.source, settings.target, edit.templates(found.config)
        )

        def build_program():
            module = self.clip.module

            def score(params, before, after, direction):
                return edit.directional_cosine(
                    edit.image_embeddings(module, params, after),
                    edit.image_embeddings(module, params, before),
                    direction,
                )

            return score

        program = self._program("direction", build_program)
        before, after = to_unit_range(np.asarray(inputs)), to_unit_range(np.asarray(outputs))
        return np.asarray(program(self.clip.params, before, after, direction))
