"""Conditioning corruptions of unCLIP's upsamplers, deterministic from a seed.

The 64->256 upsampler is conditioned on a downsampled image blurred with a small gaussian
(`low_resolution`, then `gaussian_blur`); the 256->1024 upsampler on a BSR-degraded one
(`bsr_degradation`, Zhang et al. 2021 "Designing a Practical Degradation Model for Deep Blind
Image Super-Resolution", with the settings of LDM's `degradation_bsrgan_variant`).
`degrade_batch` applies either per example, seeded by (seed, example index).
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# unCLIP (Ramesh et al. 2022), App. C: the 64->256 conditioning is blurred with a gaussian of
# kernel size 3 and sigma 0.6.
BLUR_SIGMA = 0.6
BLUR_KERNEL_SIZE = 3

# BSR degradation. Numbers from BSRGAN (Zhang et al. 2021, Sec. 3) as set in LDM's
# `ldm/modules/image_degradation/bsrgan.py::degradation_bsrgan_variant` (Rombach et al. 2022).
# With scale 4, first halve the image with this probability, then continue at scale 2.
BSR_HALVE_PROB = 0.25
# ... halving with MATLAB-style antialiased bicubic with this probability, else a plain resize.
BSR_HALVE_ANTIALIAS_PROB = 0.5
# Each of the two blur steps is anisotropic with this probability, else isotropic.
BSR_ANISO_BLUR_PROB = 0.5
# Blur kernel sizes: 2 * randint(2, 11) + 3, the odd sizes 7..25.
BSR_BLUR_KERNEL_SIZES = tuple(range(7, 26, 2))
# Anisotropic kernel: covariance eigenvalues uniform in [0, 4 + scale).
BSR_ANISO_VARIANCE_BASE = 4.0
BSR_ANISO_VARIANCE_PER_SCALE = 1.0
# Isotropic kernel: sigma uniform in [0, 2 + 0.2 * scale).
BSR_ISO_SIGMA_BASE = 2.0
BSR_ISO_SIGMA_PER_SCALE = 0.2
# The intermediate down-resize is a resize by a factor uniform in [1, 2 * scale) with this
# probability; else a shifted gaussian blur then nearest subsampling by `scale` (BSRGAN's
# alignment-corrected nearest downsampling).
BSR_RESIZE_PROB = 0.75
BSR_RESIZE_MAX_FACTOR_PER_SCALE = 2.0
BSR_NEAREST_KERNEL_SIZE = 25
BSR_NEAREST_SIGMA_MIN = 0.1
BSR_NEAREST_SIGMA_PER_SCALE = 0.6
# Interpolations of the random resizes (OpenCV codes 1, 2, 3 in LDM).
BSR_RESIZE_METHODS = ("bilinear", "bicubic", "area")
# Gaussian noise level, an integer in [2, 25] on the 0..255 scale; grayscale (one noise for all
# channels) with probability 0.4, channel-independent 0.4, else channel-correlated.
BSR_NOISE_LEVELS = (2, 25)
BSR_NOISE_GRAY_PROB = 0.4
BSR_NOISE_COLOUR_PROB = 0.4
# The JPEG step inside the chain runs with this probability; the final JPEG always runs.
BSR_JPEG_PROB = 0.9
BSR_JPEG_QUALITIES = (30, 95)

# Cubic convolution coefficients: OpenCV's resize (used by LDM's plain resizes) and MATLAB's
# imresize (LDM's `imresize_np`, the antialiased halving).
CUBIC_A_OPENCV = -0.75
CUBIC_A_MATLAB = -0.5

# Kernel taps below this fraction of the peak are dropped, as MATLAB's fspecial does.
_KERNEL_CUTOFF = float(np.finfo(np.float64).eps)
# Floor on sampled gaussian variances: a zero draw gives a delta kernel, not a division by zero.
_MIN_VARIANCE = 1e-6
# Mixed into every per-example seed so that these streams differ from other users of `seed`.
_STREAM_TAG = 0x62737264  # "bsrd"

MODES = ("blur", "bsr")


# ---------------------------------------------------------------------------------------------
# Gaussian blur (64->256)


def _blur_separable(x, sigma, kernel_size: int, xp):
    """Separable gaussian blur of (..., H, W, C) with reflect padding, in array module xp."""
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    radius = kernel_size // 2
    offsets = xp.arange(1, radius + 1, dtype=xp.float32)
    side = xp.exp(-(offsets**2) / (2.0 * xp.asarray(sigma, dtype=xp.float32) ** 2))
    side = (side / (1.0 + 2.0 * side.sum())).astype(x.dtype)
    for axis in (x.ndim - 3, x.ndim - 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = xp.pad(x, pad, mode="reflect")
        window = [slice(None)] * x.ndim
        # x + sum_d k_d * (neighbour differences): the normalised kernel, exact on constants.
        out = x
        for d in range(1, radius + 1):
            window[axis] = slice(radius - d, radius - d + x.shape[axis])
            before = padded[tuple(window)]
            window[axis] = slice(radius + d, radius + d + x.shape[axis])
            after = padded[tuple(window)]
            out = out + side[d - 1] * ((before - x) + (after - x))
        x = out
    return x


def gaussian_blur(
    images: jax.Array, sigma: float = BLUR_SIGMA, kernel_size: int = BLUR_KERNEL_SIZE
) -> jax.Array:
    """Blur float images (..., H, W, C), NHWC in [-1, 1] or [0, 1] alike (the kernel is
    normalised); jit-able, `sigma` may be traced, `kernel_size` (odd) must be static."""
    # Reflect padding (`d c b | a b c d`: OpenCV's default BORDER_REFLECT_101, scipy's "mirror",
    # BSRGAN's choice) brings in no constant, so edges are not pulled towards 0 whatever the
    # value range, and a constant image stays exactly constant.
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"gaussian_blur wants float images, got {images.dtype}")
    if images.ndim < 3:
        raise ValueError(f"gaussian_blur wants (..., H, W, C) images, got shape {images.shape}")
    return _blur_separable(images, sigma, kernel_size, jnp)


# ---------------------------------------------------------------------------------------------
# Resampling (numpy; deterministic: fixed-order sums of gathered rows, no BLAS)


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _resample_weights(
    n_in: int, n_out: int, method: str, antialias: bool, cubic_a: float
) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, taps) source indices (clamped to the border) and normalised weights."""
    scale = n_in / n_out
    if method == "area":
        # Overlap of each output pixel's footprint [i * scale, (i + 1) * scale) with the sources.
        lo = np.arange(n_out) * scale
        taps = int(np.ceil(scale)) + 1
        index = np.floor(lo).astype(np.int64)[:, None] + np.arange(taps)
        weights = np.minimum(lo[:, None] + scale, index + 1) - np.maximum(lo[:, None], index)
        weights = np.clip(weights, 0.0, None)
    elif method in ("bilinear", "bicubic"):
        support = 1.0 if method == "bilinear" else 2.0
        stretch = max(scale, 1.0) if antialias else 1.0
        centres = (np.arange(n_out) + 0.5) * scale - 0.5
        taps = int(np.ceil(2.0 * support * stretch)) + 1
        index = np.floor(centres - support * stretch).astype(np.int64)[:, None] + np.arange(taps)
        t = (index - centres[:, None]) / stretch
        weights = (
            np.clip(1.0 - np.abs(t), 0.0, None) if method == "bilinear" else _cubic(t, cubic_a)
        )
    else:
        raise ValueError(f"unknown resize method {method!r}: use bilinear, bicubic or area")
    weights = weights / weights.sum(axis=1, keepdims=True)
    return np.clip(index, 0, n_in - 1), weights.astype(np.float32)


