"""The FID Inception against torch-fidelity's FeatureExtractorInceptionV3 with the same random
(batch-norm-calibrated) weights, and the weight files: .pth (weights_only) and safetensors."""

import importlib.util
import sys
import types

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from clipgen.eval.resize import tf1_bilinear
from clipgen.models.inception import (
    FIDInception,
    avg_pool_excluding_padding,
    max_pool_same,
    scale_input,
)
from clipgen.weights import load_inception
from clipgen.weights.inception import convert_inception, params_sha256

torch = pytest.importorskip("torch")


def _import_torch_fidelity_inception():
    """torch-fidelity's Inception module without its package __init__, which imports
    torchvision (absent here: it does not import beside torch 2.13)."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    from torch_fidelity import feature_extractor_inceptionv3

    return feature_extractor_inceptionv3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch-fidelity model with random weights and calibrated batch norm, its .pth path)."""
    fidelity = _import_torch_fidelity_inception()

    class RandomInception(fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            if state_dict is not None:  # None: keep the random initialisation
                return super().load_state_dict(state_dict, strict)

    download = fidelity.load_state_dict_from_url
    fidelity.load_state_dict_from_url = lambda *args, **kwargs: None
    try:
        torch.manual_seed(0)
        model = RandomInception("inception-v3-compat", ["2048", "logits"])
    finally:
        fidelity.load_state_dict_from_url = download

    # Default batch norm makes the features ~1e-8 and every comparison pass; set the running
    # statistics from one train-mode pass instead, and randomise the affine parameters.
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0.0, 0.2)
    calibration = np.random.default_rng(1).integers(0, 256, (3, 3, 299, 299), dtype=np.uint8)
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(calibration))
    model.eval()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def loaded(reference):
    return load_inception(reference[1])


def test_features_and_logits_equal_torch_fidelity(reference, loaded):
    model, _ = reference
    module, params = loaded
    images = np.random.default_rng(2).integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        want_pool, want_logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    want_pool, want_logits = want_pool.numpy(), want_logits.numpy()
    assert want_pool.std() > 1e-2  # calibrated: the comparison is not trivially between zeros

    apply = jax.jit(lambda p, x: module.apply(p, x, method=FIDInception.pool_and_logits))
    pool, logits = apply(params, tf1_bilinear(images, 299))
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    pool_scale, logits_scale = np.abs(want_pool).max(), np.abs(want_logits).max()
    np.testing.assert_allclose(pool, want_pool, rtol=1e-4, atol=1e-4 * pool_scale)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4 * logits_scale)


def test_parameters_cover_the_state_dict(reference, loaded):
    model, _ = reference
    _, params = loaded
    state = model.state_dict()
    flat = traverse_util.flatten_dict(params["params"])
    learned = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 566 and len(flat) == len(learned) == 472
    assert sum(v.size for v in flat.values()) == sum(v.numel() for v in learned.values())
    assert sum(v.size for v in flat.values()) == 23_885_392
    np.testing.assert_array_equal(
        flat[("Mixed_6b", "branch7x7_2", "conv", "kernel")],
        state["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        flat[("Mixed_7c", "branch_pool", "bn", "var")],
        state["Mixed_7c.branch_pool.bn.running_var"].numpy(),
    )


def test_safetensors_round_trip(reference, loaded, tmp_path):
    _, pth = reference
    _, from_pth = loaded
    out = convert_inception(pth, tmp_path / "inception.safetensors")
    assert sorted(safetensors.numpy.load_file(str(out))) == sorted(torch.load(pth).keys())
    _, from_safetensors = load_inception(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_safetensors)
    assert params_sha256(from_pth) == params_sha256(from_safetensors)
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileExistsError):
        convert_inception(pth, out)


class _Payload:
    """An arbitrary object: a weights_only load must refuse to build it."""


def test_pth_is_read_weights_only(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"fc.weight": _Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_inception(path)


def test_loading_is_strict(reference, tmp_path):
    state = {k: v.numpy() for k, v in torch.load(reference[1], weights_only=True).items()}
    extra = dict(state, **{"Mixed_5b.extra.weight": np.zeros(3, np.float32)})
    safetensors.numpy.save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="Mixed_5b.extra.weight"):
        load_inception(tmp_path / "extra.safetensors")
    missing = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.bn.running_mean"}
    safetensors.numpy.save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.bn.running_mean"):
        load_inception(tmp_path / "missing.safetensors")


def test_pools_match_torch_at_borders():
    x = np.random.default_rng(3).normal(size=(2, 7, 9, 5)).astype(np.float32)
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    want_avg = torch.nn.functional.avg_pool2d(nchw, 3, 1, 1, count_include_pad=False)
    want_max = torch.nn.functional.max_pool2d(nchw, 3, 1, 1)
    np.testing.assert_allclose(
        avg_pool_excluding_padding(x), want_avg.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(max_pool_same(x), want_max.permute(0, 2, 3, 1).numpy())
    corner = x[0, :2, :2, 0].mean()  # 4 in-image pixels, not 9
    assert np.isclose(avg_pool_excluding_padding(x)[0, 0, 0, 0], corner, rtol=1e-6)


def test_input_scaling_and_validation():
    pixels = np.array([0, 127.5, 128, 255], np.float32)
    np.testing.assert_allclose(scale_input(pixels, "tf"), (pixels - 128) / 128)
    np.testing.assert_allclose(scale_input(pixels, "pytorch_fid"), 2 * pixels / 255 - 1)
    with pytest.raises(ValueError, match="input_scaling"):
        scale_input(pixels, "imagenet")
    with pytest.raises(ValueError, match="at least 75"):
        FIDInception().init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.uint8))
