"""pOps operators at inference: a fine-tuned prior that maps input CLIP image embeddings
(and an instruction's tokens) to the embedding of the composed result, sampled with
classifier-free guidance against every input dropped; outputs are CLIP image embeddings
that feed another operator directly (chains and trees in memory) or render through a
cascade's decoder and upsamplers.

Embedding files (`save_embeddings`, `.npz`, no pickles) hold CLIP-space embeddings and
record it (`normalized`: False), so a chain never normalises twice; a file holding the
prior's normalised latents says so and is mapped back on reading.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import clipgen
from clipgen import build, lora, operators
from clipgen.data.files import atomic_write
from clipgen.diffusion.gaussian import Diffusion
from clipgen.models.prior import PriorTransformer
from clipgen.pipelines.unclip import UnCLIP, normalize, stage_key
from clipgen.sampling import sample_prior


@dataclasses.dataclass(frozen=True)
class Operator:
    """A trained operator: its spec, prior module and (merged) parameters, the process it
    samples with (respaced), and whether CLIP embeddings are L2-normalised before the
    prior's own normalisation (clipgen's priors; pOps' Kandinsky prior takes them raw)."""

    spec: operators.OperatorSpec
    module: PriorTransformer
    params: Any
    diffusion: Diffusion
    method: str = "ddpm"
    l2: bool = True
    _programs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def latents(self, embeds: Any) -> jax.Array:
        """CLIP image embeddings (..., D) -> the prior's normalised space."""
        embeds = jnp.asarray(embeds, jnp.float32)
        if self.l2:
            embeds = normalize(embeds)
        return operators.normalize(embeds, self.params["clip_mean"], self.params["clip_std"])

    def __call__(
        self,
        inputs: Sequence[Any],
        seed: int = 0,
        *,
        guidance: float | None = None,
        dropped: Sequence[bool] = (),
        text_states: Any = None,
        text_mask: Any = None,
    ) -> jax.Array:
        """CLIP image embeddings (B, D) of the operator applied to `inputs` (one (B, D)
        array per input); `dropped` leaves inputs out (pOps' partial inputs), `guidance`
        overrides the spec's scale."""
        if len(inputs) != self.spec.inputs:
            raise ValueError(
                f"operator {self.spec.name} takes {self.spec.inputs} inputs, got {len(inputs)}"
            )
        if self.spec.text and text_states is None:
            raise ValueError(f"operator {self.spec.name} needs an instruction's token states")
        latents = jnp.stack([self.latents(x) for x in inputs], axis=1)
        batch = latents.shape[0]
        drops = np.zeros((batch, self.spec.inputs), bool)
        drops[:, : len(dropped)] = np.asarray(dropped, bool)
        scale = self.spec.guidance if guidance is None else float(guidance)
        key = (scale, text_states is None)
        if key not in self._programs:
            self._programs[key] = jax.jit(
                lambda params, latents, drops, states, mask, rng: self._draw(
                    params, latents, drops, states, mask, rng, scale
                )
            )
        return self._programs[key](
            self.params, latents, drops, text_states, text_mask, stage_key(seed, "operator")
        )

    def _draw(self, params, latents, drops, states, mask, rng, scale):
        cond = operators.condition(
            latents, self.module, dropped=drops, text_states=states, text_mask=mask
        )
        every = jnp.ones_like(drops)
        uncond = operators.condition(
            latents, self.module, dropped=every, text_states=states, text_mask=mask
        )
        return sample_prior(
            self.module,
            params,
            self.diffusion,
            cond,
            rng,
            guidance_scale=scale,
            method=self.method,
            uncond=uncond,
        )

    def mean_baseline(self, inputs: Sequence[Any]) -> jax.Array:
        """pOps' linear baseline: the mean of the inputs in the prior's normalised space,
        as CLIP image embeddings (B, D)."""
        mean = jnp.mean(jnp.stack([self.latents(x) for x in inputs]), axis=0)
        return operators.unnormalize(mean, self.params["clip_mean"], self.params["clip_std"])


def from_trained(config: ml_collections.ConfigDict, params: Any) -> Operator:
    """An Operator from an operator run's config and (EMA) parameters (LoRA merged)."""
    if config.get("lora") and config.lora.rank:
        params = lora.merge(params["base"], params["lora"], config.lora.alpha)
    return Operator(
        operators.spec(config.operator),
        build.module(config),
        jax.tree_util.tree_map(jnp.asarray, params),
        build.diffusion(config, config.sample.respacing),
        config.sample.method,
        bool(config.data.normalize),
    )


def load_operator(run_dir: str | Path) -> Operator:
    """The operator trained in `run_dir` (a `clipgen train --config configs/operator.py`
    run), from its newest checkpoint."""
    trained = build.restore(run_dir, stage="operator")
    if trained.config.get("stage") != "operator":
        raise ValueError(f"{run_dir} holds a {trained.config.get('stage')!r} run, not an operator")
    return from_trained(trained.config, trained.params)


def run_tree(operators_by_name: dict[str, Operator], tree: Any, seed: int = 0) -> jax.Array:
    """Evaluate an operator tree in memory: a leaf is CLIP image embeddings (B, D); a node
    is (operator name, *subtrees). E.g. ("recolour", ("union", a, b), swatch)."""
    if not isinstance(tree, tuple):
        return jnp.asarray(tree, jnp.float32)
    name, *children = tree
    inputs = [run_tree(operators_by_name, child, seed + 1 + i) for i, child in enumerate(children)]
    return operators_by_name[name](inputs, seed)


def render(pipe: UnCLIP, embeds: Any, seed: int = 0) -> np.ndarray:
    """uint8 images of CLIP image embeddings (B, D) through the cascade's decoder (the text
    dropped, the decoder's own sampling settings) and upsamplers."""
    cond = pipe.decoder_condition(normalize(embeds))
    images = pipe.sample_decoder(cond, stage_key(seed, "decoder"), pipe.sampling["decoder"])
    return pipe.finish((images, *pipe.upsample(images, seed, pipe.sampling))[-1])


def save_embeddings(path: str | Path, embeds: Any, **metadata: Any) -> Path:
    """CLIP-space image embeddings (B, D) as an .npz (atomically) with their provenance."""
    record = dict(metadata, normalized=False, clipgen_version=clipgen.__version__)

    def write(file):
        buffer = io.BytesIO()
        np.savez(
            buffer,
            embeds=np.asarray(embeds, np.float32),
            metadata=np.array(json.dumps(record, sort_keys=True)),
        )
        file.write(buffer.getvalue())

    return atomic_write(path, write)


def load_embeddings(path: str | Path, operator: Operator | None = None) -> np.ndarray:
    """CLIP-space image embeddings (B, D) from an embedding file; a file of normalised
    latents is mapped back with `operator`'s statistics (refused without one)."""
    with np.load(path, allow_pickle=False) as data:
        embeds = np.asarray(data["embeds"], np.float32)
        record = json.loads(str(data["metadata"]))
    if record.get("normalized"):
        if operator is None:
            raise ValueError(f"{path} holds normalised latents: give the operator they are for")
        params = operator.params
        embeds = np.asarray(operators.unnormalize(embeds, params["clip_mean"], params["clip_std"]))
    return embeds
