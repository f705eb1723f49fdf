"""What the unCLIP cascade (clipgen.pipelines.unclip) and its manipulations share: the
text conditioning and stage outputs it returns, the normalisation of CLIP embeddings, the
per-stage keys folded from a seed, and the progress bar over stages."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from clipgen import stages
from clipgen.sampling import to_uint8

# Salts of the pipeline's own draws, beside each stage's (clipgen.stages).
_SALT = {"render": 5, "noise": 6}


@dataclasses.dataclass(frozen=True)
class TextCondition:
    """Captions as the prior and decoder read them (arrays lead with the batch)."""

    input_ids: np.ndarray  # (B, L) int32 token ids
    mask: np.ndarray  # (B, L) int32, 1 = a real token
    embed: jax.Array  # (B, D) CLIP text embeddings, normalised as Sampling.embed_norm says
    tokens: jax.Array  # (B, L, width) CLIP text_hidden encodings


@dataclasses.dataclass(frozen=True)
class Stages:
    """Everything `UnCLIP.stages` computed: the text conditioning, the prior's image
    embeddings and the image at each resolution of the cascade (float32 in [-1, 1]; none
    for a prior-only cascade)."""

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


# -- helpers ------------------------------------------------------------------------------------


def normalize(x: jax.Array, norm: str = "l2") -> jax.Array:
    """Rows scaled to unit L2 norm (`norm` "l2") or as they are ("raw"), float32."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True) if norm == "l2" else x


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


def explicit_inputs(mesh: Mesh, x_T: Any, noise: Any, batch: int) -> tuple[Any, Any, Any]:
    """A stage's caller-given starting latents and per-step noise (`UnCLIP.stages`), placed
    on `mesh` for its program: (x_T or None, noise rows or None, a noise function or None),
    each sharded on its batch axis where `batch` divides over the devices."""
    split = batch % mesh.devices.size == 0
    noise_fn = noise if callable(noise) else None
    rows = None if noise is None or noise_fn else jnp.asarray(noise, jnp.float32)
    if x_T is not None:
        sharding = NamedSharding(mesh, PartitionSpec("data") if split else PartitionSpec())
        x_T = jax.device_put(jnp.asarray(x_T, jnp.float32), sharding)
    if rows is not None:
        spec = PartitionSpec(None, "data") if split and rows.ndim > 1 else PartitionSpec()
        rows = jax.device_put(rows, NamedSharding(mesh, spec))
    return x_T, rows, noise_fn
