"""Evaluation runs end to end on offline stand-ins: random Inception weights (batch norm
calibrated), a fake COCO 2014 folder drawn from the shapes world, a tiny random CLIP; the
`real` generator must score FID ~0, the `noise` generator far worse."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from clipgen import cli
from clipgen.data import shapes
from clipgen.data.pipeline import ProceduralShapes
from clipgen.data.tokenizer import Tokenizer
from clipgen.eval import registry, run
from clipgen.eval.coco import CocoVal
from clipgen.eval.fid import load_stats
from clipgen.models.clip import CLIP, TextConfig, VisionConfig, init_clip
from clipgen.models.inception import BATCH_NORM_EPS, FIDInception, FrozenBatchNorm, init_inception
from clipgen.weights import clip as clip_weights
from clipgen.weights.convert import Rule
from clipgen.weights.inception import inception_rules

import denoiser_stage

ROOT = Path(__file__).parents[1]
EVAL_CONFIG = ROOT / "configs" / "eval.py"
NUM_COCO_IMAGES = 12
BATCH = 8  # the 8 fake devices; 12 images leave a padded last batch


# --- offline stand-ins -----------------------------------------------------------------------


def _random_params(abstract: dict, seed: int) -> dict:
    """He-normal kernels, unit scales and variances, zero biases and means (numpy)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        if path[-1] in ("kernel", "embedding", "class_embed", "position_embed"):
            fan_in = int(np.prod(leaf.shape[:-1])) if path[-1] == "kernel" else leaf.shape[-1]
            value = rng.normal(scale=np.sqrt(2.0 / fan_in), size=leaf.shape)
        elif path[-1] in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        flat[path] = value.astype(np.float32)
    return flat


def _calibrate_batch_norm(module: FIDInception, flat: dict, images: np.ndarray) -> dict:
    """Set every batch norm's mean and variance to those of its input on `images` (one
    train-mode forward, each layer seeing the already-calibrated ones before it)."""
    batch_stats = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, FrozenBatchNorm) and context.method_name == "__call__":
            x = args[0].astype(jnp.float32)
            mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
            batch_stats[context.module.path] = (mean, var)
            return (x - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS)
        return next_fun(*args, **kwargs)

    def forward(params, images):
        with nn.intercept_methods(interceptor):
            module.apply(params, images)
        return dict(batch_stats)

    params = {"params": traverse_util.unflatten_dict(flat)}
    for path, (mean, var) in jax.jit(forward)(params, images).items():
        flat[(*path, "mean")] = np.asarray(mean)
        flat[(*path, "var")] = np.asarray(var)
    return flat


def _to_torch_layout(rules: list[Rule], flat: dict) -> dict[str, np.ndarray]:
    """The state dict that `rules` would read into `flat` (the converters' inverse)."""
    tensors = {}
    for rule in rules:
        value = flat[rule.targets[0]]
        if rule.layout == "conv":
            value = value.transpose(3, 2, 0, 1)
        elif rule.layout == "linear":
            value = value.T
        tensors[rule.key] = np.array(value, order="C")  # keeps 0-d arrays 0-d
    return tensors


