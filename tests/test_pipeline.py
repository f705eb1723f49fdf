"""The input pipeline: per-epoch permutations, host slices, resumable batch numbers."""

import numpy as np
import pytest

from clipgen.data import pipeline


@pytest.mark.parametrize("length", [1, 2, 7, 64, 1000, 4097])
def test_permute_is_a_bijection_that_depends_on_the_key(length):
    order = pipeline.permute(np.arange(length), length, (0, 0))
    assert sorted(order.tolist()) == list(range(length))
    if length >= 64:
        assert not np.array_equal(order, pipeline.permute(np.arange(length), length, (0, 1)))


def test_batches_cover_each_epoch_once_and_resume_by_number():
    length, batch = 10, 4
    batches = [pipeline.batch_indices(length, k, batch, seed=3) for k in range(5)]
    flat = np.concatenate(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch 0, then epoch 1 begins
    assert sorted(flat[10:20].tolist()) == list(range(10))
    np.testing.assert_array_equal(pipeline.batch_indices(length, 3, batch, seed=3), batches[3])


def test_hosts_read_disjoint_rows_of_the_same_global_batch():
    source = [{"x": i} for i in range(100)]

    def to_arrays(examples):
        return {"x": np.array([e["x"] for e in examples])}

    def first(process):
        return next(pipeline.host_batches(source, to_arrays, 2, 8, process=process))["x"]

    whole = first((0, 1))
    np.testing.assert_array_equal(np.concatenate([first((0, 2)), first((1, 2))]), whole)
    np.testing.assert_array_equal(whole, pipeline.batch_indices(100, 2, 8, seed=0))
    with pytest.raises(ValueError, match="does not divide over 3 hosts"):
        next(pipeline.host_batches(source, to_arrays, 0, 8, process=(0, 3)))


def test_procedural_shapes_matches_the_tfds_examples():
    from clipgen.data import shapes_tfds

    config = shapes_tfds.BUILDER_CONFIGS_BY_NAME["tiny"]
    source = pipeline.ProceduralShapes(config.resolutions, split="test", seed=config.seed)
    for index in range(3):
        tfds_example = shapes_tfds.make_example(config, "test", index)
        assert source[index]["caption"] == tfds_example["caption"]
        assert source[index]["scene"] == tfds_example["scene"]
