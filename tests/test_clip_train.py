"""The CLIP stage: contrastive loss over sharded batches, preprocessing, retrieval, a run."""

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
from transformers import CLIPImageProcessor

from clipgen import build
from clipgen.data import preprocess
from clipgen.eval import registry
from clipgen.eval.retrieval import retrieval_accuracy
from clipgen.models.clip import CLIP, VisionConfig, VisionTower
from clipgen.train import clip as clip_stage
from clipgen.train import loop

from sharded import assert_sharded_equals_one_device

ROOT = Path(__file__).parents[1]


def clip_config(preset="tiny"):
    spec = importlib.util.spec_from_file_location("clip_config", ROOT / "configs" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def test_convolutional_stem_is_strided_convolutions_then_a_projection():
    """The stem's patch tokens equal 3x3 stride-2 convolutions with the tower's activation
    written out with lax, then the 1x1 projection; a stem that makes the wrong patch size
    is refused."""
    config = VisionConfig(32, 8, 16, 1, 2, 32, act="gelu", stem_channels=(4, 8, 12))
    tower = VisionTower(config)
    pixels = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = nn.unbox(tower.init(jax.random.key(1), pixels))["params"]
    _, state = tower.apply(
        {"params": params}, pixels, capture_intermediates=lambda m, _: m.name == "patch_embed"
    )
    [tokens] = state["intermediates"]["patch_embed"]["__call__"]
    x = pixels
    for index in range(3):
        conv = params[f"stem_{index}"]
        x = jax.lax.conv_general_dilated(
            x, conv["kernel"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.gelu(x + conv["bias"], approximate=False)
    expected = x @ params["patch_embed"]["kernel"][0, 0]
    assert tokens.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="log2\\(patch_size\\)"):
        VisionConfig(32, 8, 16, 1, 2, 32, stem_channels=(4, 8))


def test_contrastive_loss_matches_its_definition():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, 8)).astype(np.float32)
    texts = rng.standard_normal((5, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    loss, metrics = clip_stage.contrastive_loss(images, texts, np.log(10.0))
    logits = 10.0 * images @ texts.T

    def cross_entropy(rows):
        return np.mean(np.log(np.exp(rows).sum(1)) - np.diag(rows))

    expected = (cross_entropy(logits) + cross_entropy(logits.T)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The temperature is clamped at 100, as OpenAI's.
    clamped, _ = clip_stage.contrastive_loss(images, texts, np.log(1e4))
    assert float(clamped) == pytest.approx(
        float(clip_stage.contrastive_loss(images, texts, np.log(100.0))[0])
    )


def test_loss_and_gradient_on_a_sharded_batch_equal_one_device(mesh8):
    stage = clip_stage.make_stage(clip_config())
    assert_sharded_equals_one_device(
        stage, mesh8, 16, loss_rtol=1e-6, grad_rtol=1e-4, grad_atol=1e-6
    )


def test_preprocessing_equals_transformers_clip_image_processor():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    ours = preprocess.clip_preprocess([image], 32)[0]
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    theirs = processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    # Resampling implementations differ by a grey level at most; compare in pixel units.
    difference = np.abs(ours - theirs.transpose(1, 2, 0)) * preprocess.CLIP_STD * 255
    assert difference.max() <= 1.01 and ours.shape == (32, 32, 3)


def test_retrieval_counts_identical_scenes_as_correct():
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0, 0.1, 1], [0, 0, 1]], dtype=np.float32)
    # Caption 1 retrieves image 2; right only when both show the same thing.
    assert retrieval_accuracy(images, texts, ["a", "b", "c"])["text_to_image_top1"] == 2 / 3
    assert retrieval_accuracy(images, texts, ["a", "b", "b"])["text_to_image_top1"] == 1.0


def test_tiny_preset_trains_and_evaluates(tmp_path):
    config = clip_config()
    evaluators = registry.training_evaluators(config)
    stage = clip_stage.make_stage(config)
    state = loop.train(config, tmp_path, stage, jax.devices()[:1], evaluators=evaluators)
    assert int(state.step) == config.total_steps
    assert (tmp_path / "checkpoints" / str(config.total_steps)).exists()
    # The loop ran the retrieval evaluator on the EMA parameters at eval_every (step 4).
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    logged = events.Tensors("test/text_to_image_top1")
    assert [event.step for event in logged] == [config.eval_every]
    retrieval = registry.build("retrieval", config.evals.retrieval, stage_config=config)
    scores = retrieval(next(iter(state.ema.values())))
    assert set(scores) == {
        f"{split}/{kind}_top1"
        for split in ("test", "heldout")
        for kind in ("text_to_image", "image_to_text")
    }
    logged_value = float(tensor_util.make_ndarray(logged[0].tensor_proto))
    assert logged_value == pytest.approx(scores["test/text_to_image_top1"])


def test_embed_writes_shards_the_reader_accepts(tmp_path):
    from clipgen.data import embeddings, pipeline
    from clipgen.pipelines import embed

    config = clip_config()
    loop.train(config, tmp_path / "clip", clip_stage.make_stage(config), jax.devices()[:1])
    out = embed.run(tmp_path / "clip", tmp_path / "emb", "test", 20, 8, shard_size=6)
    shards = embeddings.EmbeddingShards(out)
    source = pipeline.ProceduralShapes((32,), "test", config.data.seed)
    shards.check_aligned(np.array([source[i]["id"] for i in range(20)]))
    # The stored image embedding is the trained model's (EMA) embedding of that example.
    trained = build.restore(tmp_path / "clip")
    clip = build.clip_model(trained.config, trained.params)
    inputs = build.clip_inputs([source[7]], clip.tokenizer, "image_32", 32)
    expected = clip.module.apply(
        {"params": clip.params}, inputs["pixels"], method=CLIP.encode_image
    )
    np.testing.assert_allclose(shards[7]["image_embeds"], np.asarray(expected)[0], atol=1e-5)
