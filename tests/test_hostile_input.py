"""Hostile input, part one: images, configs and stage checkpoints, each damaged or odd
input tried through the command line (in-process `clipgen.cli.main`: exit status 2 and one
line on stderr naming the input, no traceback) and through the Python API (an InputError
naming the input, or the right result where the input is valid but odd). Weights and
embedding shards have their own files (test_hostile_weights.py, test_hostile_shards.py)."""

from __future__ import annotations

import io
import shutil
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from clipgen import build, cli, stages
from clipgen import config as config_lib
from clipgen.data import image_input
from clipgen.errors import InputError
from clipgen.pipelines import manipulate, unclip
from clipgen.train import loop

import denoiser_stage
from tiny_cascade import tiny_cascade

RNG = np.random.default_rng(0)
PICTURE = (RNG.random((24, 32, 3)) * 255).astype(np.uint8)


def _png(array, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _flipped_middle(data: bytes) -> bytes:
    damaged = bytearray(data)
    for offset in range(len(damaged) // 2, len(damaged) // 2 + 16):
        damaged[offset] ^= 0xFF
    return bytes(damaged)


# --- images ---------------------------------------------------------------------------------

DAMAGED_FILES = {
    "missing": None,
    "directory": "dir",
    "empty": b"",
    "text_named_png": b"a caption, not a picture\n",
    "html_named_png": b"<!doctype html><html><body>404</body></html>",
    "random_bytes": RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "truncated_png": _png(PICTURE)[: len(_png(PICTURE)) // 2],
    "png_signature_only": b"\x89PNG\r\n\x1a\n",
    "png_corrupted_data": _flipped_middle(_png((RNG.random((64, 64, 3)) * 255).astype(np.uint8))),
    "truncated_jpeg": _jpeg(PICTURE)[:200],
    "gif_header_only": b"GIF89a\x10\x00\x10\x00",
    "over_64_megapixels": _png_header_only(9000, 9000),
    "decompression_bomb": _png_header_only(40000, 40000),
    "strip_2000x10": _png(np.zeros((10, 2000, 3), np.uint8)),
}


@pytest.fixture(scope="module")
def damaged_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged")
    paths = {}
    for name, data in DAMAGED_FILES.items():
        path = folder / f"{name}.png"
        if data == "dir":
            path.mkdir()
        elif data is not None:
            path.write_bytes(data)
        paths[name] = path
    return paths


def _fails_in_one_line(argv, capsys, *named):
    assert cli.main([str(arg) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for name in named:
        assert str(name) in err, err
    return err


@pytest.mark.parametrize("name", sorted(DAMAGED_FILES))
def test_cli_refuses_a_damaged_image_before_loading_naming_it(
    name, damaged_images, tmp_path, capsys
):
    bad = damaged_images[name]
    missing_cascade = tmp_path / "no_cascade"  # loading it would fail: the image fails first
    out = tmp_path / "grid.png"
    _fails_in_one_line(
        ["vary", "--checkpoints", missing_cascade, "--image", bad, "--out", out], capsys, bad
    )
    ok = tmp_path / "ok.png"
    ok.write_bytes(_png(PICTURE))
    argv = ["interpolate", "--checkpoints", missing_cascade, "--image-a", ok, "--image-b", bad]
    _fails_in_one_line([*argv, "--out", out], capsys, bad)
    _fails_in_one_line(
        ["op", "union", "--inputs", ok, bad, "--checkpoints", missing_cascade, "--out", out],
        capsys,
        bad,
    )
    assert not out.exists()


def _gray16():
    return (np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)


# (file bytes, the uint8 RGB the reader must give)
ODD_FILES = {
    "grayscale_L": (_png(PICTURE[..., 0]), np.repeat(PICTURE[..., :1], 3, -1)),
    "grayscale_16bit": (
        _png(_gray16()),
        np.repeat(np.round(_gray16() / 257.0).astype(np.uint8)[..., None], 3, -1),
    ),
    "rgba_opaque": (_png(np.dstack([PICTURE, np.full((24, 32), 255, np.uint8)])), PICTURE),
    "rgba_transparent": (
        _png(np.dstack([PICTURE, np.zeros((24, 32), np.uint8)])),
        np.full_like(PICTURE, 255),
    ),
    "rgba_half": (
        _png(np.dstack([PICTURE, np.full((24, 32), 128, np.uint8)])),
        np.round(PICTURE * (128 / 255) + 255 * (1 - 128 / 255)).astype(np.uint8),
    ),
    "gray_alpha_LA": (
        _png(np.dstack([PICTURE[..., 0], np.zeros((24, 32), np.uint8)])),
        np.full_like(PICTURE, 255),
    ),
    "one_bit": (
        _png(PICTURE[..., 0] > 127),
        np.repeat(np.where(PICTURE[..., :1] > 127, 255, 0).astype(np.uint8), 3, -1),
    ),
    "one_pixel": (_png(PICTURE[:1, :1]), PICTURE[:1, :1]),
    "large_4096x3072": (
        _png(np.broadcast_to(PICTURE[:1, :1], (3072, 4096, 3)).copy()),
        np.broadcast_to(PICTURE[:1, :1], (3072, 4096, 3)),
    ),
}


def _palette_with_transparency():
    image = Image.fromarray(PICTURE).quantize(4)
    image.info["transparency"] = 0
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    rgba = np.asarray(image.convert("RGBA"))
    alpha = rgba[..., 3:].astype(np.float32) / 255
    expected = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return buffer.getvalue(), expected


def _cmyk_jpeg():
    image = Image.fromarray(PICTURE).convert("CMYK")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=100)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return buffer.getvalue(), np.asarray(decoded.convert("RGB"))


ODD_FILES["palette_transparency"] = _palette_with_transparency()
ODD_FILES["cmyk_jpeg"] = _cmyk_jpeg()


@pytest.mark.parametrize("name", sorted(ODD_FILES))
def test_odd_but_valid_files_read_as_the_rgb_they_show(name, tmp_path):
    """The reader every image command calls (read before any model loads)."""
    data, expected = ODD_FILES[name]
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    pixels = image_input.read_image(path)
    assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
    np.testing.assert_array_equal(pixels, expected)


@pytest.fixture(scope="module")
def pipe():
    return unclip.from_configs(*tiny_cascade(), devices=jax.devices()[:1])


BAD_ARRAYS = {
    "float_0_to_255": PICTURE.astype(np.float32),
    "float_nan": np.full((24, 32, 3), np.nan, np.float32),
    "float_inf": np.full((24, 32), np.inf),
    "int8_negative": (PICTURE.astype(np.int16) - 128).astype(np.int8),
    "int32_over_16bit": np.full((24, 32), 70000, np.int32),
    "object_dtype": np.full((24, 32, 3), None, object),
    "strings": np.full((24, 32, 3), "x"),
    "two_channels": PICTURE[..., :2],
    "five_channels": np.concatenate([PICTURE, PICTURE[..., :2]], -1),
    "one_dimensional": PICTURE.reshape(-1),
    "zero_height": PICTURE[:0],
    "strip": np.zeros((4, 400, 3), np.uint8),
}
BAD_BATCHES = {
    "one_image_not_a_list": PICTURE,
    "one_grayscale_not_a_list": PICTURE[..., 0],
    "five_dimensional": PICTURE[None, None],
    "empty_list": [],
    "a_path_string": "picture.png",
    "a_pil_image_alone": Image.fromarray(PICTURE),
}


@pytest.mark.parametrize("name", sorted(BAD_ARRAYS))
def test_api_refuses_bad_image_arrays_naming_which(name, pipe):
    with pytest.raises(InputError, match=r"images\[1\]"):
        manipulate.variations(pipe, [PICTURE, BAD_ARRAYS[name]])
    with pytest.raises(InputError, match=r"images\[0\]"):
        pipe.encode_images([BAD_ARRAYS[name]])


@pytest.mark.parametrize("name", sorted(BAD_BATCHES))
def test_api_refuses_what_is_not_a_batch_of_images(name, pipe):
    with pytest.raises(InputError, match="images"):
        pipe.encode_images(BAD_BATCHES[name])


ODD_ARRAYS = {
    "grayscale_2d": (PICTURE[..., 0], np.repeat(PICTURE[..., :1], 3, -1)),
    "grayscale_hw1": (PICTURE[..., :1], np.repeat(PICTURE[..., :1], 3, -1)),
    "float_unit_range": (PICTURE / 255.0, PICTURE),
    "float32_unit_range": ((PICTURE / 255.0).astype(np.float32), PICTURE),
    "uint16": (PICTURE.astype(np.uint16) * 257, PICTURE),
    "int64_0_255": (PICTURE.astype(np.int64), PICTURE),
    "bool_mask": (PICTURE > 127, np.where(PICTURE > 127, 255, 0).astype(np.uint8)),
    "rgba_opaque": (np.dstack([PICTURE, np.full((24, 32), 255, np.uint8)]), PICTURE),
    "rgba_clear": (np.dstack([PICTURE, np.zeros((24, 32), np.uint8)]), np.full_like(PICTURE, 255)),
    "pil_image": (Image.fromarray(PICTURE), PICTURE),
    "pil_grayscale": (Image.fromarray(PICTURE[..., 0]), np.repeat(PICTURE[..., :1], 3, -1)),
    "jax_array": (jax.numpy.asarray(PICTURE), PICTURE),
    "non_contiguous": (np.asfortranarray(PICTURE[:, ::-1]), PICTURE[:, ::-1]),
}


def test_api_reads_odd_but_valid_images_as_their_rgb(pipe):
    """Each odd array embeds exactly as the plain uint8 RGB image it shows; a batch of
    them in one call (NxHxWxC arrays too) gives the same embeddings."""
    names = sorted(ODD_ARRAYS)
    odd = [ODD_ARRAYS[name][0] for name in names]
    plain = np.stack([ODD_ARRAYS[name][1] for name in names])
    for name, image, rgb in zip(names, odd, plain, strict=True):
        np.testing.assert_array_equal(image_input.to_rgb(image), rgb, err_msg=name)
    np.testing.assert_array_equal(
        np.asarray(pipe.encode_images(odd)), np.asarray(pipe.encode_images(plain))
    )
    np.testing.assert_array_equal(
        np.asarray(pipe.decoder_input(odd)), np.asarray(pipe.decoder_input(plain))
    )


# --- configs --------------------------------------------------------------------------------

STAGE_CONFIG = "--config=configs/prior.py:tiny"
BAD_CONFIG_ARGS = {
    "unknown_section": ([STAGE_CONFIG, "--config.nosuch.key=1"], "nosuch"),
    "unknown_key": ([STAGE_CONFIG, "--config.optim.lrr=1"], "lrr"),
    "key_under_a_value": ([STAGE_CONFIG, "--config.total_steps.x=1"], "total_steps"),
    "wrong_type_int": ([STAGE_CONFIG, "--config.total_steps=abc"], "total_steps"),
    "float_for_int": ([STAGE_CONFIG, "--config.batch_size=1.5"], "batch_size"),
    "wrong_tuple_element": ([STAGE_CONFIG, "--config.optim.ema_decays=abc"], "ema_decays"),
    "dict_for_section": ([STAGE_CONFIG, "--config.optim=3"], "optim"),
    "out_of_range": ([STAGE_CONFIG, "--config.optim.ema_decays=(0.9,1.5)"], "ema_decays"),
    "zero_steps": ([STAGE_CONFIG, "--config.total_steps=0"], "total_steps"),
    "bad_policy": ([STAGE_CONFIG, "--config.on_nonfinite=ignore"], "on_nonfinite"),
    "bad_mesh": ([STAGE_CONFIG, "--config.mesh.data=0"], "mesh"),
    "missing_file": (["--config=configs/nosuch.py"], "nosuch.py"),
    "unknown_preset": (["--config=configs/prior.py:huge"], "huge"),
    "no_config": ([], "--config"),
    "two_configs": ([STAGE_CONFIG, "--config=configs/clip.py:tiny"], "--config"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIG_ARGS))
def test_cli_refuses_a_bad_config_in_one_line(name, tmp_path, capsys):
    args, named = BAD_CONFIG_ARGS[name]
    _fails_in_one_line(["train", f"--workdir={tmp_path / 'run'}", *args], capsys, named)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(BAD_CONFIG_ARGS))
def test_api_load_config_and_validate_raise_input_errors(name):
    args, named = BAD_CONFIG_ARGS[name]
    with pytest.raises(InputError, match=named.replace("-", r"\-")):
        config_lib.validate(cli.load_config(args))


def _broken_config_file(tmp_path, text):
    path = tmp_path / "broken.py"
    path.write_text(text)
    return path


BROKEN_FILES = {
    "syntax_error": "def get_config(:\n",
    "raises": "def get_config(arg=None):\n    raise KeyError(arg)\n",
    "no_get_config": "x = 1\n",
    "returns_a_dict": "def get_config(arg=None):\n    return {'stage': 'prior'}\n",
    "imports_missing_module": "import nosuchmodule\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_a_broken_config_file_is_named(name, tmp_path, capsys):
    path = _broken_config_file(tmp_path, BROKEN_FILES[name])
    _fails_in_one_line(["train", f"--workdir={tmp_path / 'run'}", f"--config={path}"], capsys, path)
    with pytest.raises(InputError, match=str(path)):
        cli.load_config([f"--config={path}"])


def test_a_workdir_that_is_a_file_fails_before_anything_loads(tmp_path, capsys):
    occupied = tmp_path / "a_file"
    occupied.write_text("keep me")
    _fails_in_one_line(["train", f"--workdir={occupied}", STAGE_CONFIG], capsys, occupied)
    _fails_in_one_line(
        ["train", f"--workdir={occupied / 'run'}", STAGE_CONFIG], capsys, occupied / "run"
    )
    _fails_in_one_line(["demo", f"--workdir={occupied}"], capsys, occupied)
    config = denoiser_stage.get_config()
    with pytest.raises(InputError, match="a_file"):
        loop.train(config, occupied, denoiser_stage.make_stage(config))
    assert occupied.read_text() == "keep me"


# --- stage checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_slot_run(tmp_path_factory):
    """A cascade directory whose clip slot holds a run (of the test denoiser, saved as the
    clip trainer's): what loading reads before it builds anything."""
    workdir = tmp_path_factory.mktemp("cascade")
    config = denoiser_stage.get_config()
    config.total_steps = 4
    config.stage = "clip"
    loop.train(config, workdir / "clip", denoiser_stage.make_stage(config), jax.devices()[:1])
    return workdir


def _every_step(workdir, change):
    for step in (workdir / "clip" / "checkpoints").iterdir():
        if step.name.isdigit():
            change(step)


def _damage_files(pattern):
    def change(step):
        for path in step.glob(pattern):
            if path.is_file() and path.stat().st_size:
                path.write_bytes(_flipped_middle(path.read_bytes()))

    return change


def _truncate(pattern):
    def change(step):
        for path in step.glob(pattern):
            if path.is_file():
                path.write_bytes(b"")

    return change


def _remove(pattern):
    def change(step):
        for path in step.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return change


def _other_stage(workdir):
    shutil.rmtree(workdir / "clip")
    config = denoiser_stage.get_config()
    config.total_steps = 2
    loop.train(config, workdir / "clip", denoiser_stage.make_stage(config), jax.devices()[:1])


BAD_CHECKPOINTS = {
    "no_workdir": lambda w: shutil.rmtree(w),
    "no_clip_run": lambda w: shutil.rmtree(w / "clip"),
    "checkpoints_is_a_file": lambda w: (
        shutil.rmtree(w / "clip" / "checkpoints"),
        (w / "clip" / "checkpoints").write_text("x"),
    ),
    "no_steps": lambda w: _every_step(w, shutil.rmtree),
    "steps_emptied": lambda w: _every_step(w, _remove("*")),
    "ema_arrays_damaged": lambda w: _every_step(w, _damage_files("ema/**/*")),
    "ema_removed": lambda w: _every_step(w, _remove("ema")),
    "config_damaged": lambda w: _every_step(w, _damage_files("config/*")),
    "config_removed": lambda w: _every_step(w, _remove("config")),
    "checksums_damaged": lambda w: _every_step(w, _damage_files("checksums/*")),
    "ema_arrays_emptied": lambda w: _every_step(w, _truncate("ema/**/*")),
    "run_of_another_stage": _other_stage,
}


@pytest.mark.parametrize("name", sorted(BAD_CHECKPOINTS))
def test_damaged_stage_checkpoints_are_named_with_their_stage(
    name, clip_slot_run, tmp_path, capsys
):
    workdir = tmp_path / "cascade"
    shutil.copytree(clip_slot_run, workdir)
    BAD_CHECKPOINTS[name](workdir)
    spec = stages.get("clip")
    with pytest.raises(InputError, match=r"clip|cascade") as raised:
        build.restore(workdir / "clip", lambda: spec.config("tiny"), "clip")
    assert str(workdir) in str(raised.value)
    with pytest.raises(InputError, match=str(workdir)):
        unclip.load_pipeline(workdir)
    out = tmp_path / "grid.png"
    argv = ["sample", "--checkpoints", workdir, "--captions", "a red circle", "--out", out]
    _fails_in_one_line(argv, capsys, workdir)
    assert not out.exists()
