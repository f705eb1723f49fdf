"""Hostile weights: a deterministic fuzz of damaged and odd public pipeline folders.

A tiny random Karlo folder (`UnCLIPPipeline.save_pretrained`, tests/public_folders.py) is
copied and damaged one way per case: safetensors files emptied, truncated, overwritten with
garbage or given a doctored header (length, JSON, dtype, shape, data offsets), tensors made
NaN, inf, integer, mis-shaped, missing or extra, config.json / model_index.json /
scheduler_config.json / tokenizer files broken or holding fields of the wrong type, a
component folder or a shard gone. Each damaged folder goes through two entry points, the
Python API (`unclip.load_pipeline`) and the CLI (`clipgen sample --checkpoints FOLDER`),
and must fail with an InputError whose one-line message names the damaged file (and the
tensor key or config field): the CLI prints that line and exits 2. Odd but valid folders
(bfloat16, float16 or float64 weights, checkpoints sharded by diffusers and transformers
themselves, an integer buffer, reordered tensors with metadata) must load to the values of
the float32 folder (rounded as their dtype rounds them).

Every case adds its outcome to OUTCOMES; the last test prints the counts (tried, clear
errors, correct handling, tracebacks, silent) and requires no traceback and no silent load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import public_folders  # noqa: E402  (needs torch and diffusers)
import safetensors.torch  # noqa: E402

from clipgen import cli  # noqa: E402
from clipgen.pipelines import unclip  # noqa: E402

from fuzz_outcomes import check_outcome_counts, outcome_of  # noqa: E402

PRIOR = "prior/diffusion_pytorch_model.safetensors"
DECODER = "decoder/diffusion_pytorch_model.safetensors"
SUPER_RES = "super_res_first/diffusion_pytorch_model.safetensors"
TEXT_PROJ = "text_proj/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"
PRIOR_INDEX = "prior/diffusion_pytorch_model.safetensors.index.json"

OUTCOMES: list[tuple[str, str, str]] = []  # (entry point, case, outcome)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    """(the diffusers pipeline, its pristine folder)."""
    return public_folders.karlo_pipeline(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def baseline(karlo):
    """Every component's parameters as the pristine float32 folder loads them."""
    return _params(unclip.load_pipeline(karlo[1]))


def _params(pipe) -> dict[str, dict[str, np.ndarray]]:
    """{component: {parameter path: array}} of a loaded cascade."""
    (super_res,) = pipe.upsamplers
    trees = {
        "text_encoder": pipe.clip.params,
        "prior": pipe.prior.params,
        "decoder": pipe.decoder.params,
        "super_res_first": super_res.params,
        "super_res_last": super_res.last_step_params,
    }
    return {
        name: {
            jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }
        for name, tree in trees.items()
    }


# --- damage -------------------------------------------------------------------------------


def _split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed here, independently of clipgen) and data."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header: dict | list | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def header(rel: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit the header of safetensors file `rel` (edit returns a replacement, or None)."""

    def damage(folder: Path) -> None:
        path = folder / rel
        parsed, data = _split(path)
        replaced = edit(parsed)
        path.write_bytes(_join(parsed if replaced is None else replaced, data))

    return damage


def tensors(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edit the tensors of safetensors file `rel` (read and written by safetensors)."""

    def damage(folder: Path) -> None:
        path = folder / rel
        values = dict(safetensors.numpy.load_file(str(path)))
        edit(values)
        safetensors.numpy.save_file(values, str(path), metadata={"format": "pt"})

    return damage


def config(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / rel
        values = json.loads(path.read_text())
        edit(values)
        path.write_text(json.dumps(values))  # NaN is written as NaN, as Python allows

    return damage


def write(rel: str, content: bytes | str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (folder / rel).write_bytes(data)

    return damage


def truncate(rel: str, keep: float | int) -> Callable[[Path], None]:
    """Keep the first `keep` bytes (a float: that fraction of the file)."""

    def damage(folder: Path) -> None:
        path = folder / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])

    return damage


def overwrite(rel: str, offset: int, data: bytes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / rel
        raw = bytearray(path.read_bytes())
        raw[offset : offset + len(data)] = data
        path.write_bytes(bytes(raw))

    return damage


def remove(rel: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def both(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        for one in damages:
            one(folder)

    return damage


def _set(values: dict, key: str, value) -> None:
    values[key] = value


def _pop(values: dict, key: str) -> None:
    values.pop(key)


def _with_nan(values: dict, key: str, value: float) -> None:
    array = values[key].copy()
    array.reshape(-1)[array.size // 2] = value
    values[key] = array


def _overlap(parsed: dict) -> None:
    """The second tensor's data starts inside the first's (sizes kept)."""
    first, second = sorted(
        (k for k in parsed if k != "__metadata__"), key=lambda k: parsed[k]["data_offsets"][0]
    )[:2]
    begin, end = parsed[second]["data_offsets"]
    start = parsed[first]["data_offsets"][0]
    parsed[second]["data_offsets"] = [start, start + end - begin]


def _pickled_weights(folder: Path) -> None:
    """The prior's weights as a torch pickle (.bin) only: clipgen never unpickles."""
    path = folder / PRIOR
    state = safetensors.torch.load_file(str(path))
    torch.save(state, folder / "prior/diffusion_pytorch_model.bin")
    path.unlink()


def _sharded_index_without_shard(folder: Path) -> None:
    keys = list(safetensors.numpy.load_file(str(folder / PRIOR)))
    (folder / PRIOR).unlink()
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    (folder / PRIOR_INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(keys, shard)}))


