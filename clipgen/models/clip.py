"""CLIP in Flax linen: a ViT image tower and a causal text tower with linear projections
into one joint embedding space, numerically equal to transformers' `CLIPModel`.

Parameters come back from `init` boxed in `nn.LogicallyPartitioned` (the kernels carry
logical axis names for `clipgen.parallel`); `flax.linen.meta.unbox` gives plain arrays, the
form `clipgen.weights.load_clip` returns. `init_clip` initialises any tower combination.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipgen.models.layers import apply_layers, dot_product_attention, make_layers

# HF's `config.eos_token_id == 2` marks configs written before transformers PR #24773;
# for those the text tower pools at argmax(input_ids), as OpenAI's CLIP does.
LEGACY_EOS_TOKEN_ID = 2

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


def _check_activation(act: str) -> None:
    if act not in _ACTIVATIONS:
        raise ValueError(f"unknown CLIP activation {act!r}; expected one of {sorted(_ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Shape of the ViT image tower (HF `CLIPVisionConfig` fields under clipgen names)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    channels: int = 3
    # The std of the position embeddings at init; the shapes world's CLIP learns positions
    # several times faster from 1.0 than from CLIP's 0.02 (configs/clip.py).
    position_init: float = 0.02
    # Output channels of 3x3 stride-2 convolutions in place of the patchify's first
    # log2(patch_size) halvings (Xiao et al. 2021, "Early convolutions help transformers see
    # better"), a 1x1 projection to `width` after them; () is CLIP's linear patchify.
    stem_channels: tuple[int, ...] = ()

    def __post_init__(self):
        _check_activation(self.act)
        object.__setattr__(self, "stem_channels", tuple(self.stem_channels))
        if self.stem_channels and 2 ** len(self.stem_channels) != self.patch_size:
            raise ValueError(
                f"VisionConfig: a convolutional stem of {len(self.stem_channels)} stride-2 "
                f"convolutions makes {2 ** len(self.stem_channels)} px patches, not "
                f"patch_size {self.patch_size}: give log2(patch_size) stem_channels"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(
                f"VisionConfig: width {self.width} not divisible by {self.heads} heads"
            )

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Shape of the causal text tower (HF `CLIPTextConfig` fields under clipgen names)."""

    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        _check_activation(self.act)
        if self.width % self.heads:
            raise ValueError(f"TextConfig: width {self.width} not divisible by {self.heads} heads")


def _dense(
    features: int, names: tuple[str | None, str | None], dtype: Any, use_bias: bool, name: str
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        name=name,
    )


def _layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections, as HF `CLIPAttention`."""

    width: int
    heads: int
    dtype: Any = jnp.float32

    def setup(self):
        self.query = _dense(self.width, ("embed", "heads"), self.dtype, True, "query")
        self.key = _dense(self.width, ("embed", "heads"), self.dtype, True, "key")
        self.value = _dense(self.width, ("embed", "heads"), self.dtype, True, "value")
        self.out = _dense(self.width, ("heads", "embed"), self.dtype, True, "out")

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: (B, L, width); mask: boolean, broadcastable to (B, heads, L, L), True = attend."""
        batch, length, _ = x.shape
        head_dim = self.width // self.heads

        def split(t: jax.Array) -> jax.Array:
            return t.reshape(batch, length, self.heads, head_dim)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        return self.out(dot_product_attention(q, k, v, mask=mask, dtype=self.dtype))


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    width: int
    mlp_dim: int
    act: str
    dtype: Any = jnp.float32

    def setup(self):
        self.fc1 = _dense(self.mlp_dim, ("embed", "mlp"), self.dtype, True, "fc1")
        self.fc2 = _dense(self.width, ("mlp", "embed"), self.dtype, True, "fc2")

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., width) -> (..., width)."""
        return self.fc2(_ACTIVATIONS[self.act](self.fc1(x)))


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    width: int
    heads: int
    mlp_dim: int
    act: str
    layer_norm_eps: float
    dtype: Any = jnp.float32

    def setup(self):
        self.attn_norm = _layer_norm(self.layer_norm_eps, self.dtype, "attn_norm")
        self.attn = SelfAttention(self.width, self.heads, self.dtype, name="attn")
        self.mlp_norm = _layer_norm(self.layer_norm_eps, self.dtype, "mlp_norm")
        self.mlp = MLP(self.width, self.mlp_dim, self.act, self.dtype, name="mlp")

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(B, L, width) -> (B, L, width)."""
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.mlp(self.mlp_norm(x))


def _blocks(config: VisionConfig | TextConfig, dtype: Any, scan: bool, remat: bool):
    """A tower's blocks (clipgen.models.layers.make_layers)."""
    kwargs = dict(
        width=config.width,
        heads=config.heads,
        mlp_dim=config.mlp_dim,
        act=config.act,
        layer_norm_eps=config.layer_norm_eps,
        dtype=dtype,
    )
    return make_layers(ResidualBlock, config.layers, kwargs, scan=scan, remat=remat)


