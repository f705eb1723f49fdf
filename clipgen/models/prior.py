"""The unCLIP diffusion prior in Flax linen: a transformer that predicts a CLIP image embedding
from its noised version, the timestep, the CLIP text embedding and the CLIP text tokens,
numerically equal to diffusers' `PriorTransformer` (the Karlo and Kandinsky 2.x priors).

The token sequence is [text tokens (num_embeddings), text embedding, timestep, noisy image
embedding, query], the query present when `added_emb_type == "prd"`; the prediction is read at
the query, or at the noisy-embedding token when there is no query. Parameters come back from `init`
boxed in `nn.LogicallyPartitioned`; `clipgen.weights.load_prior` returns them unboxed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipgen.models.layers import (
    apply_layers,
    dot_product_attention,
    make_layers,
    timestep_embedding,
)

# diffusers' additive attention bias for masked keys. Finite, so biases add up (a key both
# padded and in the future gets twice it) and a row with every key masked still attends.
MASK_BIAS = -10000.0

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Shape and options of the prior: diffusers' `PriorTransformer` config, field for field
    (same names, same defaults), plus `encoder_hidden_dim`.

    num_attention_heads x attention_head_dim is the width; the MLP is 4 x width.
    embedding_dim: the noisy image embedding's width (CLIP's projection dim).
    num_embeddings: text tokens (77 for Karlo and Kandinsky); the positional embedding has
      num_embeddings + additional_embeddings rows.
    additional_embeddings: the tokens after the text (text embedding, time, noisy embedding,
      and the query when added_emb_type is "prd").
    dropout: after attention's output projection and inside the MLP.
    time_embed_act_fn: the time MLP's activation ("silu"/"swish", "gelu", "mish", "relu").
    norm_in_type: None, or "layer" for a LayerNorm over the sequence before the blocks.
    embedding_proj_norm_type: None, or "layer" for a LayerNorm on the text embedding.
    encoder_hid_proj_type: "linear" (text tokens projected to the width) or None (no tokens).
    added_emb_type: "prd" (a learned query token last, read out) or None (the noisy
      embedding's token is read out).
    time_embed_dim: the time MLP's hidden width (None -> width).
    embedding_proj_dim: the text embedding's width (None -> embedding_dim).
    clip_embed_dim: the predicted embedding's width, and clip_mean/clip_std's (None ->
      embedding_dim).
    encoder_hidden_dim: the text tokens' width (None -> embedding_dim); a clipgen extension,
      diffusers fixes it to embedding_dim, so any diffusers checkpoint leaves it None.
    None dimensions are resolved on construction.

    The defaults are Karlo's prior (kakaobrain/karlo-v1-alpha: 32 x 64 heads, 20 layers,
    embedding_dim 768 from ViT-L/14, 77 + 4 tokens, "prd" query, linear token projection, no
    norm_in or embedding-projection norm, silu). Kandinsky 2.1 uses the same config;
    Kandinsky 2.2's prior (kandinsky-community/kandinsky-2-2-prior) differs only in
    embedding_dim 1280 (ViT-bigG/14). Both carry clip_mean/clip_std statistics. The layer
    norms, no query and no text tokens are Shap-E's options.
    """

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None
    encoder_hidden_dim: int | None = None

    def __post_init__(self):
        if self.time_embed_act_fn not in _ACTIVATIONS:
            raise ValueError(
                f"PriorConfig: unknown time_embed_act_fn {self.time_embed_act_fn!r}; "
                f"expected one of {sorted(_ACTIVATIONS)}"
            )
        for name, allowed in (
            ("norm_in_type", (None, "layer")),
            ("embedding_proj_norm_type", (None, "layer")),
            ("encoder_hid_proj_type", (None, "linear")),
            ("added_emb_type", (None, "prd")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"PriorConfig: {name} is {getattr(self, name)!r}; expected one of {allowed}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PriorConfig: dropout {self.dropout} is not in [0, 1)")
        defaults = {
            "time_embed_dim": self.width,
            "embedding_proj_dim": self.embedding_dim,
            "clip_embed_dim": self.embedding_dim,
            "encoder_hidden_dim": self.embedding_dim,
        }
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)

    @property
    def width(self) -> int:
        """The transformer's hidden width."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def positions(self) -> int:
        """Rows of the learned positional embedding."""
        return self.num_embeddings + self.additional_embeddings


def prior_config_from_diffusers(config: dict[str, Any]) -> PriorConfig:
    """A PriorConfig from a diffusers `PriorTransformer` config.json dict; missing fields take
    diffusers' defaults."""
    fields = {f.name for f in dataclasses.fields(PriorConfig)} - {"encoder_hidden_dim"}
    values = {name: config[name] for name in fields if name in config}
    if isinstance(values.get("time_embed_act_fn"), str):
        values["time_embed_act_fn"] = values["time_embed_act_fn"].lower()
    return PriorConfig(**values)


