"""The CLIP stage: contrastive loss over sharded batches, preprocessing, retrieval, a run."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image
from transformers import CLIPImageProcessor

from clipgen.data import preprocess
from clipgen.eval.retrieval import retrieval_accuracy
from clipgen.models.clip import CLIP, init_clip
from clipgen.train import clip as clip_stage
from clipgen.train import loop

ROOT = Path(__file__).parents[1]


def clip_config(preset="tiny"):
    spec = importlib.util.spec_from_file_location("clip_config", ROOT / "configs" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


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
    config = clip_config()
    tokenizer = clip_stage.make_tokenizer(config)
    model = clip_stage.build_model(config, tokenizer)
    params = nn.meta.unbox(init_clip(model, jax.random.key(0)))["params"]
    stage = clip_stage.make_stage(config)
    batch = next(stage.batches(0, 16))

    def loss_fn(params, batch):
        return stage.loss(params, batch, None)[0]

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    single_loss, single_grads = grad_fn(params, batch)
    sharding = jax.sharding.NamedSharding(mesh8, jax.P("data"))
    sharded_batch = jax.device_put(batch, sharding)
    assert sharded_batch["pixels"].sharding.spec == jax.P("data")
    sharded_loss, sharded_grads = grad_fn(params, sharded_batch)
    assert float(sharded_loss) == pytest.approx(float(single_loss), rel=1e-6)
    for a, b in zip(
        jax.tree_util.tree_leaves(single_grads),
        jax.tree_util.tree_leaves(sharded_grads),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


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
    state = loop.train(config, tmp_path, clip_stage.make_stage(config), jax.devices()[:1])
    assert int(state.step) == config.total_steps
    assert (tmp_path / "checkpoints" / str(config.total_steps)).exists()


def test_embed_writes_shards_the_reader_accepts(tmp_path):
    from clipgen import embed
    from clipgen.data import embeddings, pipeline

    config = clip_config()
    loop.train(config, tmp_path / "clip", clip_stage.make_stage(config), jax.devices()[:1])
    out = embed.run(config, tmp_path / "clip", tmp_path / "emb", "test", 20, 8, shard_size=6)
    shards = embeddings.EmbeddingShards(out)
    source = pipeline.ProceduralShapes((32,), "test", config.data.seed)
    shards.check_aligned(np.array([source[i]["id"] for i in range(20)]))
    # The stored image embedding is the trained model's (EMA) embedding of that example.
    tokenizer, module, params, _ = embed.load_trained_clip(config, tmp_path / "clip")
    inputs = clip_stage.clip_inputs([source[7]], tokenizer, "image_32", 32)
    expected = module.apply({"params": params}, inputs["pixels"], method=CLIP.encode_image)
    np.testing.assert_allclose(shards[7]["image_embeds"], np.asarray(expected)[0], atol=1e-5)
