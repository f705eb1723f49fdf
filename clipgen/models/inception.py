"""The FID Inception-v3 in Flax linen (NHWC, inference only): the TensorFlow graph
`inception-2015-12-05` as pytorch-fid and torch-fidelity port it, whose `pt_inception-2015-12-05`
state dict `clipgen.weights.load_inception` reads.

It differs from torchvision's Inception3 where the TF graph does: the average pools in the
A, C and first E blocks leave padding out of the mean (`count_include_pad=False`), the last E
block max-pools, batch norm uses eps 1e-3 and its stored statistics, and the classifier has
1008 outputs. Submodule names are the torch ones, so the checkpoint maps one to one.

Input: (B, H, W, 3) RGB in 0..255, uint8 or float, already resized; FID features are defined
at 299x299 (`clipgen.eval.resize` makes them, unrounded, as the references do). Then
`input_scaling` applies the reference's normalisation: "tf" is (x - 128) / 128 on the float
0..255 image, what the TF graph does after its TF1 bilinear resize and torch-fidelity
(after the same resize) and clean-fid (after PIL bicubic) repeat; "pytorch_fid" is
2 * (x / 255) - 1, pytorch-fid's 2x - 1 on its [0, 1] image after torch's bilinear resize.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

FEATURE_DIM = 2048
NUM_CLASSES = 1008
FID_IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75  # the smallest input whose feature map survives to the last block
BATCH_NORM_EPS = 1e-3
INPUT_SCALINGS = ("tf", "pytorch_fid")


def scale_input(images: jax.Array, input_scaling: str) -> jax.Array:
    """0..255 RGB -> the network's input range, as the chosen reference computes it."""
    x = images.astype(jnp.float32)
    if input_scaling == "tf":
        return (x - 128.0) / 128.0
    if input_scaling == "pytorch_fid":
        return 2.0 * (x / 255.0) - 1.0
    raise ValueError(f"unknown input_scaling {input_scaling!r}; expected one of {INPUT_SCALINGS}")


def avg_pool_excluding_padding(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 average that divides by the in-image count (TF's avg_pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool_same(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 max pool (the graph's pool in Mixed_7c)."""
    return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))


def max_pool_reduce(x: jax.Array) -> jax.Array:
    """3x3, stride 2, unpadded max pool."""
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class FrozenBatchNorm(nn.Module):
    """Batch norm with stored statistics held as parameters (this network never trains)."""

    eps: float = BATCH_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., C) -> (x - mean) / sqrt(var + eps) * scale + bias, in float32."""
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (channels,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (channels,), jnp.float32)
        multiplier = scale * jax.lax.rsqrt(var + self.eps)
        return (x.astype(jnp.float32) - mean) * multiplier + bias


class ConvBN(nn.Module):
    """Bias-free conv -> frozen batch norm -> ReLU (the reference's BasicConv2d)."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C_in) -> (B, H', W', features)."""
        pad_h, pad_w = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            self.strides,
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "conv_out")
            ),
            name="conv",
        )(x)
        x = FrozenBatchNorm(name="bn")(x)
        return nn.relu(x).astype(self.dtype)


class InceptionBlock(nn.Module):
    """Base for the mixed blocks: `conv(...)` builds a named ConvBN with shared settings."""

    dtype: Any = jnp.float32
    precision: Any = "highest"

    def conv(
        self,
        name: str,
        features: int,
        kernel_size: tuple[int, int],
        strides: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
    ) -> ConvBN:
        return ConvBN(
            features, kernel_size, strides, padding, self.dtype, self.precision, name=name
        )


class InceptionA(InceptionBlock):
    """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and padding-excluding average-pool branches."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.conv("branch1x1", 64, (1, 1))(x)
        branch5x5 = self.conv("branch5x5_1", 48, (1, 1))(x)
        branch5x5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(branch5x5)
        branch3x3dbl = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        branch3x3dbl = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch_pool = self.conv("branch_pool", self.pool_features, (1, 1))(
            avg_pool_excluding_padding(x)
        )
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(InceptionBlock):
    """Mixed_6a: the 35 -> 17 grid reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.conv("branch3x3", 384, (3, 3), strides=(2, 2))(x)
        branch3x3dbl = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        branch3x3dbl = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(branch3x3dbl)
        branch3x3dbl = self.conv("branch3x3dbl_3", 96, (3, 3), strides=(2, 2))(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, max_pool_reduce(x)], axis=-1)


