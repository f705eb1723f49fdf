"""unCLIP's image manipulations (paper, section 3), each a function of an `UnCLIP` pipeline:
variations, interpolations, text diffs and the PCA probe of CLIP's latent space.

An image is first encoded by CLIP (z_i) and, where the manipulation keeps the decoder's
latent, inverted by deterministic DDIM with the decoder conditioned on z_i (x_T). The
inversion and the rendering condition the decoder on z_i with the text dropped (every
token masked, no pooled text embedding): the decoder trained with the text dropped for
half its examples, there is no caption for an input image, and rendering from the same
condition as the inversion is what makes DDIM with eta = 0 give the input back. Both run
over the decoder's `invert_respacing` process guided by `edit_guidance` (default 1: none,
under which DDIM inversion is accurate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipgen.diffusion import samplers
from clipgen.pipelines.sampling_settings import Sampling
from clipgen.pipelines.unclip import UnCLIP, normalize, progress_bar, stage_key, tick
from clipgen.sampling import decoder_model_fn, to_uint8


@dataclasses.dataclass(frozen=True)
class Rendered:
    """What a manipulation drew: final uint8 images, uint8 images at each resolution of the
    cascade, the unit image embeddings and decoder latents x_T they were rendered from, and
    a label per image."""

    images: np.ndarray
    cascade: tuple[np.ndarray, ...]
    image_embeds: np.ndarray
    x_T: np.ndarray
    labels: tuple[str, ...]


def slerp(a, b, t) -> np.ndarray:
    """Spherical interpolation along the last axis from a (t = 0) to b (t = 1); `t` a scalar
    or an array broadcasting against the leading axes (a (D,) with t (N,) gives (N, D)).
    Unit inputs give unit outputs; nearly parallel inputs fall back to linear."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    t = np.asarray(t, np.float64)[..., None]
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))[..., None]
    sin = np.sin(omega)
    parallel = sin < 1e-6
    safe = np.where(parallel, 1.0, sin)
    weight_a = np.where(parallel, 1.0 - t, np.sin((1.0 - t) * omega) / safe)
    weight_b = np.where(parallel, t, np.sin(t * omega) / safe)
    return (weight_a * a + weight_b * b).astype(np.float32)


def invert(pipe: UnCLIP, x_0: jax.Array, cond: dict, sampling: Sampling | None = None) -> jax.Array:
    """x_T that deterministic DDIM over `invert_respacing` decodes back to the decoder
    images `x_0` (B, r, r, 3) in [-1, 1] under `cond` (one program, cached by the pipeline)."""
    s = sampling or pipe.sampling
    batch = x_0.shape[0]

    def make():
        diffusion = pipe.decoder.diffusion.respaced(s.invert_respacing)

        def run(params, cond, x_0):
            model_fn = decoder_model_fn(pipe.decoder.module, params, s.edit_guidance, cond)
            iterations = s.invert_iterations
            return samplers.ddim_invert(
                diffusion, model_fn, x_0, clip=1.0, fixed_point_iterations=iterations
            )

        return jax.jit(run, out_shardings=pipe.batch_sharding(batch))

    split = batch % len(pipe.devices) == 0
    key = ("invert", split, s.invert_respacing, s.invert_iterations, s.edit_guidance)
    return pipe.program(key, make)(pipe.decoder.params, *pipe.put((cond, x_0), batch))


def invert_images(pipe: UnCLIP, images, bar=None) -> tuple[jax.Array, jax.Array]:
    """(z_i (B, D), x_T (B, r, r, 3)): CLIP image embeddings of uint8 images and the decoder
    latents that DDIM decodes back to the images at the decoder's resolution."""
    embeds = tick(pipe.encode_images(images), bar, "clip")
    x_0 = pipe.decoder_input(images)
    x_T = invert(pipe, x_0, pipe.decoder_condition(embeds))
    return embeds, tick(x_T, bar, "invert")


def render(
    pipe: UnCLIP,
    image_embeds,
    x_T,
    seed: int,
    eta: float,
    labels: Sequence[str],
    bar=None,
) -> Rendered:
    """Decode image embeddings (N, D) from latents x_T (N, r, r, 3) through the cascade."""
    image_embeds = np.asarray(image_embeds, np.float32)
    x_T = np.asarray(x_T, np.float32)
    cascade = pipe.render(image_embeds, x_T, seed, eta=eta, bar=bar)
    return Rendered(
        images=pipe.finish(cascade[-1]),
        cascade=tuple(np.asarray(to_uint8(images)) for images in cascade),
        image_embeds=image_embeds,
        x_T=x_T,
        labels=tuple(labels),
    )