def _resize_axis0(x: np.ndarray, n_out: int, method: str, antialias: bool, cubic_a: float):
    index, weights = _resample_weights(x.shape[0], n_out, method, antialias, cubic_a)
    out = np.zeros((n_out, *x.shape[1:]), dtype=np.float32)
    expand = (slice(None),) + (None,) * (x.ndim - 1)
    for tap in range(index.shape[1]):
        out += weights[:, tap][expand] * x[index[:, tap]]
    return out


def _resize(
    x: np.ndarray,
    height: int,
    width: int,
    method: str,
    antialias: bool = False,
    cubic_a: float = CUBIC_A_OPENCV,
) -> np.ndarray:
    """Resize a float (H, W, C) image: without antialias like OpenCV's resize (no prefilter),
    with it like MATLAB's imresize (the kernel widened by the factor)."""
    x = _resize_axis0(x, height, method, antialias, cubic_a)
    x = _resize_axis0(np.swapaxes(x, 0, 1), width, method, antialias, cubic_a)
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))


def low_resolution(images: np.ndarray, size: int | tuple[int, int], method: str = "area"):
    """The 64->256 conditioning before the blur: (..., H, W, C) images area-averaged (or
    antialiased "bicubic") to `size`; uint8 in gives rounded uint8 out, float in float32 out."""
    # Area by default: the shapes renderer draws pixels as shape coverage, so the area average of
    # a 256 px render is (up to rounding) the 64 px render that the decoder learns to produce.
    images = np.asarray(images)
    height, width = (size, size) if isinstance(size, int) else size
    flat = images.reshape(-1, *images.shape[-3:]).astype(np.float32)
    out = np.stack(
        [_resize(x, height, width, method, antialias=True, cubic_a=CUBIC_A_MATLAB) for x in flat]
    )
    out = out.reshape(*images.shape[:-3], *out.shape[1:])
    return _to_uint8(out / 255.0) if images.dtype == np.uint8 else out