def _dense(features: int, names: tuple[str | None, str | None], dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        name=name,
    )


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class PriorAttention(nn.Module):
    """Multi-head self-attention with an additive bias on the scores, then output dropout."""

    width: int
    heads: int
    dropout: float
    dtype: Any = jnp.float32

    def setup(self):
        self.query = _dense(self.width, ("embed", "heads"), self.dtype, "query")
        self.key = _dense(self.width, ("embed", "heads"), self.dtype, "key")
        self.value = _dense(self.width, ("embed", "heads"), self.dtype, "value")
        self.out = _dense(self.width, ("heads", "embed"), self.dtype, "out")
        self.out_dropout = nn.Dropout(self.dropout)

    def __call__(
        self, x: jax.Array, bias: jax.Array | None, deterministic: bool = True
    ) -> jax.Array:
        """x (B, S, width); bias float32, broadcastable to (B, heads, S, S), added to scores."""
        batch, length, _ = x.shape
        head_dim = self.width // self.heads

        def split(t: jax.Array) -> jax.Array:
            return t.reshape(batch, length, self.heads, head_dim)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        attended = dot_product_attention(q, k, v, bias=bias, dtype=self.dtype)
        return self.out_dropout(self.out(attended), deterministic=deterministic)


class PriorMLP(nn.Module):
    """fc1 -> exact gelu -> dropout -> fc2, 4x wide (diffusers' FeedForward)."""

    width: int
    dropout: float
    dtype: Any = jnp.float32

    def setup(self):
        self.fc1 = _dense(4 * self.width, ("embed", "mlp"), self.dtype, "fc1")
        self.fc2 = _dense(self.width, ("mlp", "embed"), self.dtype, "fc2")
        self.hidden_dropout = nn.Dropout(self.dropout)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """(..., width) -> (..., width)."""
        hidden = jax.nn.gelu(self.fc1(x), approximate=False)
        return self.fc2(self.hidden_dropout(hidden, deterministic=deterministic))


class PriorBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + mlp(LN(x)) (BasicTransformerBlock)."""

    width: int
    heads: int
    dropout: float
    dtype: Any = jnp.float32

    def setup(self):
        self.attn_norm = _layer_norm(self.dtype, "attn_norm")
        self.attn = PriorAttention(self.width, self.heads, self.dropout, self.dtype, name="attn")
        self.mlp_norm = _layer_norm(self.dtype, "mlp_norm")
        self.mlp = PriorMLP(self.width, self.dropout, self.dtype, name="mlp")

    def __call__(
        self, x: jax.Array, bias: jax.Array | None, deterministic: bool = True
    ) -> jax.Array:
        """(B, S, width) -> (B, S, width)."""
        x = x + self.attn(self.attn_norm(x), bias, deterministic)
        return x + self.mlp(self.mlp_norm(x), deterministic)


class PriorTransformer(nn.Module):
    """The diffusion prior: predicts the (normalised) CLIP image embedding.

    `__call__(noisy_image_embed, timestep, text_embed, text_tokens, text_mask)` takes diffusers'
    `PriorTransformer.forward(hidden_states, timestep, proj_embedding, encoder_hidden_states,
    attention_mask)` inputs in that order and returns its `predicted_image_embedding`.
    Parameters are float32; `dtype` is the compute precision. `scan_layers` runs the blocks
    as one `nn.scan` (params stacked under "blocks"; `layers.stack_layers` converts), `remat`
    recomputes each block's activations in the backward pass.
    """

    config: PriorConfig
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    def setup(self):
        cfg = self.config
        width = cfg.width
        self.time_embed_in = _dense(
            cfg.time_embed_dim, ("embed", "mlp"), self.dtype, "time_embed_in"
        )
        self.time_embed_out = _dense(width, ("mlp", "embed"), self.dtype, "time_embed_out")
        self.noisy_embed_proj = _dense(width, (None, "embed"), self.dtype, "noisy_embed_proj")
        if cfg.embedding_proj_norm_type == "layer":
            self.text_embed_norm = _layer_norm(self.dtype, "text_embed_norm")
        self.text_embed_proj = _dense(width, (None, "embed"), self.dtype, "text_embed_proj")
        if cfg.encoder_hid_proj_type == "linear":
            self.text_tokens_proj = _dense(width, (None, "embed"), self.dtype, "text_tokens_proj")
        self.position_embed = self.param(
            "position_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, cfg.positions, width),
        )
        if cfg.added_emb_type == "prd":
            self.query_embed = self.param(
                "query_embed",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
                (1, 1, width),
            )
        if cfg.norm_in_type == "layer":
            self.input_norm = _layer_norm(self.dtype, "input_norm")
        self.blocks = make_layers(
            PriorBlock,
            cfg.num_layers,
            dict(width=width, heads=cfg.num_attention_heads, dropout=cfg.dropout, dtype=self.dtype),
            scan=self.scan_layers,
            remat=self.remat,
            static_argnums=(3,),
        )
        self.output_norm = _layer_norm(self.dtype, "output_norm")
        self.output_proj = _dense(cfg.clip_embed_dim, ("embed", None), self.dtype, "output_proj")
        self.clip_mean = self.param(
            "clip_mean", nn.initializers.zeros, (1, cfg.clip_embed_dim), jnp.float32
        )
        self.clip_std = self.param(
            "clip_std", nn.initializers.ones, (1, cfg.clip_embed_dim), jnp.float32
        )

    def __call__(
        self,
        noisy_image_embed: jax.Array,
        timestep: jax.Array | int | float,
        text_embed: jax.Array,
        text_tokens: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Predicted image embedding (B, clip_embed_dim), float32.

        noisy_image_embed (B, embedding_dim) is diffusers' `hidden_states`; timestep a scalar
        or (B,), int or float; text_embed (B, embedding_proj_dim) is `proj_embedding`;
        text_tokens (B, num_embeddings, encoder_hidden_dim) is `encoder_hidden_states`
        (required exactly when `encoder_hid_proj_type` is "linear"); text_mask
        (B, num_embeddings), nonzero = a real token, is `attention_mask`. Attention is causal
        when a text_mask is given or the config has the "prd" query; with neither, it is
        bidirectional, as in diffusers without an attention_mask.
        Dropout is active when deterministic is False (rng collection "dropout").
        """
        cfg = self.config
        if noisy_image_embed.ndim != 2 or noisy_image_embed.shape[1] != cfg.embedding_dim:
            raise ValueError(
                f"noisy_image_embed must be (batch, {cfg.embedding_dim}), "
                f"got {noisy_image_embed.shape}"
            )
        batch = noisy_image_embed.shape[0]

        timestep = jnp.asarray(timestep)
        if timestep.ndim == 0:
            timestep = jnp.broadcast_to(timestep, (batch,))
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or ({batch},), got {timestep.shape}")
        time_features = timestep_embedding(timestep, cfg.width).astype(self.dtype)
        time_token = self.time_embed_out(
            _ACTIVATIONS[cfg.time_embed_act_fn](self.time_embed_in(time_features))
        )

        if cfg.embedding_proj_norm_type == "layer":
            text_embed = self.text_embed_norm(text_embed.astype(self.dtype))
        text_token = self.text_embed_proj(text_embed.astype(self.dtype))

        tokens = []
        if cfg.encoder_hid_proj_type == "linear":
            if text_tokens is None:
                raise ValueError("this prior projects text tokens: pass text_tokens")
            tokens.append(self.text_tokens_proj(text_tokens.astype(self.dtype)))
        elif text_tokens is not None:
            raise ValueError("this prior takes no text tokens (its encoder_hid_proj_type is None)")
        text_count = tokens[0].shape[1] if tokens else 0
        tokens += [
            text_token[:, None],
            time_token[:, None],
            self.noisy_embed_proj(noisy_image_embed.astype(self.dtype))[:, None],
        ]
        if cfg.added_emb_type == "prd":
            query = self.query_embed.astype(self.dtype)
            tokens.append(jnp.broadcast_to(query, (batch, 1, cfg.width)))
        x = jnp.concatenate(tokens, axis=1)
        length = x.shape[1]
        x = x + self._positions(length, text_count).astype(self.dtype)

        bias = self._attention_bias(batch, length, text_count, text_mask)
        if cfg.norm_in_type == "layer":
            x = self.input_norm(x)
        x = apply_layers(self.blocks, x, bias, deterministic)
        x = self.output_norm(x)
        # The query is last; without one, the noisy embedding's token is.
        return self.output_proj(x[:, -1]).astype(jnp.float32)

    def _positions(self, length: int, text_count: int) -> jax.Array:
        """The positional embedding for a sequence of this length, as diffusers places it: all
        of it, or, when shorter, starting at the noisy embedding's token with zeros around."""
        positions = self.position_embed
        available = positions.shape[1]
        query_count = 1 if self.config.added_emb_type == "prd" else 0
        if available < length:
            positions = jnp.pad(positions, ((0, 0), (text_count + 2, query_count), (0, 0)))
        if positions.shape[1] != length:
            cfg = self.config
            raise ValueError(
                f"the prior's sequence has {length} tokens ({text_count} text tokens + "
                f"{length - text_count} others) but its positional embedding has "
                f"{available} rows (num_embeddings {cfg.num_embeddings} + additional_embeddings "
                f"{cfg.additional_embeddings}): pass text_tokens of length {cfg.num_embeddings}"
            )
        return positions

    def _attention_bias(
        self, batch: int, length: int, text_count: int, text_mask: jax.Array | None
    ) -> jax.Array | None:
        """Additive float32 bias (B or 1, 1, S, S): MASK_BIAS above the diagonal, plus MASK_BIAS
        on masked text keys (the two add up where both apply, as in diffusers)."""
        if text_mask is None and self.config.added_emb_type != "prd":
            return None
        causal = jnp.triu(jnp.full((length, length), MASK_BIAS, jnp.float32), k=1)
        if text_mask is None:
            return causal[None, None]
        text_mask = jnp.asarray(text_mask)
        if text_count == 0 or text_mask.shape != (batch, text_count):
            raise ValueError(
                f"text_mask must be ({batch}, {text_count}), matching text_tokens, "
                f"got {text_mask.shape}"
            )
        key_bias = jnp.where(text_mask != 0, 0.0, MASK_BIAS).astype(jnp.float32)
        key_bias = jnp.pad(key_bias, ((0, 0), (0, length - text_count)))
        return (key_bias[:, None, :] + causal)[:, None]

    def post_process_latents(self, x: jax.Array) -> jax.Array:
        """A prediction in CLIP's own scale: x * clip_std + clip_mean (diffusers' method)."""
        return x * self.clip_std + self.clip_mean

    def normalize_latents(self, x: jax.Array) -> jax.Array:
        """The inverse of `post_process_latents`: a CLIP image embedding in the prior's scale."""
        return (x - self.clip_mean) / self.clip_std


def init_prior(module: PriorTransformer, rng: jax.Array, batch_size: int = 1) -> dict[str, Any]:
    """`module.init` on dummy inputs; returns the boxed variables (apply
    `flax.linen.meta.unbox` for plain arrays)."""
    cfg = module.config
    noisy = jnp.zeros((batch_size, cfg.embedding_dim))
    text_embed = jnp.zeros((batch_size, cfg.embedding_proj_dim))
    tokens = mask = None
    if cfg.encoder_hid_proj_type is not None:
        tokens = jnp.zeros((batch_size, cfg.num_embeddings, cfg.encoder_hidden_dim))
        mask = jnp.ones((batch_size, cfg.num_embeddings), bool)
    timestep = jnp.zeros((batch_size,), jnp.int32)
    return module.init(rng, noisy, timestep, text_embed, tokens, mask)
