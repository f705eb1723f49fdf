"""pOps operators (arXiv 2406.01300): semantic operators on CLIP image embeddings, made by
fine-tuning a diffusion prior so that its input image embeddings (and an instruction's
text-token states) take the place of the prior's text-token states.

The conditioning layout is pOps' own (its `pops_utils.preprocess` and pipeline): the
inputs' embeddings, normalised by the prior's statistics ((e - clip_mean) / clip_std), fill
the first token slots of an otherwise zero `encoder_hidden_states`, the attention mask is 1
on those slots (and on an instruction's unpadded tokens after them), and the pooled-text
slot (`proj_embedding`) is zero. A dropped input is set to zero, the mean in normalised
space, its mask kept; the unconditional branch of guidance is every input dropped. A
token slot wider than the embeddings (clipgen's small CLIPs) is zero-padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class OperatorSpec:
    """One operator, as a config's `operator` section describes it.

    inputs: how many image embeddings it takes; text: whether an instruction's text-token
    states follow them. drop: each input's probability of being dropped in training;
    drop_all: the probability of dropping every input (and the text) at once, which trains
    the unconditional branch; swap: shuffle the inputs' order in training (pOps' union).
    guidance: the classifier-free guidance scale of sampling; clip_loss_weight: the weight
    of 1 - cos(output, CLIP text embedding of the target's caption) (pOps' instruct).
    """

    name: str
    inputs: int
    text: bool = False
    drop: tuple[float, ...] = ()
    drop_all: float = 0.0
    swap: bool = False
    guidance: float = 1.0
    clip_loss_weight: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "drop", tuple(float(p) for p in self.drop))
        if self.drop and len(self.drop) != self.inputs:
            raise ValueError(
                f"operator {self.name}: {len(self.drop)} drop probabilities for "
                f"{self.inputs} inputs"
            )


# pOps' training drops and inference guidance (training/coach.py, configs/infer/*.yaml);
# recolour is its texturing operator on the shapes world.
OPERATORS = {
    "union": OperatorSpec("union", 2, drop_all=0.2, swap=True, guidance=8.0),
    "recolour": OperatorSpec("recolour", 2, drop=(0.25, 0.25), guidance=8.0),
    "scene": OperatorSpec("scene", 2, drop_all=0.1, guidance=1.0),
    "instruct": OperatorSpec(
        "instruct", 1, text=True, drop_all=0.2, guidance=1.0, clip_loss_weight=10.0
    ),
}


def spec(section: Mapping[str, Any]) -> OperatorSpec:
    """The OperatorSpec of a config's `operator` section (its fields by name)."""
    values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    fields = {field.name for field in dataclasses.fields(OperatorSpec)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.operator: unknown fields {unknown}; fields: {sorted(fields)}")
    return OperatorSpec(**values)


def normalize(embeds: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """CLIP image embeddings into the prior's normalised space."""
    return (embeds - mean) / std


def unnormalize(latents: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """The prior's normalised space back to CLIP image embeddings."""
    return latents * std + mean


def layout(
    inputs: jax.Array,
    *,
    num_slots: int,
    token_dim: int,
    dropped: jax.Array | None = None,
    text_states: jax.Array | None = None,
    text_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(encoder_hidden_states (B, num_slots, token_dim), attention_mask (B, num_slots) int32,
    proj_embedding (B, D)) as the prior consumes them, from normalised input embeddings
    (B, N, D), which inputs are dropped ((B, N) bool), and optional text-token states
    (B, T, token_dim) with their mask (B, T) placed after the inputs. The text is zeroed
    (its mask kept) where every input is dropped: the unconditional branch."""
    batch, count, dim = inputs.shape
    length = count + (0 if text_states is None else text_states.shape[1])
    if dim > token_dim or length > num_slots:
        raise ValueError(
            f"{count} inputs of {dim}-d embeddings (and {length - count} text tokens) do not "
            f"fit the prior's {num_slots} token slots of width {token_dim}"
        )
    if dropped is not None:
        inputs = jnp.where(jnp.asarray(dropped)[..., None], 0.0, inputs)
    padded = jnp.pad(inputs, ((0, 0), (0, 0), (0, token_dim - dim)))
    parts, masks = [padded], [jnp.ones((batch, count), jnp.int32)]
    if text_states is not None:
        states = jnp.asarray(text_states, padded.dtype)
        if dropped is not None:
            states = jnp.where(jnp.all(jnp.asarray(dropped), axis=1)[:, None, None], 0.0, states)
        parts.append(states)
        masks.append(jnp.asarray(text_mask, jnp.int32))
    hidden = jnp.concatenate(parts, axis=1)
    mask = jnp.concatenate(masks, axis=1)
    hidden = jnp.pad(hidden, ((0, 0), (0, num_slots - length), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, num_slots - length)))
    return hidden, mask, jnp.zeros((batch, dim), padded.dtype)


def condition(
    inputs: jax.Array,
    module: Any,
    *,
    dropped: jax.Array | None = None,
    text_states: jax.Array | None = None,
    text_mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """`layout` for a clipgen PriorTransformer, as the condition dict its samplers and
    losses take (text_embed, text_tokens, text_mask)."""
    config = module.config
    hidden, mask, proj = layout(
        inputs,
        num_slots=config.num_embeddings,
        token_dim=config.encoder_hidden_dim,
        dropped=dropped,
        text_states=text_states,
        text_mask=text_mask,
    )
    return {"text_embed": proj, "text_tokens": hidden, "text_mask": mask}
