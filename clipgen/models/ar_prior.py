"""unCLIP's autoregressive prior: CLIP image embeddings as sequences of discrete codes.

The image embedding is reduced by PCA (the paper keeps 319 of 1024 dimensions) and each
coordinate quantised into `num_buckets` uniform buckets over its training range (1024 in
the paper). A causal transformer reads [caption token encodings, CLIP text embedding, a
token for the quantised text-image dot product, codes so far] and predicts the next code;
sampling conditions on a high dot-product bucket and decodes through the PCA. The PCA,
bucket ranges and dot-product bucket edges are data statistics kept as (frozen) parameters
so a checkpoint carries them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clipgen.models.clip import ResidualBlock
from clipgen.models.layers import apply_layers, make_layers

# The data statistics kept as parameters (the optimizer must leave them alone).
STATISTICS = ("pca_mean", "pca_components", "code_low", "code_high", "dot_edges")


@dataclasses.dataclass(frozen=True)
class ARPriorConfig:
    """Shapes of the AR prior; `num_codes` PCA dimensions of `embedding_dim`."""

    width: int
    heads: int
    layers: int
    embedding_dim: int
    num_codes: int
    num_buckets: int
    num_dot_buckets: int
    num_text_tokens: int
    text_token_dim: int
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.num_codes > self.embedding_dim:
            raise ValueError(
                f"ARPriorConfig: num_codes {self.num_codes} > embedding_dim {self.embedding_dim}"
            )

    @property
    def prefix_length(self) -> int:
        """Text tokens, the text embedding and the dot-product token."""
        return self.num_text_tokens + 2


# --- PCA and quantisation (numpy, fitted once on the training embeddings) ----------------------


def fit_statistics(
    image_embeds: np.ndarray, text_embeds: np.ndarray, config: ARPriorConfig
) -> dict[str, np.ndarray]:
    """The AR prior's data statistics: PCA mean and components (num_codes, D), each code's
    range (low, high), and the dot-product bucket edges (equal-count quantiles)."""
    x = np.asarray(image_embeds, np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[: config.num_codes]
    codes = (x - mean) @ components.T
    dots = np.sum(x * np.asarray(text_embeds, np.float64), -1)
    quantiles = np.linspace(0, 1, config.num_dot_buckets + 1)[1:-1]
    return {
        "pca_mean": mean.astype(np.float32),
        "pca_components": components.astype(np.float32),
        "code_low": codes.min(0).astype(np.float32),
        "code_high": codes.max(0).astype(np.float32),
        "dot_edges": np.quantile(dots, quantiles).astype(np.float32),
    }


def quantize(image_embeds: jax.Array, stats: dict[str, jax.Array], num_buckets: int) -> jax.Array:
    """Image embeddings (B, D) -> bucket indices (B, num_codes)."""
    codes = (image_embeds - stats["pca_mean"]) @ stats["pca_components"].T
    span = stats["code_high"] - stats["code_low"]
    position = (codes - stats["code_low"]) / jnp.where(span > 0, span, 1.0)
    return jnp.clip(jnp.floor(position * num_buckets), 0, num_buckets - 1).astype(jnp.int32)


def dequantize(buckets: jax.Array, stats: dict[str, jax.Array], num_buckets: int) -> jax.Array:
    """Bucket indices (B, num_codes) -> image embeddings (B, D) at the buckets' centres."""
    span = stats["code_high"] - stats["code_low"]
    codes = stats["code_low"] + (buckets.astype(jnp.float32) + 0.5) * span / num_buckets
    return codes @ stats["pca_components"] + stats["pca_mean"]


def dot_bucket(image_embeds: jax.Array, text_embeds: jax.Array, edges: jax.Array) -> jax.Array:
    """The quantised dot product z_i . z_t, (B,) int."""
    return jnp.searchsorted(edges, jnp.sum(image_embeds * text_embeds, -1)).astype(jnp.int32)


# --- the network --------------------------------------------------------------------------------


def _dense(features: int, names: tuple, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
        name=name,
    )


