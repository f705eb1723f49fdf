"""Caption-image sources for multi-host input: the shapes tfds builder, an image folder and
webdataset-style tar shards read by index; each host reads disjoint rows whose union is
the global batch; a two-process CLIP run from the tfds builder, killed and resumed, ends
where the uninterrupted one does."""

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest
from PIL import Image

from clipgen.data import pipeline, preprocess, shapes_tfds, sources

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    shapes_tfds.build(str(directory), "tiny")
    return directory


def _pairs(count=5):
    rng = np.random.default_rng(0)
    return [
        (rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8), f"caption {i}")
        for i in range(count)
    ]


def test_folder_and_tar_shards_give_the_same_resized_examples(tmp_path):
    pairs = _pairs()
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (image, caption) in enumerate(pairs):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
    (folder / "orphan.png").write_bytes((folder / "000.png").read_bytes())  # no caption: skipped
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard, members in enumerate((pairs[:3], pairs[3:])):
        with tarfile.open(shards / f"shard-{shard:05d}.tar", "w") as archive:
            for i, (image, caption) in enumerate(members, start=3 * shard):
                for name, data in (
                    (f"{i:03d}.png", _png(image)),
                    (f"{i:03d}.txt", caption.encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    by_folder = sources.open_source(f"folder:{folder}", (16, 8))
    by_tar = sources.open_source(f"wds:{shards}", (16, 8))
    assert len(by_folder) == len(by_tar) == len(pairs)
    for i, (image, caption) in enumerate(pairs):
        a, b = by_folder[i], by_tar[i]
        assert a["caption"] == b["caption"] == caption and a["id"] == b["id"] == i
        for size in (16, 8):
            expected = preprocess.resize_and_crop(image, size)
            np.testing.assert_array_equal(a[f"image_{size}"], expected)
            np.testing.assert_array_equal(b[f"image_{size}"], expected)


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tfds_source_reads_the_builders_examples_and_hosts_split_its_batches(tfds_dir):
    source = sources.open_source(f"tfds:{tfds_dir}:tiny", (32,), "train")
    procedural = pipeline.ProceduralShapes((32,), "train", 0)
    assert len(source) == 8
    for i in range(len(source)):
        assert source[i]["caption"] == procedural[i]["caption"]
        np.testing.assert_array_equal(source[i]["image_32"], procedural[i]["image_32"])

    def ids(examples):
        return {"ids": np.array([e["id"] for e in examples])}

    def host(process, first=0, count=5):
        batches = pipeline.host_batches(source, ids, first, 4, seed=1, process=process)
        return [next(batches)["ids"] for _ in range(count)]

    whole = host((0, 1))
    for number, (a, b) in enumerate(zip(host((0, 2)), host((1, 2)), strict=True)):
        assert not set(a) & set(b)  # disjoint rows
        np.testing.assert_array_equal(np.concatenate([a, b]), whole[number])  # the global batch
    for resumed, straight in zip(host((1, 2), first=3, count=2), host((1, 2))[3:], strict=True):
        np.testing.assert_array_equal(resumed, straight)
    with pytest.raises(FileNotFoundError, match="clipgen shapes --data-dir"):
        sources.open_source(f"tfds:{tfds_dir / 'none'}:tiny", (32,))
    with pytest.raises(ValueError, match="not at \\[16\\] px"):
        sources.open_source(f"tfds:{tfds_dir}:tiny", (16,))


def _clip_run(workdir, tfds_dir, port, *, stderr=subprocess.DEVNULL):
    """Two processes of `clipgen train` on the tiny CLIP, reading the tfds builder."""
    args = [
        "--config=configs/clip.py:tiny",
        f"--config.data.source=tfds:{tfds_dir}:tiny",
        "--config.total_steps=8",
        "--config.checkpoint.every=1",
        "--config.eval_every=0",
        "--config.mesh.data=-1",
    ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "clipgen.cli", "train", f"--workdir={workdir}", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=dict(
                os.environ,
                TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(rank),
            ),
        )
        for rank in range(2)
    ]


def _wait(workers):
    try:
        return [worker.wait(timeout=400) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()


@pytest.mark.slow
def test_two_processes_from_the_tfds_builder_resume_after_a_kill_with_the_same_batches(
    tfds_dir, tmp_path
):
    assert _wait(_clip_run(tmp_path / "straight", tfds_dir, portpicker.pick_unused_port())) == [
        0,
        0,
    ]
    victims = _clip_run(tmp_path / "killed", tfds_dir, portpicker.pick_unused_port())
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(p.name.isdigit() for p in checkpoints.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    _wait(victims)
    killed_at = max(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
    assert killed_at < 8, "the run ended before the kill: nothing was tested"
    assert _wait(_clip_run(tmp_path / "killed", tfds_dir, portpicker.pick_unused_port())) == [0, 0]

    from clipgen import cli
    from clipgen.train import clip as clip_stage
    from clipgen.train import loop

    config = cli.load_config(
        ["--config=configs/clip.py:tiny", f"--config.data.source=tfds:{tfds_dir}:tiny",
         "--config.total_steps=8", "--config.eval_every=0"]
    )  # fmt: skip
    stage = clip_stage.make_stage(config)
    straight = loop.train(config, tmp_path / "straight", stage, jax.devices()[:1])
    resumed = loop.train(config, tmp_path / "killed", stage, jax.devices()[:1])
    assert int(resumed.step) == 8
    for part in ("params", "ema", "opt_state"):
        for a, b in zip(
            jax.tree.leaves(getattr(straight, part)),
            jax.tree.leaves(getattr(resumed, part)),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
