"""unCLIP's super-resolution models (64->256, 256->1024): the ADM UNet, by default without
attention and without text, reading the noisy image next to the low-resolution image resized
to its size (concatenated on channels, noisy image first). Fully convolutional: it runs at
any size that is a multiple of the UNet's total downsampling, e.g. on training crops.

The resize: "bilinear" is GLIDE's (torch `interpolate(mode="bilinear")`); "bicubic" is the
diffusers Karlo pipeline's (torch `interpolate(mode="bicubic", antialias=True)`, whose cubic
kernel, a=-0.5, is jax.image's; plain torch bicubic uses a=-0.75 and differs); "nearest".

With `residual` the diffusion runs on the residual of the image over the resized low-
resolution image (SRDiff's choice) instead of on the image itself (the paper's, Karlo's):
the network is the same; `to_target` and `from_target` convert between the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from clipgen.models.unet import UNet, UNetConfig, image_shape

RESIZE_METHODS = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}


@dataclasses.dataclass(frozen=True)
class UpsamplerConfig:
    """The upsampler's UNet (`in_channels` = 2 x image channels, no `encoder_dim`) and how the
    low-resolution image is resized: "bilinear", "bicubic" or "nearest"; `residual`: the
    diffusion target is the image minus the resized low-resolution image."""

    unet: UNetConfig
    resize: str = "bilinear"
    residual: bool = False

    def __post_init__(self):
        if self.resize not in RESIZE_METHODS:
            raise ValueError(
                f"UpsamplerConfig: resize {self.resize!r} is not one of {sorted(RESIZE_METHODS)}"
            )
        if self.unet.in_channels % 2:
            raise ValueError(
                f"UpsamplerConfig: unet.in_channels {self.unet.in_channels} must be twice the "
                "image channels (noisy image + resized low-resolution image)"
            )
        if self.unet.encoder_dim is not None:
            raise ValueError(
                "UpsamplerConfig: an upsampler reads no text; unet.encoder_dim must be None"
            )

    @property
    def image_channels(self) -> int:
        return self.unet.in_channels // 2


def resize_low_res(low_res: jax.Array, height: int, width: int, method: str) -> jax.Array:
    """(B, h, w, C) -> (B, height, width, C) float32 by `method` (a key of RESIZE_METHODS)."""
    shape = (low_res.shape[0], height, width, low_res.shape[-1])
    return jax.image.resize(low_res.astype(jnp.float32), shape, RESIZE_METHODS[method])


class Upsampler(nn.Module):
    """x_t (B, H, W, C), timesteps (B,), low_res (B, h, w, C) -> UNet output (B, H, W,
    unet.out_channels), float32."""

    config: UpsamplerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_t: jax.Array,
        timesteps: jax.Array,
        low_res: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.config
        channels = cfg.image_channels
        if x_t.shape[-1] != channels or low_res.shape[-1] != channels:
            raise ValueError(
                f"the upsampler expects {channels}-channel NHWC images; got x_t {x_t.shape} and "
                f"low_res {low_res.shape}"
            )
        resized = resize_low_res(low_res, x_t.shape[1], x_t.shape[2], cfg.resize)
        inputs = jnp.concatenate([x_t.astype(jnp.float32), resized], axis=-1)
        unet = UNet(cfg.unet, self.dtype, name="unet")
        return unet(inputs, timesteps, deterministic=deterministic)


def to_target(config: UpsamplerConfig, images: jax.Array, low_res: jax.Array) -> jax.Array:
    """What the diffusion generates for `images` (B, H, W, C) in [-1, 1]: the images, or with
    `config.residual` their residual over the resized `low_res`, in [-2, 2]."""
    if not config.residual:
        return images
    return images - resize_low_res(low_res, images.shape[1], images.shape[2], config.resize)


def from_target(config: UpsamplerConfig, target: jax.Array, low_res: jax.Array) -> jax.Array:
    """The images in [-1, 1] a diffusion `target` (to_target's form) stands for."""
    if not config.residual:
        return target
    resized = resize_low_res(low_res, target.shape[1], target.shape[2], config.resize)
    return jnp.clip(target + resized, -1.0, 1.0)


def target_range(config: UpsamplerConfig) -> float:
    """The bound on |target| (the sampler clips its x0 estimates to it)."""
    return 2.0 if config.residual else 1.0


def init_upsampler(
    module: Upsampler,
    rng: jax.Array,
    image_size: int | tuple[int, int],
    low_res_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """`module.init` on zeros (low_res defaults to a quarter of the size); returns the boxed
    variables."""
    height, width = image_shape(image_size)
    low_height, low_width = image_shape(low_res_size or (max(height // 4, 1), max(width // 4, 1)))
    channels = module.config.image_channels
    x = jnp.zeros((batch_size, height, width, channels))
    low_res = jnp.zeros((batch_size, low_height, low_width, channels))
    return module.init({"params": rng}, x, jnp.zeros((batch_size,)), low_res)
