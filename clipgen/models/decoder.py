"""unCLIP's 64 px decoder: the GLIDE UNet conditioned on a CLIP image embedding and a caption.

The CLIP image embedding and a pooled text embedding are projected and added to the
timestep embedding; the image embedding is also projected into `clip_extra_tokens` context
tokens placed before the (projected, LayerNormed) text tokens, which every attention layer
reads through its own key/value projections. This is diffusers' `UnCLIPTextProjModel`
followed by its `UNet2DConditionModel` (Karlo), so Karlo's weights load into it.

Text arrives in one of two forms (`DecoderConfig.text_transformer`):
- None (Karlo): frozen CLIP text encodings, `text` (B, L, text_width) float (CLIP's
  `last_hidden_state`) and `text_embed` (B, text_embed_dim) (CLIP's projected `text_embeds`).
- a `TextConfig` (GLIDE): `text` (B, L) int token ids read by a trainable causal transformer;
  its final-LayerNorm output at the last unmasked position is the pooled text embedding.

Classifier-free guidance dropping is requested by the caller with boolean (B,) masks:
- `drop_image[b]`: the image embedding of row b is replaced by the learned null embedding
  (`conditioning/null_image_embed`) before both of its projections.
- `drop_text[b]`: every text token of row b is masked out of attention (the CLIP tokens and
  the pixels stay) and its pooled text embedding is replaced by zeros (only the bias of its
  time projection remains).
Karlo's own unconditional branch instead feeds the CLIP encodings of the empty caption with
`drop_text` False (and `drop_image` True); both are expressible here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipgen.models.clip import TextConfig, TextTower
from clipgen.models.unet import UNet, UNetConfig, image_shape


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The decoder's UNet (its `encoder_dim` is the context-token width), the CLIP embedding
    width, and where the text comes from. `text_width` and `text_embed_dim` are the widths of
    the text tokens and of the pooled text embedding; with a text transformer both are its
    width and may be left None. `image_embed_scale` multiplies the image embedding before
    its projections (Karlo: 1 on unnormalised embeddings; clipgen's unit embeddings train
    far faster at sqrt(dim), unit variance per dimension)."""

    unet: UNetConfig
    clip_embed_dim: int
    clip_extra_tokens: int = 4
    text_width: int | None = None
    text_embed_dim: int | None = None
    text_transformer: TextConfig | None = None
    image_embed_scale: float = 1.0

    def __post_init__(self):
        if self.unet.encoder_dim is None:
            raise ValueError(
                "DecoderConfig: unet.encoder_dim is None; set it to the width of the context "
                "tokens (the CLIP tokens and the projected text tokens)"
            )
        if self.clip_extra_tokens < 1:
            raise ValueError(f"DecoderConfig: clip_extra_tokens {self.clip_extra_tokens} < 1")
        if self.text_transformer is None:
            if self.text_width is None:
                raise ValueError(
                    "DecoderConfig: text_width is required without a text_transformer (the "
                    "width of the CLIP text encodings)"
                )
        else:
            width = self.text_transformer.width
            for field in ("text_width", "text_embed_dim"):
                if getattr(self, field) not in (None, width):
                    raise ValueError(
                        f"DecoderConfig: {field} {getattr(self, field)} differs from the text "
                        f"transformer's width {width}; leave it None"
                    )

    @property
    def token_width(self) -> int:
        """Width of the text tokens entering the conditioning projection."""
        if self.text_transformer is not None:
            return self.text_transformer.width
        return self.text_width

    @property
    def pooled_width(self) -> int:
        """Width of the pooled text embedding projected into the time embedding."""
        if self.text_transformer is not None:
            return self.text_transformer.width
        return self.text_embed_dim or self.text_width


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name=name,
    )


