"""FID machinery: the reference resizes, the Frechet distance, KID, statistics files, the
sharded feature extractor (8 fake CPU devices) and the CLIP score conventions."""

import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import linen as nn
from flax import traverse_util
from PIL import Image

from clipgen.eval import fid
from clipgen.eval.clip_score import CONVENTIONS, clip_frechet_distance, clip_score
from clipgen.eval.fid import (
    FeatureStats,
    check_comparable,
    extract_features,
    fid_from_files,
    frechet_distance,
    kid,
    load_stats,
    make_feature_fn,
    save_stats,
)
from clipgen.eval.resize import clean_bicubic, pytorch_fid_bilinear, resize, tf1_bilinear, to_uint8
from clipgen.models.inception import FIDInception, init_inception

torch = pytest.importorskip("torch")

RESIZE_CASES = [((17, 23), (40, 31)), ((64, 50), (29, 37)), ((40, 40), (299, 299))]


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _nchw(images):
    return torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)


def _nhwc(tensor):
    return tensor.permute(0, 2, 3, 1).numpy()


def _random_spd(dim, seed):
    a = np.random.default_rng(seed).normal(size=(dim, 3 * dim))
    return a @ a.T / (3 * dim)


# --- resize --------------------------------------------------------------------------------


@pytest.mark.parametrize("source, target", RESIZE_CASES)
def test_tf1_bilinear_equals_torch_fidelity(source, target):
    if "torch_fidelity" not in sys.modules:  # its __init__ imports torchvision: bypass it
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.skip("torch-fidelity is not installed")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    images = _images((2, *source, 3))
    want = interpolate_bilinear_2d_like_tensorflow1x(
        _nchw(images), size=target, align_corners=False
    )
    np.testing.assert_array_equal(tf1_bilinear(images, target), _nhwc(want))


def test_tf1_bilinear_equals_tensorflow():
    tf = pytest.importorskip("tensorflow")
    images = _images((2, 17, 23, 3), seed=1)
    for size in [(40, 31), (9, 11)]:
        want = tf.compat.v1.image.resize_bilinear(
            images.astype(np.float32), size, align_corners=False
        ).numpy()
        np.testing.assert_array_equal(tf1_bilinear(images, size), want)


@pytest.mark.parametrize("source, target", RESIZE_CASES)
def test_pytorch_fid_equals_torch_interpolate(source, target):
    images = _images((2, *source, 3), seed=2)
    want = torch.nn.functional.interpolate(
        _nchw(images), size=target, mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(pytorch_fid_bilinear(images, target), _nhwc(want), atol=1e-4)


@pytest.mark.parametrize("source, target", RESIZE_CASES[:2])
def test_clean_equals_pil_float_bicubic(source, target):
    images = _images((2, *source, 3), seed=3)
    want = np.empty((2, *target, 3), np.float32)
    for i in range(2):
        for c in range(3):
            plane = Image.fromarray(images[i, :, :, c].astype(np.float32))
            assert plane.mode == "F"
            resized = plane.resize(target[::-1], resample=Image.Resampling.BICUBIC)
            want[i, :, :, c] = np.clip(np.asarray(resized), 0, 255)
    got = clean_bicubic(images, target)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, np.round(got))  # floats go on: no quantisation


def test_bilinear_modes_run_under_jit_and_keep_299():
    images = _images((2, 30, 20, 3), seed=4)
    for fn in (tf1_bilinear, pytorch_fid_bilinear):
        on_device = jax.jit(lambda x, fn=fn: fn(x, (41, 37)))(jnp.asarray(images))
        np.testing.assert_allclose(on_device, fn(images, (41, 37)), atol=1e-4)
    full = _images((1, 299, 299, 3), seed=5)
    for mode in ("tf1_bilinear", "clean", "pytorch_fid"):
        np.testing.assert_array_equal(resize(full, 299, mode), full.astype(np.float32))
    with pytest.raises(ValueError, match="resize mode"):
        resize(full, 299, "bicubic")


def test_to_uint8_rounds_and_clips():
    values = np.array([-3.0, 0.4, 0.6, 127.5000001, 254.7, 255.6])
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 1, 128, 255, 255])


# --- Frechet distance ----------------------------------------------------------------------


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's `calculate_frechet_distance` as published (its definition, restated)."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_frechet_distance_of_equal_statistics_is_zero():
    mu, sigma = np.random.default_rng(0).normal(size=16), _random_spd(16, 1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_diagonal_closed_form_and_symmetry():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    s1, s2 = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)), got, rtol=1e-9)