def _duplicate_key(folder: Path) -> None:
    path = folder / "text_encoder/config.json"
    text = path.read_text().rstrip().removesuffix("}")
    path.write_text(text + ', "hidden_size": 16}')


@dataclasses.dataclass(frozen=True)
class Damaged:
    name: str
    damage: Callable[[Path], None]
    names: tuple[str, ...]  # what the message must name: the file, then key or field


RNG_BYTES = np.random.default_rng(22).integers(0, 256, 4096, dtype=np.uint8).tobytes()

DAMAGED = [
    # safetensors files and headers
    Damaged("prior-weights-empty", write(PRIOR, b""), (PRIOR, "0 bytes")),
    Damaged("text-weights-7-bytes", truncate(TEXT, 7), (TEXT, "7 bytes")),
    Damaged("decoder-weights-truncated-to-half", truncate(DECODER, 0.5), (DECODER, "truncated")),
    Damaged("prior-weights-last-4-bytes-cut", truncate(PRIOR, -4), (PRIOR, "truncated")),
    Damaged("text-weights-random-garbage", write(TEXT, RNG_BYTES), (TEXT,)),
    Damaged(
        "text-proj-header-length-past-end",
        overwrite(TEXT_PROJ, 0, struct.pack("<Q", 10**9)),
        (TEXT_PROJ, "header length"),
    ),
    Damaged("prior-header-not-json", overwrite(PRIOR, 8, b"#"), (PRIOR, "not JSON")),
    Damaged("prior-header-a-list", header(PRIOR, lambda h: [h]), (PRIOR, "not an object")),
    Damaged(
        "decoder-unknown-dtype",
        header(DECODER, lambda h: h["conv_in.weight"].update(dtype="F31")),
        (DECODER, "'conv_in.weight'", "F31"),
    ),
    Damaged(
        "decoder-negative-shape",
        header(DECODER, lambda h: h["conv_in.weight"]["shape"].__setitem__(0, -16)),
        (DECODER, "'conv_in.weight'", "shape"),
    ),
    Damaged(
        "super-res-shape-a-string",
        header(SUPER_RES, lambda h: h["conv_in.weight"].update(shape="16x6x3x3")),
        (SUPER_RES, "'conv_in.weight'", "shape"),
    ),
    Damaged(
        "super-res-offsets-wrong-size",
        header(SUPER_RES, lambda h: h["conv_out.bias"]["data_offsets"].__setitem__(1, 0)),
        (SUPER_RES, "'conv_out.bias'", "data_offsets"),
    ),
    Damaged(
        "super-res-offsets-past-the-data",
        header(
            SUPER_RES,
            lambda h: h["conv_out.bias"].update(data_offsets=[10**8, 10**8 + 12]),
        ),
        (SUPER_RES, "'conv_out.bias'", "ends at byte"),
    ),
    Damaged("text-proj-offsets-overlap", header(TEXT_PROJ, _overlap), (TEXT_PROJ, "overlap")),
    # tensor values
    Damaged(
        "prior-nan",
        tensors(PRIOR, lambda t: _with_nan(t, "positional_embedding", np.nan)),
        (PRIOR, "positional_embedding", "NaN"),
    ),
    Damaged(
        "decoder-inf",
        tensors(DECODER, lambda t: _with_nan(t, "conv_out.bias", np.inf)),
        (DECODER, "conv_out.bias", "NaN or inf"),
    ),
    Damaged(
        "super-res-float64-beyond-float32",
        tensors(
            SUPER_RES,
            lambda t: _set(t, "conv_in.bias", np.full_like(t["conv_in.bias"], 1e300, np.float64)),
        ),
        (SUPER_RES, "conv_in.bias", "NaN or inf"),
    ),
    Damaged(
        "text-integer-tensor",
        tensors(
            TEXT,
            lambda t: _set(
                t, "text_projection.weight", t["text_projection.weight"].astype(np.int32)
            ),
        ),
        (TEXT, "text_projection.weight", "not floating point"),
    ),
    Damaged(
        "text-proj-transposed-tensor",
        tensors(
            TEXT_PROJ,
            lambda t: _set(t, "embedding_proj.weight", t["embedding_proj.weight"].T.copy()),
        ),
        (TEXT_PROJ, "embedding_proj.weight", "shape mismatches"),
    ),
    Damaged(
        "prior-missing-tensor", tensors(PRIOR, lambda t: _pop(t, "clip_std")), (PRIOR, "clip_std")
    ),
    Damaged(
        "decoder-extra-tensor",
        tensors(DECODER, lambda t: _set(t, "stray.weight", np.zeros(3, np.float32))),
        (DECODER, "stray.weight"),
    ),
    Damaged(
        "prior-weights-a-directory",
        both(remove(PRIOR), lambda f: (f / PRIOR).mkdir()),
        ("prior", "diffusion_pytorch_model.safetensors"),
    ),
    Damaged(
        "prior-weights-pickle-only", _pickled_weights, ("prior", "diffusion_pytorch_model.bin")
    ),
    Damaged(
        "prior-index-names-a-missing-shard",
        _sharded_index_without_shard,
        (PRIOR_INDEX, "diffusion_pytorch_model-00001-of-00001.safetensors"),
    ),
    # config files
    Damaged(
        "prior-config-not-json",
        truncate("prior/config.json", 0.5),
        ("prior/config.json", "not valid JSON"),
    ),
    Damaged(
        "decoder-config-a-list",
        write("decoder/config.json", "[1, 2]"),
        ("decoder/config.json", "array"),
    ),
    Damaged(
        "text-config-missing",
        remove("text_encoder/config.json"),
        ("text_encoder/config.json", "does not exist"),
    ),
    Damaged(
        "text-hidden-size-a-string",
        config("text_encoder/config.json", lambda c: _set(c, "hidden_size", "16")),
        ("text_encoder/config.json", "'hidden_size'"),
    ),
    Damaged(
        "text-config-duplicate-key", _duplicate_key, ("text_encoder/config.json", "'hidden_size'")
    ),
    Damaged(
        "decoder-block-out-channels-abc",
        config("decoder/config.json", lambda c: _set(c, "block_out_channels", "abc")),
        ("decoder/config.json", "'block_out_channels'"),
    ),
    Damaged(
        "prior-num-layers-a-float",
        config("prior/config.json", lambda c: _set(c, "num_layers", 2.0)),
        ("prior/config.json", "'num_layers'"),
    ),
    Damaged(
        "prior-activation-unknown",
        config("prior/config.json", lambda c: _set(c, "time_embed_act_fn", "sigmoidish")),
        ("prior/config.json", "time_embed_act_fn"),
    ),
    Damaged(
        "super-res-layers-per-block-a-bool",
        config("super_res_first/config.json", lambda c: _set(c, "layers_per_block", True)),
        ("super_res_first/config.json", "'layers_per_block'"),
    ),
    Damaged(
        "decoder-norm-eps-nan",
        config("decoder/config.json", lambda c: _set(c, "norm_eps", float("nan"))),
        ("decoder/config.json", "'norm_eps'"),
    ),
    Damaged(
        "decoder-sample-size-missing",
        config("decoder/config.json", lambda c: _pop(c, "sample_size")),
        ("decoder/config.json", "'sample_size'"),
    ),
    Damaged(
        "text-proj-time-embed-dim-null",
        config("text_proj/config.json", lambda c: _set(c, "time_embed_dim", None)),
        ("text_proj/config.json", "'time_embed_dim'"),
    ),
    Damaged(
        "prior-scheduler-steps-a-string",
        config(
            "prior_scheduler/scheduler_config.json",
            lambda c: _set(c, "num_train_timesteps", "1000"),
        ),
        ("prior_scheduler/scheduler_config.json", "'num_train_timesteps'"),
    ),
    Damaged(
        "decoder-scheduler-config-missing",
        remove("decoder_scheduler/scheduler_config.json"),
        ("decoder_scheduler/scheduler_config.json",),
    ),
    # the pipeline folder
    Damaged(
        "model-index-not-json",
        truncate("model_index.json", 0.3),
        ("model_index.json", "not valid JSON"),
    ),
    Damaged(
        "model-index-component-a-string",
        config("model_index.json", lambda c: _set(c, "decoder", "UNet2DConditionModel")),
        ("model_index.json", "'decoder'"),
    ),
    Damaged("decoder-folder-missing", remove("decoder"), ("decoder is missing",)),
    Damaged(
        "tokenizer-json-truncated",
        truncate("tokenizer/tokenizer.json", 0.5),
        ("tokenizer/tokenizer.json",),
    ),
    Damaged(
        "tokenizer-max-length-a-string",
        config("tokenizer/tokenizer_config.json", lambda c: _set(c, "model_max_length", "77")),
        ("tokenizer/tokenizer_config.json", "'model_max_length'"),
    ),
    Damaged(
        "tokenizer-context-shorter-than-the-prior",
        config("tokenizer/tokenizer_config.json", lambda c: _set(c, "model_max_length", 50)),
        ("karlo", "num_embeddings"),
    ),
]