def variations(
    pipe: UnCLIP,
    images,
    seed: int = 0,
    eta: float = 1.0,
    *,
    count: int = 1,
    progress: bool = False,
) -> Rendered:
    """`count` variations of each image (image-major): its z_i and inverted x_T decoded by
    DDIM with `eta` > 0 (eta = 0 reconstructs the input), then upsampled."""
    with progress_bar(progress, 3 + len(pipe.upsamplers), "variations") as bar:
        embeds, x_T = invert_images(pipe, images, bar)
        labels = [f"image {i} var {j}" for i in range(len(embeds)) for j in range(count)]
        return render(
            pipe,
            np.repeat(np.asarray(embeds), count, 0),
            np.repeat(np.asarray(x_T), count, 0),
            seed,
            eta,
            labels,
            bar,
        )


def interpolate(
    pipe: UnCLIP,
    image_a: np.ndarray,
    image_b: np.ndarray,
    num: int = 5,
    seed: int = 0,
    fix_noise: bool = True,
    *,
    eta: float = 0.0,
    progress: bool = False,
) -> Rendered:
    """`num` images along slerp(z_a, z_b, t), t from 0 to 1. With `fix_noise` every image
    starts from the same x_T drawn from the seed; otherwise x_T is the slerp of the two
    images' inverted latents (the endpoints then reconstruct the inputs)."""
    ts = np.linspace(0.0, 1.0, num)
    with progress_bar(progress, 2 + (not fix_noise) + len(pipe.upsamplers), "interpolate") as bar:
        if fix_noise:
            embeds = np.asarray(tick(pipe.encode_images([image_a, image_b]), bar, "clip"))
            size = pipe.decoder.resolution
            noise = jax.random.normal(stage_key(seed, "noise"), (1, size, size, 3))
            x_T = np.repeat(np.asarray(noise), num, 0)
        else:
            embeds, latents = invert_images(pipe, [image_a, image_b], bar)
            embeds, latents = np.asarray(embeds), np.asarray(latents)
            flat = latents.reshape(2, -1)
            x_T = slerp(flat[0], flat[1], ts).reshape((num, *latents.shape[1:]))
        path = slerp(embeds[0], embeds[1], ts)
        return render(pipe, path, x_T, seed, eta, [f"t={t:.2f}" for t in ts], bar)


def text_direction(pipe: UnCLIP, caption_from: str, caption_to: str) -> np.ndarray:
    """z_d = normalize(z_t(to) - z_t(from)) from the CLIP text embeddings (D,)."""
    embeds = np.asarray(pipe.encode_text([caption_from, caption_to]).embed)
    return np.asarray(normalize(embeds[1] - embeds[0]))


def text_diff(
    pipe: UnCLIP,
    image: np.ndarray,
    caption_from: str,
    caption_to: str,
    thetas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    seed: int = 0,
    *,
    eta: float = 0.0,
    progress: bool = False,
) -> Rendered:
    """The image edited towards a caption: slerp(z_i, z_d, theta) for each theta, rendered
    from the image's inverted x_T (theta = 0 is z_i itself)."""
    with progress_bar(progress, 3 + len(pipe.upsamplers), "text diff") as bar:
        embeds, x_T = invert_images(pipe, [image], bar)
        direction = text_direction(pipe, caption_from, caption_to)
        path = slerp(np.asarray(embeds)[0], direction, np.asarray(thetas))
        x_T = np.repeat(np.asarray(x_T), len(path), 0)
        labels = [f"theta={theta:.2f}" for theta in thetas]
        return render(pipe, path, x_T, seed, eta, labels, bar)


def fit_pca(embeds) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), principal directions (K, D) by decreasing variance) of embeddings (N, D);
    K = min(N, D)."""
    embeds = np.asarray(embeds, np.float64)
    mean = embeds.mean(0)
    _, _, components = np.linalg.svd(embeds - mean, full_matrices=False)
    return mean, components


def pca_reconstruct(z, mean: np.ndarray, components: np.ndarray, k: int) -> np.ndarray:
    """z (..., D) from its first `k` principal components plus the mean (not normalised)."""
    z = np.asarray(z, np.float64)
    basis = components[:k]
    return mean + ((z - mean) @ basis.T) @ basis


def pca_probe(
    pipe: UnCLIP,
    image: np.ndarray,
    basis_embeds,
    ks: Sequence[int],
    seed: int = 0,
    *,
    eta: float = 0.0,
    progress: bool = False,
) -> Rendered:
    """The image rendered from z_i reconstructed by the first k principal components (plus
    the mean) of `basis_embeds` (N, D), renormalised, for each k, with its inverted x_T:
    what each number of CLIP dimensions keeps (paper, figure 7)."""
    mean, components = fit_pca(basis_embeds)
    with progress_bar(progress, 3 + len(pipe.upsamplers), "pca") as bar:
        embeds, x_T = invert_images(pipe, [image], bar)
        z = np.asarray(embeds)[0]
        path = np.stack([pca_reconstruct(z, mean, components, int(k)) for k in ks])
        path = np.asarray(normalize(jnp.asarray(path, jnp.float32)))
        x_T = np.repeat(np.asarray(x_T), len(path), 0)
        return render(pipe, path, x_T, seed, eta, [f"k={k}" for k in ks], bar)