# ---------------------------------------------------------------------------------------------
# BSR degradation (256->1024)


def bicubic(low: np.ndarray, size: int) -> np.ndarray:
    """Plain bicubic upsampling of uint8 images to `size` (the upsamplers' baseline)."""
    shape = (len(low), size, size, 3)
    enlarged = jax.image.resize(jnp.asarray(low, jnp.float32), shape, "cubic")
    return np.asarray(jnp.clip(jnp.round(enlarged), 0, 255).astype(jnp.uint8))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _gaussian_kernel(
    size: int, var_major: float, var_minor: float, theta: float, centre: float = 0.0
) -> np.ndarray:
    """A normalised (size, size) gaussian correlation kernel, axes rotated by theta, its peak
    at (centre, centre) pixels from the middle."""
    d = np.arange(size) - (size - 1) / 2.0 - centre
    dy, dx = d[:, None], d[None, :]
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = np.sin(theta) * dx - np.cos(theta) * dy
    var_major, var_minor = max(var_major, _MIN_VARIANCE), max(var_minor, _MIN_VARIANCE)
    kernel = np.exp(-0.5 * (u**2 / var_major + v**2 / var_minor))
    kernel[kernel < _KERNEL_CUTOFF * kernel.max()] = 0.0
    return kernel / kernel.sum()