# The CLI runs every damaged case with a different file or class of damage as the API.
CLI_CASES = [
    "prior-weights-empty",
    "decoder-weights-truncated-to-half",
    "text-weights-random-garbage",
    "text-proj-header-length-past-end",
    "prior-header-not-json",
    "decoder-unknown-dtype",
    "super-res-offsets-wrong-size",
    "text-proj-offsets-overlap",
    "prior-nan",
    "text-integer-tensor",
    "prior-missing-tensor",
    "prior-weights-pickle-only",
    "prior-index-names-a-missing-shard",
    "prior-config-not-json",
    "text-hidden-size-a-string",
    "decoder-block-out-channels-abc",
    "prior-num-layers-a-float",
    "super-res-layers-per-block-a-bool",
    "prior-scheduler-steps-a-string",
    "model-index-not-json",
    "decoder-folder-missing",
    "tokenizer-json-truncated",
]
BY_NAME = {case.name: case for case in DAMAGED}


def _damaged_copy(karlo, tmp_path: Path, case: Damaged) -> Path:
    folder = tmp_path / "karlo"
    shutil.copytree(karlo[1], folder)
    case.damage(folder)
    return folder


def _named(message: str, folder: Path, names: tuple[str, ...]) -> bool:
    """Whether a one-line message names every one of `names` (paths inside `folder`)."""
    return "\n" not in message.strip() and all(name in message for name in names)