def _scene_images(count: int, size: int, seed: int = 5) -> np.ndarray:
    source = ProceduralShapes((size,), "test", seed)
    return np.stack([source[i][f"image_{size}"] for i in range(count)])


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """Random FID Inception weights, batch norm calibrated on shapes and noise at 299 px, as
    a pytorch-fid state dict in safetensors."""
    module = FIDInception()
    abstract = jax.eval_shape(
        lambda rng: nn.meta.unbox(init_inception(module, rng)), jax.random.key(0)
    )["params"]
    images = np.concatenate(
        [
            _scene_images(4, 299),
            np.random.default_rng(0).integers(0, 256, (4, 299, 299, 3), dtype=np.uint8),
        ]
    )
    flat = _calibrate_batch_norm(module, _random_params(abstract, seed=1), images)
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    safetensors.numpy.save_file(_to_torch_layout(inception_rules(abstract), flat), str(path))
    return path


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """A COCO 2014 val layout: 12 shapes scenes framed at several sizes, 2 captions each."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    (root / "annotations").mkdir()
    source = ProceduralShapes((96,), "test", seed=3)
    frames = [(128, 96), (96, 128), (110, 110)]  # (width, height)
    images, annotations = [], []
    for index in range(NUM_COCO_IMAGES):
        example = source[index]
        image_id = 1000 + 7 * index
        width, height = frames[index % len(frames)]
        scene = shapes.scene_from_json(example["scene"])
        canvas = Image.new("RGB", (width, height), shapes.BACKGROUNDS[scene.background])
        canvas.paste(Image.fromarray(example["image_96"]), ((width - 96) // 2, (height - 96) // 2))
        file_name = f"COCO_val2014_{image_id:012d}.png"
        canvas.save(root / "val2014" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for number, text in enumerate((example["caption"], f"a picture of {index} shapes ")):
            annotations.append(
                {"id": 10 * image_id + number, "image_id": image_id, "caption": text}
            )
    payload = {"images": images, "annotations": annotations}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(payload))
    return root


def _fid_stats(inception, coco, out, *extra):
    return cli.main(
        ["fid-stats", f"--inception={inception}", f"--out={out}", f"--coco-dir={coco}", *extra]
    )


def _eval(workdir, preset, *overrides):
    return cli.main(
        ["eval", f"--config={EVAL_CONFIG}:{preset}", f"--workdir={workdir}", *overrides]
    )


@pytest.fixture(scope="module")
def coco_stats(inception_weights, coco_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "coco_val_256.npz"
    assert _fid_stats(inception_weights, coco_dir, out, f"--batch-size={BATCH}") == 0
    return out


# --- COCO protocol ---------------------------------------------------------------------------


def test_caption_draw_is_seeded_one_per_image_and_prefix_stable(coco_dir):
    coco = CocoVal(coco_dir)
    drawn = coco.draw_captions(10, seed=4)
    assert drawn == CocoVal(coco_dir).draw_captions(10, seed=4)
    assert drawn[:6] == coco.draw_captions(6, seed=4)  # a smaller draw is a prefix
    assert len({d.image_id for d in drawn}) == 10  # without replacement
    assert all(d.caption in coco.captions[d.image_id] for d in drawn)
    assert [d.image_id for d in drawn] != [d.image_id for d in coco.draw_captions(10, seed=5)]
    assert all(not d.caption.endswith(" ") for d in coco.draw_captions(12, seed=0))
    with pytest.raises(ValueError, match="cannot draw 13 captions"):
        coco.draw_captions(13)
    image = coco.load_image(drawn[0].image_id, 256)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8


def test_missing_coco_files_are_named(coco_dir, tmp_path, capsys):
    (tmp_path / "val2014").mkdir()
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        CocoVal(tmp_path)
    assert _fid_stats(tmp_path / "w.safetensors", tmp_path, tmp_path / "s.npz") == 2
    assert "annotations/captions_val2014.json is missing" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoVal(tmp_path / "nowhere")


# --- FID ------------------------------------------------------------------------------------


def test_fid_stats_metadata_is_complete(coco_stats, inception_weights):
    mu, sigma, metadata = load_stats(coco_stats)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert 1e-2 < np.sqrt(np.trace(sigma) / 2048) < 1e3  # calibrated: features are O(1)
    from clipgen.weights.inception import load_inception, params_sha256

    assert metadata["weights_sha256"] == params_sha256(load_inception(inception_weights)[1])
    assert metadata["resize_mode"] == "tf1_bilinear"
    assert metadata["resolution"] == 256
    assert metadata["num_samples"] == NUM_COCO_IMAGES
    assert metadata["split"] == "val2014" and metadata["seed"] == 0
    assert metadata["source"]["subset"] == "all captioned images"


def _coco30k(workdir, inception, coco, stats, generator, *extra):
    return _eval(
        workdir,
        "coco30k",
        f"--config.coco_dir={coco}",
        f"--config.inception_weights={inception}",
        f"--config.reference_stats={stats}",
        f"--config.num_captions={NUM_COCO_IMAGES}",
        f"--config.batch_size={BATCH}",
        f"--config.generator.type={generator}",
        *extra,
    )


def test_coco30k_real_images_score_zero_and_noise_does_not(
    coco_stats, inception_weights, coco_dir, tmp_path
):
    _, sigma, _ = load_stats(coco_stats)
    scale = np.trace(sigma)
    fids = {}
    for generator in ("real", "noise"):
        workdir = tmp_path / generator
        assert _coco30k(workdir, inception_weights, coco_dir, coco_stats, generator) == 0
        report = json.loads((workdir / "eval.json").read_text())
        fid = report["evals"]["fid"]
        fids[generator] = fid["metrics"]["fid"]
        assert fid["extras"]["generated"]["num_samples"] == NUM_COCO_IMAGES
        assert fid["extras"]["generated"]["resolution"] == 256
        assert "skipped" in report["evals"]["clip_score"]  # no CLIP path given
        assert report["generator"]["type"] == generator
        generated = load_stats(workdir / "fid_generated.npz")[2]
        assert generated["weights_sha256"] == fid["extras"]["reference"]["weights_sha256"]
        events = event_accumulator.EventAccumulator(str(workdir))
        events.Reload()
        assert "fid/fid" in events.Tags()["tensors"]
    assert abs(fids["real"]) < 1e-3 * scale
    assert fids["noise"] > 0.05 * scale and fids["noise"] > 1e3 * abs(fids["real"])


def test_mismatched_reference_is_refused(coco_stats, inception_weights, coco_dir, tmp_path, capsys):
    status = _coco30k(
        tmp_path,
        inception_weights,
        coco_dir,
        coco_stats,
        "real",
        "--config.evals.fid.resize_mode=clean",
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "resize_mode" in error and "'tf1_bilinear' vs 'clean'" in error
    assert str(coco_stats) in error
    assert not (tmp_path / "eval.json").exists()


def test_kid_needs_and_uses_reference_features(coco_stats, inception_weights, coco_dir, tmp_path):
    captions = {"source": "coco", "coco_dir": str(coco_dir), "count": 8, "seed": 0}
    config = {
        "type": "fid",
        "captions": captions,
        "inception_weights": str(inception_weights),
        "reference_stats": str(coco_stats),
        "kid": True,
        "batch_size": BATCH,
    }
    with pytest.raises(FileNotFoundError, match="coco_val_256.features.npz"):
        registry.build("fid", config)
    out = tmp_path / "stats.npz"
    extra = (f"--batch-size={BATCH}", "--num=8", "--save-features")
    assert _fid_stats(inception_weights, coco_dir, out, *extra) == 0
    assert load_stats(out)[2]["source"]["subset"] == "images of 8 drawn captions"
    evaluator = registry.build("fid", dict(config, reference_stats=str(out)))
    real = evaluator(run.RealImages(evaluator.caption_sources, 256))
    assert set(real) == {"fid", "kid", "kid_std"}
    assert abs(real["fid"]) < 1e-3 * np.trace(load_stats(out)[1])
    noise = evaluator(run.noise_generator(256))
    assert noise["kid"] > max(real["kid"], 0.0)  # 8 identical samples: the estimate is < 0


def test_fid_builds_a_missing_shapes_reference_on_first_use(inception_weights, tmp_path):
    reference = tmp_path / "shapes_test_64.npz"
    config = {
        "type": "fid",
        "captions": {"source": "shapes", "split": "test", "count": 8},
        "inception_weights": str(inception_weights),
        "reference_stats": str(reference),
        "build_reference": True,
        "reference_resolution": 64,
        "batch_size": BATCH,
    }
    evaluator = registry.build("fid", config)
    assert not reference.exists()
    metrics = evaluator(run.RealImages(evaluator.caption_sources, 64))
    _, sigma, metadata = load_stats(reference)
    assert (metadata["split"], metadata["resolution"], metadata["num_samples"]) == ("test", 64, 8)
    assert abs(metrics["fid"]) < 1e-3 * np.trace(sigma)


# --- shapes oracle and the tiny preset ------------------------------------------------------


def test_tiny_preset_oracle_reads_real_renders_and_not_noise(tmp_path):
    assert _eval(tmp_path / "real", "tiny") == 0
    report = json.loads((tmp_path / "real" / "eval.json").read_text())
    oracle = report["evals"]["oracle"]["metrics"]
    assert oracle["test/all/whole"] == 1.0 and oracle["heldout/all/whole"] == 1.0
    assert all(value == 1.0 for value in oracle.values())
    assert {"test/single/colour", "heldout/single/position"} <= set(oracle)
    assert "Inception weights" in report["evals"]["fid"]["skipped"]

    assert _eval(tmp_path / "noise", "tiny", "--config.generator.type=noise") == 0
    noise = json.loads((tmp_path / "noise" / "eval.json").read_text())["evals"]["oracle"]
    assert noise["metrics"]["test/all/whole"] <= 0.125
    assert noise["metrics"]["heldout/all/whole"] <= 0.125
    assert noise["extras"]["counts"]["test/all"] == 8


def test_unknown_generator_and_missing_clip_fail_clearly(tmp_path, capsys):
    assert _eval(tmp_path, "tiny", "--config.generator.type=gan") == 2
    assert "config.generator.type='gan'" in capsys.readouterr().err
    missing_clip = f"--config.demo_workdir={tmp_path / 'no_demo'}"
    assert _eval(tmp_path, "shapes", "--config.generator.type=real", missing_clip) == 2
    assert f"no CLIP run at '{tmp_path / 'no_demo' / 'clip'}'" in capsys.readouterr().err


# --- CLIP score -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A transformers-layout CLIP directory with random weights and a shapes BPE tokenizer."""
    root = tmp_path_factory.mktemp("clip")
    captions = [ProceduralShapes((), "train")[i]["caption"] for i in range(200)]
    tokenizer = Tokenizer.train(captions, num_merges=60, context_length=24)
    tokenizer.save(root / "tokenizer.json")
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    text = dict(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=24,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=tokenizer.end_id,
        pad_token_id=0,
    )
    hf_config = {
        "model_type": "clip",
        "projection_dim": 16,
        "vision_config": dict(vision, intermediate_size=64),
        "text_config": dict(text, intermediate_size=64),
    }
    (root / "config.json").write_text(json.dumps(hf_config))
    vision_config, text_config, projection_dim, _ = clip_weights.clip_config_from_hf(hf_config)
    assert isinstance(vision_config, VisionConfig) and isinstance(text_config, TextConfig)
    module = CLIP(vision_config, text_config, projection_dim)
    abstract = jax.eval_shape(lambda rng: nn.meta.unbox(init_clip(module, rng)), jax.random.key(0))[
        "params"
    ]
    flat = _random_params(abstract, seed=2)
    rules = clip_weights._hf_rules(vision_config, text_config)
    safetensors.numpy.save_file(_to_torch_layout(rules, flat), str(root / "model.safetensors"))
    return root