def test_frechet_distance_equals_pytorch_fid_and_eigenvalue_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    sigma1, sigma2 = _random_spd(24, 4), _random_spd(24, 5)
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(got, _pytorch_fid_formula(mu1, sigma1, mu2, sigma2), rtol=1e-6)
    np.testing.assert_allclose(frechet_distance(mu2, sigma2, mu1, sigma1), got, rtol=1e-6)
    eig = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real.clip(0)).sum()  # torch-fidelity's form
    by_eigenvalues = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1 + sigma2) - 2 * eig
    np.testing.assert_allclose(got, by_eigenvalues, rtol=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(6)
    with pytest.warns(UserWarning, match="singular"):
        mu1, sigma1 = fid.mean_cov(rng.normal(size=(10, 32)))
    with pytest.warns(UserWarning, match="singular"):
        mu2, sigma2 = fid.mean_cov(rng.normal(size=(12, 32)) + 0.3)
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(got) and got > 0


def test_few_sample_frechet_distance_equals_the_square_root_form():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(9, 24)) * np.linspace(0.5, 2.0, 24)
    reference = rng.normal(size=(200, 24)) + 0.2
    mu, sigma = reference.mean(0), np.cov(reference, rowvar=False)
    centred = features - features.mean(0)
    cov = centred.T @ centred / (len(features) - 1)
    # Tr (cov sigma)^1/2 from the eigenvalues of the (similar to symmetric PSD) product
    eigenvalues = np.clip(np.linalg.eigvals(cov @ sigma).real, 0.0, None)
    diff = features.mean(0) - mu
    direct = diff @ diff + np.trace(cov) + np.trace(sigma) - 2 * np.sum(np.sqrt(eigenvalues))
    got = fid.frechet_distance_few_samples(features, mu, sigma)
    assert got == pytest.approx(direct, rel=1e-8)


def test_frechet_distance_retries_with_eps_and_refuses_imaginary(monkeypatch):
    calls = []

    def non_finite_once(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else np.eye(len(matrix))

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", non_finite_once)
    sigma = np.eye(3) * 2
    with pytest.warns(UserWarning, match="singular"):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma, eps=1e-3)
    np.testing.assert_allclose(calls[1], np.eye(3) * 2.001**2)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda m: np.eye(len(m)) * (1 + 1e-2j))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda m: np.eye(len(m)) * (1 + 1e-5j))
    assert frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma) == pytest.approx(6 + 6 - 2 * 3)


def test_frechet_distance_keeps_float64_where_float32_fails():
    # Means near 1e5 that differ by 1e-3: float32's spacing there is 0.008, so it loses them.
    mu1 = np.full(8, 1e5)
    mu2 = mu1 + 1e-3
    sigma = np.eye(8)
    want = 8 * 1e-6
    np.testing.assert_allclose(frechet_distance(mu1, sigma, mu2, sigma), want, rtol=1e-6)
    lossy = mu1.astype(np.float32) - mu2.astype(np.float32)
    assert abs(float(lossy @ lossy) - want) > 0.5 * want


def test_streaming_statistics_keep_float64_where_float32_fails():
    rng = np.random.default_rng(7)
    features = 1e4 + rng.normal(scale=1e-2, size=(600, 6))
    stats = FeatureStats(6)
    for batch in np.array_split(features, 7):
        stats.update(batch)
    mean, cov = stats.mean_cov()
    np.testing.assert_allclose(mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(features, rowvar=False), rtol=1e-6, atol=1e-12)
    f32 = features.astype(np.float32)
    naive = (f32.T @ f32 - len(f32) * np.outer(f32.mean(0), f32.mean(0))) / (len(f32) - 1)
    assert np.abs(naive - np.cov(features, rowvar=False)).max() > 1.0


def test_feature_stats_mask_and_shapes():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(9, 4))
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 1], bool)
    stats = FeatureStats(4)
    stats.update(features, mask)
    assert stats.count == 7
    np.testing.assert_allclose(stats.mean_cov()[1], np.cov(features[mask], rowvar=False))
    with pytest.raises(ValueError, match="valid_mask"):
        stats.update(features, mask[:5])
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        stats.update(features[:, :3])


# --- statistics files ----------------------------------------------------------------------

METADATA = {
    "weights_sha256": "ab12",
    "resize_mode": "tf1_bilinear",
    "resolution": 64,
    "num_samples": 500,
    "split": "validation",
    "seed": 0,
}