@pytest.mark.parametrize("case", DAMAGED, ids=lambda case: case.name)
def test_python_api_refuses_damaged_folder(karlo, tmp_path, case):
    folder = _damaged_copy(karlo, tmp_path, case)
    outcome, message = outcome_of(
        lambda: unclip.load_pipeline(folder), lambda text: _named(text, folder, case.names)
    )
    OUTCOMES.append(("weights api", case.name, outcome))
    assert outcome == "clear", f"{case.name}: {outcome}: {message}"


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_refuses_damaged_folder_in_one_line(karlo, tmp_path, capsys, name):
    case = BY_NAME[name]
    folder = _damaged_copy(karlo, tmp_path, case)
    out = tmp_path / "grid.png"
    try:
        status = cli.main(
            [
                "sample",
                "--checkpoints",
                str(folder),
                "--captions",
                "a red circle",
                "--out",
                str(out),
            ]
        )
    except BaseException as error:  # noqa: BLE001 - what the fuzz counts
        status = f"raised {type(error).__name__}: {error}"
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if status == 0 or out.exists():
        outcome = "silent"
    elif status != 2 or "Traceback" in err or len(lines) != 1:
        outcome = "traceback"
    else:
        outcome = "clear" if _named(lines[0], folder, case.names) else "unclear"
    OUTCOMES.append(("weights cli", name, outcome))
    assert outcome == "clear", f"{name}: {outcome}: status {status}, stderr {err!r}"
    assert lines[0].startswith("clipgen sample: ")


# --- odd but valid --------------------------------------------------------------------------