def test_clip_score_declares_conventions_and_real_images_have_zero_clip_fd(tiny_clip_dir):
    config = {
        "type": "clip_score",
        "captions": {"source": "shapes", "split": "test", "count": 12},
        "clip": {
            "source": "transformers",
            "path": str(tiny_clip_dir),
            "tokenizer": str(tiny_clip_dir / "tokenizer.json"),
        },
        "backbone": "tiny random ViT",
        "scale": 2.5,
        "clamp": "per_sample",
        "caption_prefix": "A photo depicts ",
        "batch_size": BATCH,
    }
    evaluator = registry.build("clip", config)
    real = evaluator(run.RealImages(evaluator.caption_sources, 64))
    extras = evaluator.extras
    assert extras["backbone"] == "tiny random ViT" and extras["scale"] == 2.5
    assert extras["caption_prefix"] == "A photo depicts " and "per sample" in extras["clamp"]
    assert extras["num_samples"] == 12 and 0.0 <= real["clip_score"] <= 2.5
    noise = evaluator(run.noise_generator(64))
    assert abs(real["clip_fd"]) < 1e-6 * max(noise["clip_fd"], 1e-12)
    assert noise["clip_fd"] > 0
    with pytest.raises(ValueError, match="unknown settings"):
        registry.build("clip", dict(config, guidance=3.0))


