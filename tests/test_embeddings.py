"""Embedding shards: written atomically, read back, refused when they do not line up."""

import numpy as np
import pytest

from clipgen.data import embeddings


def _batches(ids, width=3):
    for start in range(0, len(ids), 4):
        chunk = np.asarray(ids[start : start + 4])
        yield {
            "ids": chunk,
            "image_embeds": np.stack([np.full(width, i, np.float32) for i in chunk]),
            "text_embeds": np.stack([np.full(width, -i, np.float32) for i in chunk]),
            "text_tokens": np.zeros((len(chunk), 5, 2), np.float32),
            "text_mask": np.ones((len(chunk), 5), np.int32),
        }


def test_shards_round_trip_in_order(tmp_path):
    ids = list(range(100, 123))
    embeddings.write_shards(tmp_path, _batches(ids), shard_size=10, metadata={"split": "x"})
    shards = embeddings.EmbeddingShards(tmp_path)
    assert len(shards) == 23 and shards.manifest["split"] == "x"
    assert len(shards.manifest["shards"]) == 3
    for position, example_id in enumerate(ids):
        row = shards[position]
        assert row["ids"] == example_id and row["image_embeds"][0] == example_id
    shards.check_aligned(np.asarray(ids))


def test_a_shard_missing_one_example_is_refused_naming_it(tmp_path):
    embeddings.write_shards(tmp_path, _batches(list(range(20))), shard_size=10, metadata={})
    path = tmp_path / "shard-00001.npz"
    with np.load(path) as data:
        arrays = {name: np.delete(data[name], 3, axis=0) for name in embeddings.FIELDS}
    np.savez(path, **arrays)  # example id 13 is gone from every field
    with pytest.raises(embeddings.ShardMismatchError, match="first missing id: 13"):
        embeddings.EmbeddingShards(tmp_path)


def test_shards_that_do_not_line_up_with_the_images_are_refused(tmp_path):
    embeddings.write_shards(tmp_path, _batches(list(range(12))), shard_size=5, metadata={})
    shards = embeddings.EmbeddingShards(tmp_path)
    dataset_ids = np.array([0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11])
    with pytest.raises(embeddings.ShardMismatchError, match="first mismatch at id 5"):
        shards.check_aligned(dataset_ids)
    with pytest.raises(embeddings.ShardMismatchError, match="12 embedded vs 11 images"):
        shards.check_aligned(np.arange(11))


def test_an_unfinished_run_is_refused(tmp_path):
    def failing():
        yield from _batches(list(range(8)))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        embeddings.write_shards(tmp_path, failing(), shard_size=4, metadata={})
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(embeddings.ShardMismatchError, match="did not finish"):
        embeddings.EmbeddingShards(tmp_path)