def test_stats_files_round_trip_and_refuse_mismatched_metadata(tmp_path):
    mu, sigma = np.arange(4.0), _random_spd(4, 9)
    path = save_stats(tmp_path / "real.npz", mu, sigma, METADATA)
    got_mu, got_sigma, metadata = load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert metadata == METADATA
    assert [p.name for p in tmp_path.iterdir()] == ["real.npz"]

    save_stats(tmp_path / "fake.npz", mu + 1, sigma, dict(METADATA, split="generated", seed=3))
    assert fid_from_files(path, tmp_path / "fake.npz") == pytest.approx(4.0, abs=1e-6)
    save_stats(tmp_path / "clean.npz", mu, sigma, dict(METADATA, resize_mode="clean"))
    with pytest.raises(ValueError, match="resize_mode"):
        fid_from_files(path, tmp_path / "clean.npz")
    with pytest.raises(ValueError, match="weights_sha256"):
        check_comparable(METADATA, dict(METADATA, weights_sha256="cd34"))
    with pytest.raises(ValueError, match="not recorded"):
        check_comparable(METADATA, {})
    check_comparable(METADATA, {}, keys=())
    with pytest.raises(ValueError, match="seed"):
        save_stats(
            tmp_path / "bad.npz", mu, sigma, {k: v for k, v in METADATA.items() if k != "seed"}
        )


# --- KID -----------------------------------------------------------------------------------


def _direct_unbiased_mmd2(x, y):
    m, d = x.shape
    kernel = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    within_y = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return (within_x + within_y) / (m * (m - 1)) - 2 * across / m**2


def test_kid_equals_direct_unbiased_mmd():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(15, 5)), rng.normal(loc=0.3, size=(15, 5))
    result = kid(x, y, num_subsets=3, subset_size=1000, seed=0)  # whole sets, permuted
    assert result["subset_size"] == 15
    np.testing.assert_allclose(result["kid_mean"], _direct_unbiased_mmd2(x, y), rtol=1e-10)
    assert result["kid_std"] < 1e-12

    y_small = y[:11]
    result = kid(x, y_small, num_subsets=4, subset_size=50, seed=5)
    assert result["subset_size"] == 11
    rng = np.random.default_rng(5)
    values = []
    for _ in range(4):
        a = x[rng.choice(15, 11, replace=False)]
        b = y_small[rng.choice(11, 11, replace=False)]
        values.append(_direct_unbiased_mmd2(a, b))
    np.testing.assert_allclose(result["kid_mean"], np.mean(values), rtol=1e-10)
    np.testing.assert_allclose(result["kid_std"], np.std(values), rtol=1e-8)


def test_kid_is_unbiased_for_one_distribution_and_seeded():
    replicates = []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
        replicates.append(kid(a, b, num_subsets=20, subset_size=100, seed=seed)["kid_mean"])
    # Independent replicates of an unbiased estimator: their mean is 0 within 4 standard errors.
    assert abs(np.mean(replicates)) < 4 * np.std(replicates) / np.sqrt(len(replicates))
    shifted = kid(a, b + 0.5, num_subsets=20, subset_size=100, seed=0)["kid_mean"]
    assert shifted > 50 * np.std(replicates)

    first = kid(a, b, num_subsets=5, subset_size=50, seed=7)
    assert kid(a, b, num_subsets=5, subset_size=50, seed=7) == first
    assert kid(a, b, num_subsets=5, subset_size=50, seed=8) != first


# --- sharded feature extraction ------------------------------------------------------------