# --- evaluators by name, for training; convert ---------------------------------------------


def test_evaluators_are_found_by_module_and_a_stage_refuses_generator_ones():
    assert {"fid", "clip_score", "shapes_oracle", "decoder_oracle"} <= set(
        registry.evaluator_types()
    )
    with pytest.raises(ValueError, match="'nosuch' is not an evaluator type; there are: "):
        registry.build("x", {"type": "nosuch"})
    config = denoiser_stage.get_config()
    config.evals.oracle = {"type": "shapes_oracle", "count": 2, "batch_size": 2}
    with pytest.raises(ValueError, match="evals.oracle .shapes_oracle. scores a text-to-image"):
        registry.training_evaluators(config)
    config.evals.oracle = {"type": "upsampler_psnr"}
    with pytest.raises(ValueError, match="a stage evaluator needs the stage's config"):
        registry.build("oracle", config.evals.oracle)


def test_convert_inception_cli(inception_weights, tmp_path):
    torch = pytest.importorskip("torch")
    tensors = safetensors.numpy.load_file(str(inception_weights))
    pth = tmp_path / "pt_inception.pth"
    torch.save({key: torch.from_numpy(value) for key, value in tensors.items()}, pth)
    out = tmp_path / "converted.safetensors"
    assert cli.main(["convert", "inception", f"--pth={pth}", f"--out={out}"]) == 0
    converted = safetensors.numpy.load_file(str(out))
    assert converted.keys() == tensors.keys()
    assert all(np.array_equal(converted[key], tensors[key]) for key in tensors)
    assert cli.main(["convert", "inception", f"--pth={pth}", f"--out={out}"]) == 2  # exists


def test_reused_generations_share_equal_requests_within_their_bound():
    calls = []

    def generate(captions, seed):
        calls.append((tuple(captions), seed))
        rng = np.random.default_rng([seed, len(calls)])
        return rng.integers(0, 256, (len(captions), 4, 4, 3), dtype=np.uint8)

    batch_bytes = 2 * 4 * 4 * 3
    reused = run.ReusedGenerations(generate, max_bytes=2 * batch_bytes)
    first = reused(["a", "b"], 7)
    first[:] = 0  # a caller writing into its images must not change what is reused
    again = reused(["a", "b"], 7)
    assert len(calls) == 1 and reused.reused == 2
    np.testing.assert_array_equal(again, reused(["a", "b"], 7))
    assert again.any()
    reused(["a", "b"], 8)  # another seed is another generation
    reused(["c", "d"], 7)  # the third batch pushes the first out
    assert len(calls) == 3
    reused(["a", "b"], 7)
    assert len(calls) == 4 and calls[-1] == (("a", "b"), 7)