def _retyped(rel: str, dtype: torch.dtype) -> Callable[[Path], None]:
    """Re-save safetensors file `rel` with every tensor cast to `dtype` (by torch)."""

    def change(folder: Path) -> None:
        path = folder / rel
        state = {k: v.to(dtype) for k, v in safetensors.torch.load_file(str(path)).items()}
        safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})

    return change


def _resharded(component: str, attribute: str, single: str) -> Callable:
    """The component re-saved by diffusers / transformers themselves in 20 kB shards."""

    def change(folder: Path, reference) -> None:
        (folder / component / single).unlink()
        model = getattr(reference, attribute)
        model.save_pretrained(folder / component, safe_serialization=True, max_shard_size="20KB")
        assert len(list((folder / component).glob("*.safetensors"))) > 1

    return change


def _position_ids(folder: Path) -> None:
    """transformers' integer position_ids buffer beside the text encoder's weights."""
    path = folder / TEXT
    values = dict(safetensors.numpy.load_file(str(path)))
    values["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    safetensors.numpy.save_file(values, str(path))


def _reordered(folder: Path) -> None:
    """The decoder's tensors written in reverse order, with metadata and a padded header, by
    a writer of the format written here (not safetensors')."""
    path = folder / DECODER
    parsed, data = _split(path)
    keys = [k for k in parsed if k != "__metadata__"]
    header_out, chunks, offset = {"__metadata__": {"format": "pt", "by": "hand"}}, [], 0
    for key in reversed(keys):
        begin, end = parsed[key]["data_offsets"]
        header_out[key] = dict(parsed[key], data_offsets=[offset, offset + end - begin])
        chunks.append(data[begin:end])
        offset += end - begin
    text = json.dumps(header_out)
    text += " " * (-(len(text) + 8) % 8)  # padded to 8 bytes, as safetensors pads
    path.write_bytes(_join(text, b"".join(chunks)))


def _unknown_private_fields(folder: Path) -> None:
    for rel in ("prior/config.json", "decoder/config.json"):
        config(rel, lambda c: c.update(_name_or_path="somewhere", _note=[1, 2]))(folder)


@dataclasses.dataclass(frozen=True)
class Odd:
    name: str
    change: Callable
    rounding: dict[str, object]  # parameter path prefix -> the dtype its values pass through
    uses_reference: bool = False


ODD = [
    Odd("prior-bfloat16", _retyped(PRIOR, torch.bfloat16), {"prior": ml_dtypes.bfloat16}),
    Odd("decoder-float16", _retyped(DECODER, torch.float16), {"decoder['unet']": np.float16}),
    Odd("text-float64", _retyped(TEXT, torch.float64), {}),
    Odd(
        "prior-sharded-by-diffusers",
        _resharded("prior", "prior", "diffusion_pytorch_model.safetensors"),
        {},
        uses_reference=True,
    ),
    Odd(
        "text-sharded-by-transformers",
        _resharded("text_encoder", "text_encoder", "model.safetensors"),
        {},
        uses_reference=True,
    ),
    Odd("text-int64-position-ids-buffer", _position_ids, {}),
    Odd("decoder-tensors-reordered-with-metadata", _reordered, {}),
    Odd("configs-with-private-fields", _unknown_private_fields, {}),
]


@pytest.mark.parametrize("case", ODD, ids=lambda case: case.name)
def test_python_api_loads_odd_but_valid_folder(karlo, baseline, tmp_path, case):
    folder = tmp_path / "karlo"
    shutil.copytree(karlo[1], folder)
    if case.uses_reference:
        case.change(folder, karlo[0])
    else:
        case.change(folder)
    try:
        loaded = _params(unclip.load_pipeline(folder))
    except Exception as error:  # noqa: BLE001 - what the fuzz counts
        OUTCOMES.append(("weights api", case.name, "traceback"))
        raise AssertionError(f"{case.name} was refused: {error}") from error
    differing = []
    for component, params in baseline.items():
        for path, value in params.items():
            casts = [
                t for prefix, t in case.rounding.items() if f"{component}{path}".startswith(prefix)
            ]
            expected = value.astype(casts[0]).astype(np.float32) if casts else value
            if not np.array_equal(loaded[component][path], expected):
                differing.append(f"{component}{path}")
    OUTCOMES.append(("weights api", case.name, "silent" if differing else "handled"))
    assert not differing, f"{case.name} loaded different values: {differing[:5]}"


def test_zz_outcome_counts():
    """The fuzz's note: per entry point, cases tried, clear InputErrors, correct handling,
    tracebacks and silent loads (the last two must be 0)."""
    check_outcome_counts(OUTCOMES)