class InceptionC(InceptionBlock):
    """Mixed_6b-e: factorised 7x7 branches and a padding-excluding average-pool branch."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = self.conv("branch1x1", 192, (1, 1))(x)
        branch7x7 = self.conv("branch7x7_1", c7, (1, 1))(x)
        branch7x7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(branch7x7)
        branch7x7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(branch7x7)
        dbl = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
        dbl = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(dbl)
        dbl = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(dbl)
        dbl = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(dbl)
        dbl = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(dbl)
        branch_pool = self.conv("branch_pool", 192, (1, 1))(avg_pool_excluding_padding(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(InceptionBlock):
    """Mixed_7a: the 17 -> 8 grid reduction."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.conv("branch3x3_1", 192, (1, 1))(x)
        branch3x3 = self.conv("branch3x3_2", 320, (3, 3), strides=(2, 2))(branch3x3)
        branch7x7x3 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
        branch7x7x3 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(branch7x7x3)
        branch7x7x3 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(branch7x7x3)
        branch7x7x3 = self.conv("branch7x7x3_4", 192, (3, 3), strides=(2, 2))(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool_reduce(x)], axis=-1)


class InceptionE(InceptionBlock):
    """Mixed_7b (pool "avg", padding excluded) and Mixed_7c (pool "max", as the TF graph)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = self.conv("branch1x1", 320, (1, 1))(x)
        branch3x3 = self.conv("branch3x3_1", 384, (1, 1))(x)
        branch3x3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(branch3x3),
                self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(branch3x3),
            ],
            axis=-1,
        )
        dbl = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
        dbl = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(dbl)
        dbl = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(dbl),
                self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(dbl),
            ],
            axis=-1,
        )
        pooled = avg_pool_excluding_padding(x) if self.pool == "avg" else max_pool_same(x)
        branch_pool = self.conv("branch_pool", 192, (1, 1))(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInception(nn.Module):
    """The FID Inception-v3: images -> 2048-d pool features (and 1008-way logits)."""

    input_scaling: str = "tf"
    dtype: Any = jnp.float32
    precision: Any = "highest"  # float32 convs stay float32 on TPU/GPU (no bf16/TF32 passes)

    def setup(self):
        if self.input_scaling not in INPUT_SCALINGS:
            raise ValueError(
                f"FIDInception: unknown input_scaling {self.input_scaling!r}; "
                f"expected one of {INPUT_SCALINGS}"
            )
        settings = dict(dtype=self.dtype, precision=self.precision)

        self.Conv2d_1a_3x3 = ConvBN(32, (3, 3), strides=(2, 2), **settings)
        self.Conv2d_2a_3x3 = ConvBN(32, (3, 3), **settings)
        self.Conv2d_2b_3x3 = ConvBN(64, (3, 3), padding=(1, 1), **settings)
        self.Conv2d_3b_1x1 = ConvBN(80, (1, 1), **settings)
        self.Conv2d_4a_3x3 = ConvBN(192, (3, 3), **settings)
        self.Mixed_5b = InceptionA(**settings, pool_features=32)
        self.Mixed_5c = InceptionA(**settings, pool_features=64)
        self.Mixed_5d = InceptionA(**settings, pool_features=64)
        self.Mixed_6a = InceptionB(**settings)
        self.Mixed_6b = InceptionC(**settings, channels_7x7=128)
        self.Mixed_6c = InceptionC(**settings, channels_7x7=160)
        self.Mixed_6d = InceptionC(**settings, channels_7x7=160)
        self.Mixed_6e = InceptionC(**settings, channels_7x7=192)
        self.Mixed_7a = InceptionD(**settings)
        self.Mixed_7b = InceptionE(**settings, pool="avg")
        self.Mixed_7c = InceptionE(**settings, pool="max")
        self.fc = nn.Dense(
            NUM_CLASSES,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", None)
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        )

    def pool_and_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, 3) 0..255 RGB -> (pool features (B, 2048), logits (B, 1008)), float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"FIDInception expects NHWC RGB images (B, H, W, 3), got {images.shape}"
            )
        if min(images.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"FIDInception needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} "
                f"(FID uses {FID_IMAGE_SIZE}x{FID_IMAGE_SIZE}), got {images.shape[1:3]}"
            )
        x = scale_input(images, self.input_scaling).astype(self.dtype)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = max_pool_reduce(x)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = max_pool_reduce(x)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return pool, self.fc(pool)

    def __call__(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) 0..255 RGB -> the 2048-d pool features FID and KID use, float32."""
        return self.pool_and_logits(images)[0]


def init_inception(
    module: FIDInception, rng: jax.Array, image_size: int = MIN_IMAGE_SIZE
) -> dict[str, Any]:
    """`module.init` on a dummy batch, through the logits too; returns the boxed variables
    (apply `flax.linen.meta.unbox` for plain arrays). The image size does not change them."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    return module.init(rng, images, method=FIDInception.pool_and_logits)