def _correlate(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation of a float (H, W, C) image with reflect padding, one kernel per channel."""
    kh, kw = kernel.shape
    padded = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode="reflect")
    out = np.zeros_like(x)
    height, width = x.shape[:2]
    for i, j in zip(*np.nonzero(kernel), strict=True):
        out += np.float32(kernel[i, j]) * padded[i : i + height, j : j + width]
    return out


def _random_blur(x: np.ndarray, rng: np.random.Generator, sf: int) -> np.ndarray:
    size = int(rng.choice(BSR_BLUR_KERNEL_SIZES))
    if rng.random() < BSR_ANISO_BLUR_PROB:
        limit = BSR_ANISO_VARIANCE_BASE + BSR_ANISO_VARIANCE_PER_SCALE * sf
        var_major, var_minor = limit * rng.random(), limit * rng.random()
        kernel = _gaussian_kernel(size, var_major, var_minor, np.pi * rng.random())
    else:
        sigma = (BSR_ISO_SIGMA_BASE + BSR_ISO_SIGMA_PER_SCALE * sf) * rng.random()
        kernel = _gaussian_kernel(size, sigma**2, sigma**2, 0.0)
    return _correlate(x, kernel)


def _random_method(rng: np.random.Generator) -> str:
    return BSR_RESIZE_METHODS[int(rng.integers(len(BSR_RESIZE_METHODS)))]


def _random_downsample(x: np.ndarray, rng: np.random.Generator, sf: int) -> np.ndarray:
    if rng.random() < BSR_RESIZE_PROB:
        factor = rng.uniform(1.0, BSR_RESIZE_MAX_FACTOR_PER_SCALE * sf)
        height, width = (max(1, int(n / factor)) for n in x.shape[:2])
        x = _resize(x, height, width, _random_method(rng))
    else:
        sigma = rng.uniform(BSR_NEAREST_SIGMA_MIN, BSR_NEAREST_SIGMA_PER_SCALE * sf)
        # Peak shifted by (sf - 1) / 2 so that pixel sf * i samples the centre of its sf x sf block.
        kernel = _gaussian_kernel(BSR_NEAREST_KERNEL_SIZE, sigma**2, sigma**2, 0.0, (sf - 1) / 2)
        x = _correlate(x, kernel)[::sf, ::sf]
    return np.clip(x, 0.0, 1.0)


def _random_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    level = rng.integers(BSR_NOISE_LEVELS[0], BSR_NOISE_LEVELS[1], endpoint=True) / 255.0
    kind = rng.random()
    height, width = x.shape[:2]
    if kind < BSR_NOISE_GRAY_PROB:
        noise = level * rng.standard_normal((height, width, 1))
    elif kind < BSR_NOISE_GRAY_PROB + BSR_NOISE_COLOUR_PROB:
        noise = level * rng.standard_normal((height, width, 3))
    else:
        # Covariance level^2 * U^T diag(d) U, U a random orthonormal basis, d uniform in [0, 1)
        # (BSRGAN Sec. 3.1); LDM's code fixes the level at 25 here and takes |covariance|.
        basis = np.linalg.svd(rng.random((3, 3)))[0]
        mix = level * (basis.T * np.sqrt(rng.random(3))) @ basis
        z = rng.standard_normal((height, width, 3))
        noise = z[..., 0:1] * mix[0] + z[..., 1:2] * mix[1] + z[..., 2:3] * mix[2]
    return np.clip(x + noise.astype(np.float32), 0.0, 1.0)


def _jpeg(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(BSR_JPEG_QUALITIES[0], BSR_JPEG_QUALITIES[1], endpoint=True))
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0


def bsr_degradation(
    image: np.ndarray, rng: np.random.Generator | int, scale: int = 4
) -> np.ndarray:
    """The 256->1024 conditioning: uint8 (H, W, 3) -> BSR-degraded uint8 (H/scale, W/scale, 3);
    `rng` a numpy Generator (advanced) or an int seed, the same one giving the same bits."""
    # The chain in shuffled order: two random blurs, a random down-resize, the resize to the
    # target size (kept after the down-resize), noise, JPEG (p = 0.9); then a final JPEG. As in
    # BSRGAN and LDM, blurs, noise and JPEG may also come after the resize to the target size.
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"bsr_degradation wants a uint8 (H, W, 3) image, got {image.dtype} {image.shape}"
        )
    if not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    height, width = image.shape[:2]
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not divisible by scale {scale}")
    rng = np.random.default_rng(rng)
    target = (height // scale, width // scale)
    x = image.astype(np.float32) / 255.0
    sf = int(scale)

    if sf == 4 and rng.random() < BSR_HALVE_PROB:
        if rng.random() < BSR_HALVE_ANTIALIAS_PROB:
            x = _resize(x, height // 2, width // 2, "bicubic", True, CUBIC_A_MATLAB)
        else:
            x = _resize(x, height // 2, width // 2, _random_method(rng))
        x = np.clip(x, 0.0, 1.0)
        sf = 2

    blur1, blur2, down, final, noise, jpeg = range(6)
    order = [int(step) for step in rng.permutation(6)]
    if order.index(down) > order.index(final):
        i, j = order.index(down), order.index(final)
        order[i], order[j] = order[j], order[i]
    for step in order:
        if step in (blur1, blur2):
            x = _random_blur(x, rng, sf)
        elif step == down:
            x = _random_downsample(x, rng, sf)
        elif step == final:
            x = np.clip(_resize(x, *target, _random_method(rng)), 0.0, 1.0)
        elif step == noise:
            x = _random_noise(x, rng)
        elif step == jpeg and rng.random() < BSR_JPEG_PROB:
            x = _jpeg(x, rng)
    return _to_uint8(_jpeg(x, rng))


# ---------------------------------------------------------------------------------------------
# Batches


def example_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of example `index` under `seed`, independent of batching and host."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed}, {index}")
    return np.random.default_rng(np.random.SeedSequence([_STREAM_TAG, int(seed), int(index)]))


def degrade_batch(
    images: np.ndarray, seed: int, index: int | np.ndarray, mode: str, scale: int = 4
) -> np.ndarray:
    """Upsampler conditioning of uint8 (N, H, W, 3) -> uint8 (N, H/scale, W/scale, 3), example
    i seeded by (seed, index[i]); `index` is (N,) global indices or the first of a run."""
    # "blur": area downsampling then the fixed 3x3 blur (no randomness); "bsr": bsr_degradation
    # with example_rng(seed, index).
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"degrade_batch wants uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    count, height, width = images.shape[:3]
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not divisible by scale {scale}")
    index = np.asarray(index, dtype=np.int64)
    indices = index + np.arange(count) if index.ndim == 0 else index
    if indices.shape != (count,):
        raise ValueError(f"index must be a scalar or have shape ({count},), got {index.shape}")
    if mode == "blur":
        small = low_resolution(images.astype(np.float32) / 255.0, (height // scale, width // scale))
        return _to_uint8(_blur_separable(small, BLUR_SIGMA, BLUR_KERNEL_SIZE, np))
    return np.stack(
        [
            bsr_degradation(image, example_rng(seed, int(i)), scale)
            for image, i in zip(images, indices, strict=True)
        ]
    )
