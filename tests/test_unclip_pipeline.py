"""The unCLIP cascade and its manipulations on tiny random-weight models: text to the final
resolution on one and on eight devices, determinism from the seed, DDIM inversion with an
exact denoiser, slerp, text diffs and the PCA probe (`clipgen sample` on trained runs is in
test_demo.py, on the runs the tiny demo trains)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipgen.data import degrade
from clipgen.data import pipeline as data_pipeline
from clipgen.diffusion.gaussian import make_diffusion
from clipgen.pipelines import manipulate, unclip

from tiny_cascade import SIZES, tiny_cascade

CAPTIONS = [
    "a red circle",
    "a blue square on the left",
    "a green triangle",
    "a small yellow circle at the top",
    "a large purple square",
    "a red triangle to the left of a blue circle",
    "an orange circle",
    "a cyan square at the bottom",
]
EXACT_SIZE = 8  # the exact decoder's


@pytest.fixture(scope="module")
def tiny():
    """(configs, random params) of the tiny cascade, shared by the tests of this file."""
    return tiny_cascade()


@pytest.fixture(scope="module")
def one_device(tiny):
    return unclip.from_configs(*tiny, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def eight_devices(tiny):
    return unclip.from_configs(*tiny, devices=jax.devices())


def test_tiny_cascade_runs_text_to_final_resolution_deterministically(one_device):
    stages = one_device.stages(CAPTIONS, seed=0)
    assert stages.resolutions == SIZES
    norms = np.linalg.norm(np.asarray(stages.image_embed), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(stages.text.embed, axis=-1), 1.0, rtol=1e-5)
    assert stages.text.tokens.shape == (8, 24, 32)

    images = one_device.generate(CAPTIONS, seed=0)
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, stages.uint8()[-1])
    assert images.std() > 0
    np.testing.assert_array_equal(images, one_device.generate(CAPTIONS, seed=0))
    other = one_device.stages(CAPTIONS, seed=1)
    assert not np.allclose(np.asarray(other.image_embed), np.asarray(stages.image_embed))
    assert not np.array_equal(other.uint8()[-1], images)


def test_sharded_cascade_equals_one_device(one_device, eight_devices):
    single = one_device.stages(CAPTIONS, seed=3)
    sharded = eight_devices.stages(CAPTIONS, seed=3)
    # The first reverse step's x0 = (x_T - sqrt(1 - a) eps) / sqrt(a) multiplies the model's
    # float32 rounding (which differs between per-device batches of 8 and 1) by
    # sqrt(1 / a - 1) = 2e4 at the cosine schedule's last step: a few pixels move by ~5e-3,
    # the rest agree to ~1e-6.
    for a, b in zip(single.images, sharded.images, strict=True):
        assert len(b.sharding.device_set) == 8 and not b.sharding.is_fully_replicated
        difference = np.abs(np.asarray(b) - np.asarray(a))
        assert difference.max() < 2e-2 and difference.mean() < 2e-5
    np.testing.assert_allclose(
        np.asarray(sharded.image_embed), np.asarray(single.image_embed), atol=1e-5
    )
    # three captions do not divide over eight devices: the programs run replicated
    odd = eight_devices.generate(CAPTIONS[:3], seed=3)
    assert odd.shape == (3, 64, 64, 3) and odd.dtype == np.uint8


def test_condition_blur_blurs_each_upsamplers_input_before_it_samples(tiny, one_device):
    configs, _ = tiny
    configs = {name: config.copy_and_resolve_references() for name, config in configs.items()}
    configs["upsampler"].sample.condition_blur = 0.6
    assert unclip.Sampling.from_configs(configs)["upsampler"].condition_blur == 0.6
    assert one_device.sampling["upsampler"].condition_blur == 0.0

    low = jnp.asarray(_shapes_images(4)[:, ::2, ::2] / 127.5 - 1.0, jnp.float32)
    plain = one_device.sampling
    blurred = plain.replace(upsampler_condition_blur=0.6)
    [first, *_] = one_device.upsample(low, 0, blurred)
    [expected, *_] = one_device.upsample(degrade.gaussian_blur(low, 0.6), 0, plain)
    [unblurred, *_] = one_device.upsample(low, 0, plain)
    np.testing.assert_allclose(np.asarray(first), np.asarray(expected), atol=1e-5)
    assert np.abs(np.asarray(first) - np.asarray(unblurred)).max() > 1e-3


# --- an exact denoiser: inversion and the manipulations' embedding paths ---------------------


class GaussianDecoder(nn.Module):
    """The exact eps prediction when images are x_0 ~ N(mu(z), s^2 I) with mu(z) = 0.5 tanh(z W):
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), a = alpha-bar(t). It
    takes the decoder's call signature and ignores the text."""

    alphas_cumprod: tuple[float, ...]
    size: int
    scale: float = 0.3

    @nn.compact
    def __call__(self, x_t, t, image_embed, text, text_mask, text_embed, drop_image, drop_text):
        weights = self.param(
            "mean", nn.initializers.normal(1.0), (image_embed.shape[-1], self.size**2 * 3)
        )
        mean = 0.5 * jnp.tanh(image_embed @ weights).reshape(x_t.shape)
        mean = jnp.where(drop_image[:, None, None, None], 0.0, mean)
        abar = jnp.asarray(self.alphas_cumprod)[t][:, None, None, None]
        variance = abar * self.scale**2 + 1.0 - abar
        return jnp.sqrt(1.0 - abar) * (x_t - jnp.sqrt(abar) * mean) / variance