class VisionTower(nn.Module):
    """ViT: patches + class token + positions, pre-LN, blocks, post-LN of the class token."""

    config: VisionConfig
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.stem = [
            nn.Conv(
                channels,
                (3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"stem_{index}",
            )
            for index, channels in enumerate(cfg.stem_channels)
        ]
        patch = 1 if cfg.stem_channels else cfg.patch_size
        self.patch_embed = nn.Conv(
            cfg.width,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "conv_out")
            ),
        )
        embed_init = nn.initializers.normal(cfg.width**-0.5)
        self.class_embed = self.param(
            "class_embed", nn.with_logical_partitioning(embed_init, ("embed",)), (cfg.width,)
        )
        self.position_embed = self.param(
            "position_embed",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.position_init), (None, "embed")
            ),
            (cfg.num_positions, cfg.width),
        )
        self.pre_norm = _layer_norm(cfg.layer_norm_eps, self.dtype, "pre_norm")
        self.blocks = _blocks(cfg, self.dtype, self.scan_layers, self.remat)
        self.post_norm = _layer_norm(cfg.layer_norm_eps, self.dtype, "post_norm")

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, H, W, C), CLIP-normalised -> pooled class-token features (B, width)."""
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"CLIP expects NHWC images of shape (B, {expected}), got {pixels.shape}"
            )
        x = pixels.astype(self.dtype)
        for conv in self.stem:
            x = _ACTIVATIONS[cfg.act](conv(x))
        patches = self.patch_embed(x)
        patches = patches.reshape(patches.shape[0], -1, cfg.width)
        class_token = jnp.broadcast_to(
            self.class_embed.astype(self.dtype), (patches.shape[0], 1, cfg.width)
        )
        x = jnp.concatenate([class_token, patches], axis=1) + self.position_embed.astype(self.dtype)
        x = self.pre_norm(x)
        x = apply_layers(self.blocks, x)
        return self.post_norm(x[:, 0])


class TextTower(nn.Module):
    """Causal transformer over token + position embeddings, with a final LayerNorm."""

    config: TextConfig
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.token_embed = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
        )
        self.position_embed = self.param(
            "position_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
            (cfg.context_length, cfg.width),
        )
        self.blocks = _blocks(cfg, self.dtype, self.scan_layers, self.remat)
        self.final_norm = _layer_norm(cfg.layer_norm_eps, self.dtype, "final_norm")

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (B, L) int, attention_mask (B, L) with 1 = keep -> hidden (B, L, width)."""
        length = input_ids.shape[-1]
        if length > self.config.context_length:
            raise ValueError(
                f"text length {length} exceeds the context length {self.config.context_length}"
            )
        x = self.token_embed(input_ids) + self.position_embed[:length].astype(self.dtype)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        x = apply_layers(self.blocks, x, mask)
        return self.final_norm(x)

    def pool(self, hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
        """Features at the end-of-text token (B, width), by HF's rule for this eos id."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            positions = jnp.argmax(input_ids, axis=-1)
        else:
            positions = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return jnp.take_along_axis(hidden, positions[:, None, None], axis=1)[:, 0]


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIP(nn.Module):
    """CLIP with either tower optional; projected embeddings and contrastive logits."""

    vision: VisionConfig | None
    text: TextConfig | None
    projection_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: Any = jnp.float32
    scan_layers: bool = False  # each tower's blocks as one nn.scan (clipgen.models.layers)
    remat: bool = False

    def setup(self):
        if self.vision is None and self.text is None:
            raise ValueError("CLIP needs at least one of the vision and text configs")
        if self.vision is not None:
            self.vision_tower = VisionTower(self.vision, self.dtype, self.scan_layers, self.remat)
            self.visual_projection = _dense(
                self.projection_dim, ("embed", None), self.dtype, False, "visual_projection"
            )
        if self.text is not None:
            self.text_tower = TextTower(self.text, self.dtype, self.scan_layers, self.remat)
            self.text_projection = _dense(
                self.projection_dim, ("embed", None), self.dtype, False, "text_projection"
            )
        if self.vision is not None and self.text is not None:
            self.logit_scale = self.param(
                "logit_scale", nn.initializers.constant(self.logit_scale_init), (), jnp.float32
            )

    def _require(self, tower: str) -> None:
        if getattr(self, tower) is None:
            raise ValueError(f"this CLIP has no {tower} tower (its `{tower}` config is None)")

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """NHWC CLIP-normalised pixels -> projected, unnormalised embeddings (B, projection_dim)."""
        self._require("vision")
        return self.visual_projection(self.vision_tower(pixels))

    def text_hidden(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Final-LayerNorm token encodings (B, L, width), HF's `last_hidden_state`."""
        self._require("text")
        return self.text_tower(input_ids, attention_mask)

    def encode_text(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Token ids (B, L) -> projected, unnormalised embeddings (B, projection_dim)."""
        hidden = self.text_hidden(input_ids, attention_mask)
        return self.text_projection(self.text_tower.pool(hidden, input_ids))

    def __call__(
        self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """L2-normalised image_embeds and text_embeds, and the scaled cosine logits both ways."""
        self._require("vision")
        self._require("text")
        image_embeds = _normalize(self.encode_image(pixels))
        text_embeds = _normalize(self.encode_text(input_ids, attention_mask))
        logits_per_text = jnp.exp(self.logit_scale) * text_embeds @ image_embeds.T
        return {
            "image_embeds": image_embeds,
            "text_embeds": text_embeds,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
        }


def init_clip(module: CLIP, rng: jax.Array, batch_size: int = 1) -> dict[str, Any]:
    """`module.init` on dummy inputs through whichever towers exist; returns the boxed
    variables (apply `flax.linen.meta.unbox` for plain arrays)."""
    pixels = ids = None
    if module.vision is not None:
        cfg = module.vision
        pixels = jnp.zeros((batch_size, cfg.image_size, cfg.image_size, cfg.channels))
    if module.text is not None:
        ids = jnp.zeros((batch_size, module.text.context_length), jnp.int32)
    if pixels is not None and ids is not None:
        return module.init(rng, pixels, ids)
    if pixels is not None:
        return module.init(rng, pixels, method=CLIP.encode_image)
    if ids is not None:
        return module.init(rng, ids, method=CLIP.encode_text)
    raise ValueError("CLIP needs at least one of the vision and text configs")