class _StandInFeatures(nn.Module):
    """A cheap image -> 6-d feature map standing in for the Inception."""

    @nn.compact
    def __call__(self, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
        return jnp.tanh(nn.Dense(6)(x)) * 3.0 + 10.0


def _ragged_batches(images, sizes):
    start = 0
    for size in sizes:
        yield images[start : start + size]
        start += size
    assert start == len(images)


def test_sharded_statistics_equal_numpy_over_valid_rows(mesh8):
    module = _StandInFeatures()
    images = _images((37, 8, 8, 3), seed=11)
    params = module.init(jax.random.key(0), images[:1])
    want = np.asarray(module.apply(params, images), np.float64)

    feature_fn = make_feature_fn(module, params, mesh8)
    stats, kept = extract_features(
        _ragged_batches(images, [5, 12, 20]), feature_fn, 16, mesh8.devices.size, keep_features=True
    )
    assert stats.count == 37 and kept.shape == (37, 6)
    np.testing.assert_allclose(kept, want, rtol=1e-6)  # float32 features, computed sharded
    mean, cov = stats.mean_cov()
    kept = kept.astype(np.float64)
    np.testing.assert_allclose(mean, kept.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(kept, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        extract_features(iter([images]), feature_fn, 12)


def _numpy_inception_params(module, seed):
    """He-scaled random Inception parameters made on the host (no jitted RNG to compile)."""
    abstract = jax.eval_shape(
        lambda rng: nn.meta.unbox(init_inception(module, rng)), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(abstract["params"]).items():
        if path[-1] == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(scale=np.sqrt(2.0 / fan_in), size=leaf.shape)
        elif path[-1] in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        flat[path] = value.astype(np.float32)
    return {"params": traverse_util.unflatten_dict(flat)}


def test_sharded_inception_statistics(mesh8):
    module = FIDInception()
    params = _numpy_inception_params(module, seed=12)
    images = _images((11, 75, 75, 3), seed=13)
    want = np.asarray(jax.jit(module.apply)(params, images), np.float64)
    assert want.shape == (11, 2048) and want.std() > 1e-2

    feature_fn = make_feature_fn(module, params, mesh8)
    stats, kept = extract_features(iter([images]), feature_fn, 8, keep_features=True)
    assert stats.count == 11
    np.testing.assert_allclose(kept, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.warns(UserWarning, match="singular"):
        mean, cov = stats.mean_cov()
    scale = np.abs(want).max()
    np.testing.assert_allclose(mean, want.mean(axis=0), atol=1e-4 * scale)
    np.testing.assert_allclose(cov, np.cov(want, rowvar=False), atol=1e-4 * scale**2)
    exact = np.cov(kept.astype(np.float64), rowvar=False)  # the rows that went in
    np.testing.assert_allclose(cov, exact, rtol=1e-9, atol=1e-12 * scale**2)
    with pytest.raises(ValueError, match="input_scaling"):
        extract_features(iter([images]), feature_fn, 8, resize_mode="pytorch_fid")


# --- CLIP score ----------------------------------------------------------------------------


def _at_angles(degrees, length=3.0):
    radians = np.deg2rad(degrees)
    return length * np.stack([np.cos(radians), np.sin(radians), np.zeros_like(radians)], -1)


def test_clip_score_conventions_on_constructed_embeddings():
    images = np.tile([[2.0, 0.0, 0.0]], (2, 1))
    texts = _at_angles(np.array([60.0, 120.0]))  # cosines 0.5 and -0.5
    paper = clip_score(images, texts, backbone="ViT-B/32", **CONVENTIONS["clipscore_paper"])
    np.testing.assert_allclose(paper["per_sample"], [1.25, 0.0])
    assert paper["clip_score"] == pytest.approx(0.625)
    assert paper["scale"] == 2.5 and paper["backbone"] == "ViT-B/32"
    assert paper["caption_prefix"] == "A photo depicts "
    assert "per sample" in paper["clamp"] and paper["num_samples"] == 2

    hundred = clip_score(images, texts, backbone="ViT-L/14")
    assert hundred["clip_score"] == pytest.approx(25.0) and hundred["scale"] == 100.0
    torchmetrics = clip_score(images, texts, backbone="ViT-L/14", **CONVENTIONS["torchmetrics"])
    assert torchmetrics["clip_score"] == pytest.approx(0.0, abs=1e-12)
    assert "mean" in torchmetrics["clamp"]

    negative = _at_angles(np.array([120.0, 180.0]))  # cosines -0.5 and -1
    assert clip_score(images, negative, backbone="b", clamp="none")["clip_score"] == pytest.approx(
        -75.0
    )
    assert clip_score(images, negative, backbone="b", clamp="mean")["clip_score"] == 0.0
    with pytest.raises(ValueError, match="clamp"):
        clip_score(images, texts, backbone="b", clamp="sometimes")


def test_clip_frechet_distance_closed_form():
    real = np.random.default_rng(14).normal(size=(200, 8))
    shift = np.linspace(-1, 1, 8)
    # Equal covariances: the distance is the squared mean shift.
    np.testing.assert_allclose(clip_frechet_distance(real, real + shift), shift @ shift, rtol=1e-6)
    assert abs(clip_frechet_distance(real, real)) < 1e-6