@pytest.fixture(scope="module")
def exact(one_device):
    """The tiny CLIP and prior with the exact Gaussian decoder, no upsamplers."""
    diffusion = make_diffusion("cosine", 1000)
    module = GaussianDecoder(tuple(float(a) for a in diffusion.alphas_cumprod), EXACT_SIZE)
    dim = one_device.embed_dim
    params = module.init(
        jax.random.key(7),
        jnp.zeros((1, EXACT_SIZE, EXACT_SIZE, 3)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, dim)),
        None,
        None,
        None,
        jnp.zeros((1,), bool),
        None,
    )["params"]
    return unclip.from_params(
        clip=one_device.clip,
        prior=one_device.prior,
        decoder=unclip.DiffusionModel(module, params, diffusion, EXACT_SIZE),
        sampling=unclip.Sampling(invert_respacing="ddim20", invert_iterations=6),
        devices=jax.devices()[:1],
    )


def _shapes_images(count, offset=0):
    source = data_pipeline.ProceduralShapes((32,), "test", 0)
    return np.stack([source[offset + i]["image_32"] for i in range(count)])


def test_ddim_inversion_then_eta0_decoding_reconstructs_the_input(exact):
    images = _shapes_images(4)
    x_0 = np.asarray(exact.decoder_input(images))
    embeds, x_T = manipulate.invert_images(exact, images)
    assert np.abs(np.asarray(x_T)).std() > 0.5  # a noise-like latent, not the image
    decoded = np.asarray(exact.render(embeds, x_T, seed=0, eta=0.0)[0])
    # With the exact denoiser the only errors are each inverted step's fixed-point residual
    # and float32 rounding. The residual shrinks about 3x per iteration on these 20 steps
    # (max error 0.30 with none, 7e-4 with 3, 2e-5 with 6); 1e-3, a quarter of a uint8
    # level, leaves a 50x margin.
    np.testing.assert_allclose(decoded, x_0, atol=1e-3)

    rendered = manipulate.variations(exact, images, seed=0, eta=0.0)
    expected = np.clip(np.round((x_0 + 1.0) * 127.5), 0, 255)
    assert np.abs(rendered.cascade[0].astype(int) - expected).max() <= 1
    varied = manipulate.variations(exact, images[:1], seed=0, eta=1.0, count=2)
    assert varied.images.shape == (2, EXACT_SIZE, EXACT_SIZE, 3)
    assert not np.array_equal(varied.images[0], varied.images[1])
    assert not np.array_equal(varied.images[0], rendered.images[0])


def test_slerp_endpoints_and_unit_norms():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16))
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    ts = np.linspace(0, 1, 7)
    path = manipulate.slerp(a, b, ts)
    assert path.shape == (7, 16)
    np.testing.assert_allclose(path[0], a, atol=1e-6)
    np.testing.assert_allclose(path[-1], b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(path, axis=-1), 1.0, atol=1e-6)
    steps = np.linalg.norm(np.diff(path, axis=0), axis=-1)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-5)  # constant angular speed
    np.testing.assert_allclose(manipulate.slerp(a, a, 0.3), a, atol=1e-6)


def test_interpolation_paths(exact):
    image_a, image_b = _shapes_images(2, offset=4)
    z = np.asarray(exact.encode_images([image_a, image_b]))
    fixed = manipulate.interpolate(exact, image_a, image_b, num=4, seed=0, fix_noise=True)
    np.testing.assert_allclose(fixed.image_embeds[[0, -1]], z, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fixed.image_embeds, axis=-1), 1.0, atol=1e-5)
    assert np.all(fixed.x_T == fixed.x_T[:1])
    inverted = manipulate.interpolate(exact, image_a, image_b, num=3, seed=0, fix_noise=False)
    x_0 = exact.decoder_input([image_a, image_b])
    expected = np.clip(np.round((np.asarray(x_0) + 1.0) * 127.5), 0, 255)
    ends = inverted.images[[0, -1]].astype(int)
    assert np.abs(ends - expected).max() <= 1  # the endpoints reconstruct the inputs


def test_text_diff_renders_the_slerp_towards_the_text_direction(exact):
    image = _shapes_images(1, offset=6)[0]
    z_i = np.asarray(exact.encode_images([image]))[0]
    thetas = (0.0, 0.25, 0.5)
    rendered = manipulate.text_diff(exact, image, "a red circle", "a blue circle", thetas, seed=0)
    np.testing.assert_allclose(rendered.image_embeds[0], z_i, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rendered.image_embeds, axis=-1), 1.0, atol=1e-5)
    direction = manipulate.text_direction(exact, "a red circle", "a blue circle")
    np.testing.assert_allclose(np.linalg.norm(direction), 1.0, rtol=1e-5)
    towards = rendered.image_embeds @ direction
    assert towards[0] < towards[1] < towards[2]
    assert rendered.images.shape == (3, EXACT_SIZE, EXACT_SIZE, 3)
    assert rendered.labels == ("theta=0.00", "theta=0.25", "theta=0.50")


def test_pca_probe_with_all_components_gives_back_z_i(exact):
    image = _shapes_images(1, offset=7)[0]
    z_i = np.asarray(exact.encode_images([image]))[0]
    basis = np.random.default_rng(1).standard_normal((64, exact.embed_dim))
    basis /= np.linalg.norm(basis, axis=-1, keepdims=True)
    mean, components = manipulate.fit_pca(basis)
    assert components.shape == (exact.embed_dim, exact.embed_dim)
    np.testing.assert_allclose(
        manipulate.pca_reconstruct(z_i, mean, components, exact.embed_dim), z_i, atol=1e-6
    )
    rendered = manipulate.pca_probe(exact, image, basis, ks=(1, 4, exact.embed_dim), seed=0)
    np.testing.assert_allclose(rendered.image_embeds[-1], z_i, atol=1e-5)
    assert not np.allclose(rendered.image_embeds[0], z_i, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(rendered.image_embeds, axis=-1), 1.0, atol=1e-5)