class ARPrior(nn.Module):
    """Next-code logits over [text tokens, text embedding, dot token, codes]."""

    config: ARPriorConfig
    dtype: Any = jnp.float32
    scan_layers: bool = False  # the blocks as one nn.scan (clipgen.models.layers)
    remat: bool = False

    def setup(self):
        cfg = self.config
        stat_shapes = {
            "pca_mean": (cfg.embedding_dim,),
            "pca_components": (cfg.num_codes, cfg.embedding_dim),
            "code_low": (cfg.num_codes,),
            "code_high": (cfg.num_codes,),
            "dot_edges": (cfg.num_dot_buckets - 1,),
        }
        self.stats = {
            name: self.param(name, nn.initializers.zeros, shape, jnp.float32)
            for name, shape in stat_shapes.items()
        }
        embed = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        self.token_proj = _dense(cfg.width, (None, "embed"), "token_proj", self.dtype)
        self.text_embed_proj = _dense(cfg.width, (None, "embed"), "text_embed_proj", self.dtype)
        self.dot_embed = nn.Embed(
            cfg.num_dot_buckets, cfg.width, embedding_init=embed, name="dot_embed"
        )
        self.code_embed = nn.Embed(
            cfg.num_buckets, cfg.width, embedding_init=embed, name="code_embed"
        )
        length = cfg.prefix_length + cfg.num_codes - 1
        self.position_embed = self.param(
            "position_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
            (length, cfg.width),
            jnp.float32,
        )
        kwargs = dict(
            width=cfg.width,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_ratio * cfg.width,
            act="gelu",
            layer_norm_eps=cfg.layer_norm_eps,
            dtype=self.dtype,
        )
        self.blocks = make_layers(
            ResidualBlock, cfg.layers, kwargs, scan=self.scan_layers, remat=self.remat
        )
        self.final_norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="final_norm")
        self.head = _dense(cfg.num_buckets, ("embed", "vocab"), "head", self.dtype)

    def __call__(self, text_embed, text_tokens, text_mask, dot_token, buckets) -> jax.Array:
        """Logits (B, num_codes, num_buckets) for each code given those before it.

        text_embed (B, D), text_tokens (B, L, C), text_mask (B, L) (1 = real token),
        dot_token (B,), buckets (B, num_codes) (teacher forcing: only the first
        num_codes - 1 are read).
        """
        cfg = self.config
        prefix = [
            self.token_proj(text_tokens.astype(self.dtype)),
            self.text_embed_proj(text_embed.astype(self.dtype))[:, None],
            self.dot_embed(dot_token)[:, None].astype(self.dtype),
            self.code_embed(buckets[:, : cfg.num_codes - 1]).astype(self.dtype),
        ]
        x = jnp.concatenate(prefix, 1) + self.position_embed.astype(self.dtype)
        length = x.shape[1]
        keys = jnp.concatenate(
            [text_mask > 0, jnp.ones((x.shape[0], length - cfg.num_text_tokens), bool)], 1
        )
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None] & keys[:, None, None, :]
        x = apply_layers(self.blocks, x, mask)
        x = self.final_norm(x[:, cfg.prefix_length - 1 :])
        return self.head(x).astype(jnp.float32)

    def statistics(self) -> dict[str, jax.Array]:
        return dict(self.stats)


def init_ar_prior(module: ARPrior, rng: jax.Array, batch_size: int = 1) -> dict[str, Any]:
    """`module.init` on dummy inputs; boxed variables, like `init_clip`."""
    cfg = module.config
    return module.init(
        rng,
        jnp.zeros((batch_size, cfg.embedding_dim)),
        jnp.zeros((batch_size, cfg.num_text_tokens, cfg.text_token_dim)),
        jnp.ones((batch_size, cfg.num_text_tokens), jnp.int32),
        jnp.zeros((batch_size,), jnp.int32),
        jnp.zeros((batch_size, cfg.num_codes), jnp.int32),
    )


def top_p_sample(rng: jax.Array, logits: jax.Array, top_p: float) -> jax.Array:
    """A draw from the smallest set of most likely buckets whose mass reaches `top_p`
    (nucleus sampling); logits (B, K) -> (B,) int."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    mass_before = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1) - jax.nn.softmax(
        sorted_logits, -1
    )
    kept = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(rng, kept, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], -1)[:, 0]


def sample_ar_prior(
    module: ARPrior,
    params: Any,
    cond: dict[str, jax.Array],
    rng: jax.Array,
    *,
    top_p: float = 0.9,
    dot_range: tuple[float, float] = (0.5, 1.0),
) -> jax.Array:
    """Image embeddings (B, D) for text conditions (text_embed, text_tokens, text_mask).

    The dot-product token is drawn uniformly from the `dot_range` fraction of its buckets
    (the paper samples from the top half); codes are drawn one at a time with nucleus
    sampling. Each step reruns the whole (short) sequence: no key/value cache.
    """
    cfg = module.config
    batch = cond["text_embed"].shape[0]
    dot_rng, code_rng = jax.random.split(rng)
    low = int(dot_range[0] * cfg.num_dot_buckets)
    high = max(int(dot_range[1] * cfg.num_dot_buckets), low + 1)
    dot_token = jax.random.randint(dot_rng, (batch,), low, high)

    def step(index, buckets):
        logits = module.apply(
            {"params": params},
            cond["text_embed"],
            cond["text_tokens"],
            cond["text_mask"],
            dot_token,
            buckets,
        )
        logits_now = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
        chosen = top_p_sample(jax.random.fold_in(code_rng, index), logits_now, top_p)
        return buckets.at[:, index].set(chosen)

    buckets = jax.lax.fori_loop(
        0, cfg.num_codes, step, jnp.zeros((batch, cfg.num_codes), jnp.int32)
    )
    stats = module.apply({"params": params}, method=ARPrior.statistics)
    return dequantize(buckets, stats, cfg.num_buckets)