class Conditioning(nn.Module):
    """diffusers' `UnCLIPTextProjModel`: (time-embedding addition, context tokens, their mask)
    from the image embedding, the pooled text embedding and the text tokens, with the
    guidance substitutions of `drop_image` / `drop_text` (see the module docstring)."""

    config: DecoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        context, time = cfg.unet.encoder_dim, cfg.unet.embed_dim
        self.null_image_embed = self.param(
            "null_image_embed",
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            (cfg.clip_embed_dim,),
        )
        self.image_to_time = _dense(time, self.dtype, "image_to_time")
        self.text_to_time = _dense(time, self.dtype, "text_to_time")
        self.image_to_tokens = _dense(
            cfg.clip_extra_tokens * context, self.dtype, "image_to_tokens"
        )
        self.text_to_tokens = _dense(context, self.dtype, "text_to_tokens")
        self.text_norm = nn.LayerNorm(
            epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name="text_norm"
        )

    def __call__(
        self,
        image_embed: jax.Array,
        text_tokens: jax.Array | None,
        text_mask: jax.Array | None,
        text_embed: jax.Array | None,
        drop_image: jax.Array | None = None,
        drop_text: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> time addition (B, embed_dim), context (B, N + L, encoder_dim), mask (B, N + L)."""
        cfg = self.config
        batch = image_embed.shape[0]
        image_embed = image_embed.astype(jnp.float32) * cfg.image_embed_scale
        if drop_image is not None:
            null = jnp.broadcast_to(self.null_image_embed, image_embed.shape)
            image_embed = jnp.where(jnp.asarray(drop_image, bool)[:, None], null, image_embed)
        if text_embed is None:
            text_embed = jnp.zeros((batch, cfg.pooled_width), jnp.float32)
        if drop_text is not None:
            dropped = jnp.asarray(drop_text, bool)
            text_embed = jnp.where(dropped[:, None], 0.0, text_embed)
        time_addition = self.image_to_time(image_embed) + self.text_to_time(text_embed)

        count, context = cfg.clip_extra_tokens, cfg.unet.encoder_dim
        # Karlo lays this projection out channel-major: token n, channel c is output c*N + n.
        clip_tokens = self.image_to_tokens(image_embed).reshape(batch, context, count)
        clip_tokens = clip_tokens.transpose(0, 2, 1)
        clip_mask = jnp.ones((batch, count), bool)
        if text_tokens is None:
            return time_addition, clip_tokens, clip_mask
        tokens = self.text_norm(self.text_to_tokens(text_tokens.astype(self.dtype)))
        if text_mask is None:
            text_mask = jnp.ones(tokens.shape[:2], bool)
        text_mask = jnp.asarray(text_mask, bool)
        if drop_text is not None:
            text_mask = text_mask & ~dropped[:, None]
        context_tokens = jnp.concatenate([clip_tokens, tokens.astype(clip_tokens.dtype)], axis=1)
        return time_addition, context_tokens, jnp.concatenate([clip_mask, text_mask], axis=1)


class Decoder(nn.Module):
    """The unCLIP decoder: x_t, timesteps, CLIP image embedding and caption -> the UNet's
    output (B, H, W, unet.out_channels), float32."""

    config: DecoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        if cfg.text_transformer is not None:
            self.text_transformer = TextTower(cfg.text_transformer, self.dtype)
        self.conditioning = Conditioning(cfg, self.dtype)
        self.unet = UNet(cfg.unet, self.dtype)

    def _encode_text(
        self, text: jax.Array | None, text_mask: jax.Array | None, text_embed: jax.Array | None
    ) -> tuple[jax.Array | None, jax.Array | None]:
        """(text tokens, pooled text embedding) from the caller's text inputs."""
        if self.config.text_transformer is None:
            if text is not None and text.ndim != 3:
                raise ValueError(
                    f"this decoder reads CLIP text encodings (B, L, {self.config.token_width}); "
                    f"got text of shape {text.shape}"
                )
            return text, text_embed
        if text_embed is not None:
            raise ValueError(
                "a decoder with a text transformer pools its own text; omit text_embed"
            )
        if text is None:
            return None, None
        if text.ndim != 2 or not jnp.issubdtype(text.dtype, jnp.integer):
            raise ValueError(
                f"this decoder reads token ids (B, L) int; got {text.shape} {text.dtype}"
            )
        if text_mask is None:
            text_mask = jnp.ones(text.shape, bool)
        hidden = self.text_transformer(text, text_mask)
        last = jnp.maximum(jnp.sum(jnp.asarray(text_mask, jnp.int32), axis=-1) - 1, 0)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return hidden, pooled.astype(jnp.float32)

    def __call__(
        self,
        x_t: jax.Array,
        timesteps: jax.Array,
        image_embed: jax.Array,
        text: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        text_embed: jax.Array | None = None,
        drop_image: jax.Array | None = None,
        drop_text: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """x_t (B, H, W, in_channels); timesteps (B,); image_embed (B, clip_embed_dim); text as
        the module docstring says, text_mask (B, L) (True/1 = a real token); drop_image and
        drop_text (B,) bool guidance drops -> (B, H, W, out_channels)."""
        tokens, pooled = self._encode_text(text, text_mask, text_embed)
        time_addition, context, context_mask = self.conditioning(
            image_embed, tokens, text_mask, pooled, drop_image, drop_text
        )
        return self.unet(x_t, timesteps, time_addition, context, context_mask, deterministic)


def init_decoder(
    module: Decoder,
    rng: jax.Array,
    image_size: int | tuple[int, int],
    batch_size: int = 1,
    text_length: int = 4,
) -> dict[str, Any]:
    """`module.init` on zeros of this size with a text of `text_length` tokens (so every
    projection exists); returns the boxed variables."""
    cfg = module.config
    height, width = image_shape(image_size)
    x = jnp.zeros((batch_size, height, width, cfg.unet.in_channels))
    t = jnp.zeros((batch_size,))
    image_embed = jnp.zeros((batch_size, cfg.clip_embed_dim))
    mask = jnp.ones((batch_size, text_length), bool)
    if cfg.text_transformer is None:
        text = jnp.zeros((batch_size, text_length, cfg.token_width))
        text_embed = jnp.zeros((batch_size, cfg.pooled_width))
    else:
        text = jnp.zeros((batch_size, text_length), jnp.int32)
        text_embed = None
    return module.init({"params": rng}, x, t, image_embed, text, mask, text_embed)
