"""Hostile embedding shards: a deterministic fuzz of damaged and odd shard directories.

Embeddings of the prior's `tiny` widths are written for train, test and heldout by the
project's own writer (`embeddings.write_shards`), copied, and damaged one way per case: the
manifest missing, broken or lying; a shard missing, empty, truncated, garbage, a bare .npy,
overwritten in the middle (the archive's checksums), missing a field, of another width,
holding NaN, integers or an all-zero embedding; ids repeated within or across shards or
out of line with the manifest; the test split's shards placed under train/. Each damaged
directory goes through two entry points, the Python API (`embeddings.load_split(..., split=
"train")`) and the CLI (`clipgen train --config=configs/prior.py:tiny
--config.data.embeddings=DIR`), and must fail with an InputError whose one-line message
names the damaged file (and field); the CLI prints that line, exits 2 and compiles
nothing first. Odd but valid directories (float16 or float64 embeddings, a boolean mask,
one example a shard, ids in any order, an extra field, a manifest without the recorded
shapes) must load to the values written.

Every case adds its outcome to OUTCOMES; the last test prints the counts (tried, clear
errors, correct handling, tracebacks, silent) and requires no traceback and no silent load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from jax import monitoring

from clipgen import cli
from clipgen.data import embeddings

from fuzz_outcomes import check_outcome_counts, outcome_of

CONFIG = Path(__file__).parents[1] / "configs" / "prior.py"
DIM, TOKENS, TOKEN_DIM = 16, 24, 32  # configs/prior.py:tiny's embedding and token widths
SPLITS = {"train": (64, 16), "test": (16, 8), "heldout": (16, 8)}  # examples, shard size
SHARD0, SHARD1 = "train/shard-00000.npz", "train/shard-00001.npz"
MANIFEST = "train/manifest.json"

OUTCOMES: list[tuple[str, str, str]] = []  # (entry point, case, outcome)

LOWERED: list[str] = []  # every JAX program lowered for compilation from here on
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: (
        LOWERED.append(event)
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration"
        else None
    )
)


def _arrays(count: int, seed: int, ids=None, **dtypes) -> dict[str, np.ndarray]:
    """A split's fields, random (seeded), in the writer's layout."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, TOKENS + 1, count)
    arrays = {
        "ids": np.arange(count) if ids is None else np.asarray(ids),
        "image_embeds": rng.standard_normal((count, DIM)).astype(np.float32),
        "text_embeds": rng.standard_normal((count, DIM)).astype(np.float32),
        "text_tokens": rng.standard_normal((count, TOKENS, TOKEN_DIM)).astype(np.float32),
        "text_mask": (np.arange(TOKENS)[None] < lengths[:, None]).astype(np.int32),
    }
    for field, dtype in dtypes.items():
        arrays[field] = arrays[field].astype(dtype)
    return arrays


def _batches(arrays: dict[str, np.ndarray], size: int = 5):
    count = len(arrays["ids"])
    for start in range(0, count, size):
        yield {field: value[start : start + size] for field, value in arrays.items()}


def _write(root: Path, split: str, arrays: dict, shard_size: int, **kwargs) -> None:
    fields = tuple(arrays)
    embeddings.write_shards(
        root / split, _batches(arrays), shard_size, {"split": split, **kwargs}, fields
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(root with train/, test/, heldout/ shards, the arrays written per split)."""
    root = tmp_path_factory.mktemp("shards") / "embeddings"
    written = {}
    for seed, (split, (count, shard_size)) in enumerate(SPLITS.items()):
        written[split] = _arrays(count, seed)
        _write(root, split, written[split], shard_size)
    return root, written


# --- damage ------------------------------------------------------------------------------


def _rewrite_shard(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite shard `rel` with numpy's own savez after `edit` changes its arrays."""

    def damage(root: Path) -> None:
        path = root / rel
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
        edit(arrays)
        np.savez(path, **arrays)

    return damage


def _edit_manifest(edit: Callable[[dict], None], rel: str = MANIFEST) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / rel
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return damage


def write(rel: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_bytes(content)


def truncate(rel: str, fraction: float) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: int(len(data) * fraction)])

    return damage


def overwrite_middle(rel: str) -> Callable[[Path], None]:
    """16 bytes in the middle of the file (inside text_tokens' data, the bulk of a shard)."""

    def damage(root: Path) -> None:
        raw = bytearray((root / rel).read_bytes())
        middle = len(raw) // 2
        raw[middle : middle + 16] = bytes(16 * [0x5A])
        (root / rel).write_bytes(bytes(raw))

    return damage


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def both(*damages) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        for one in damages:
            one(root)

    return damage


def _set(values: dict, key: str, value) -> None:
    values[key] = value


def _pop(values: dict, key: str) -> None:
    values.pop(key)


def _nan(arrays: dict) -> None:
    arrays["image_embeds"] = arrays["image_embeds"].copy()
    arrays["image_embeds"][3, 5] = np.nan


def _narrow(arrays: dict) -> None:
    arrays["image_embeds"] = arrays["image_embeds"][:, :8].copy()
    arrays["text_embeds"] = arrays["text_embeds"][:, :8].copy()


def _zero(arrays: dict) -> None:
    arrays["text_embeds"] = arrays["text_embeds"].copy()
    arrays["text_embeds"][2] = 0.0


def _ids(shard: int, ids: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """Give shard `shard` of train/ new ids, in the shard and the manifest alike."""

    def damage(root: Path) -> None:
        rel = f"train/shard-{shard:05d}.npz"
        manifest = json.loads((root / MANIFEST).read_text())
        new = ids(np.asarray(manifest["shards"][shard]["ids"]))
        manifest["shards"][shard]["ids"] = [int(i) for i in new]
        (root / MANIFEST).write_text(json.dumps(manifest))
        _rewrite_shard(rel, lambda arrays: _set(arrays, "ids", new))(root)

    return damage


def _test_split_as_train(root: Path) -> None:
    shutil.rmtree(root / "train")
    shutil.copytree(root / "test", root / "train")


def _shard_in_another_split(root: Path) -> None:
    _edit_manifest(lambda m: m["shards"][0].update(file="../test/shard-00000.npz"))(root)


def _npy_not_npz(root: Path) -> None:
    with open(root / SHARD1, "wb") as file:
        np.save(file, np.zeros((16, DIM), np.float32))


@dataclasses.dataclass(frozen=True)
class Damaged:
    name: str
    damage: Callable[[Path], None]
    names: tuple[str, ...]  # what the message must name: the file, then the field


RNG_BYTES = np.random.default_rng(22).integers(0, 256, 3000, dtype=np.uint8).tobytes()

DAMAGED = [
    # the manifest
    Damaged("manifest-missing", remove(MANIFEST), ("train", "manifest.json")),
    Damaged("manifest-not-json", truncate(MANIFEST, 0.5), (MANIFEST, "not valid JSON")),
    Damaged("manifest-a-list", write(MANIFEST, b"[1, 2, 3]"), (MANIFEST, "array")),
    Damaged(
        "manifest-shards-a-string",
        _edit_manifest(lambda m: _set(m, "shards", "abc")),
        (MANIFEST, "'shards'"),
    ),
    Damaged(
        "manifest-fields-without-ids",
        _edit_manifest(lambda m: m["fields"].remove("ids")),
        (MANIFEST, "'fields'"),
    ),
    Damaged(
        "manifest-num-examples-wrong",
        _edit_manifest(lambda m: _set(m, "num_examples", 999)),
        (MANIFEST, "num_examples"),
    ),
    Damaged(
        "manifest-shard-outside-the-split",
        _shard_in_another_split,
        (MANIFEST, "'file'", "../test/shard-00000.npz"),
    ),
    Damaged(
        "manifest-without-split",
        _edit_manifest(lambda m: _pop(m, "split")),
        (MANIFEST, "records no split"),
    ),
    Damaged("test-split-under-train", _test_split_as_train, (MANIFEST, "'test' split", "'train'")),
    # shard files
    Damaged("shard-missing", remove(SHARD1), (SHARD1, "missing")),
    Damaged("shard-empty", write(SHARD1, b""), (SHARD1, "damaged")),
    Damaged("shard-truncated", truncate(SHARD1, 0.5), (SHARD1, "damaged")),
    Damaged("shard-random-garbage", write(SHARD0, RNG_BYTES), (SHARD0, "damaged")),
    Damaged("shard-a-bare-npy", _npy_not_npz, (SHARD1, "damaged")),
    Damaged("shard-bytes-overwritten", overwrite_middle(SHARD1), (SHARD1, "damaged")),
    # fields
    Damaged(
        "shard-missing-a-field",
        _rewrite_shard(SHARD1, lambda a: _pop(a, "text_tokens")),
        (SHARD1, "'text_tokens'"),
    ),
    Damaged(
        "shard-narrower-embeddings", _rewrite_shard(SHARD1, _narrow), (SHARD1, "'image_embeds'")
    ),
    Damaged(
        "shard-narrower-without-recorded-shapes",
        both(_rewrite_shard(SHARD1, _narrow), _edit_manifest(lambda m: _pop(m, "shapes"))),
        (SHARD1, "'image_embeds'", "shard-00000.npz"),
    ),
    Damaged("shard-nan-embedding", _rewrite_shard(SHARD1, _nan), (SHARD1, "'image_embeds'", "NaN")),
    Damaged(
        "shard-integer-embeddings",
        _rewrite_shard(SHARD0, lambda a: _set(a, "image_embeds", a["image_embeds"].astype(int))),
        (SHARD0, "'image_embeds'", "not floating"),
    ),
    Damaged(
        "shard-float-mask",
        _rewrite_shard(SHARD0, lambda a: _set(a, "text_mask", a["text_mask"] + 0.5)),
        (SHARD0, "'text_mask'", "not integers"),
    ),
    Damaged(
        "shard-zero-embedding",
        _rewrite_shard(SHARD1, _zero),
        (SHARD1, "'text_embeds'", "all zeros"),
    ),
    Damaged(
        "shard-one-example-short",
        _rewrite_shard(SHARD1, lambda a: a.update({k: np.delete(v, 3, 0) for k, v in a.items()})),
        (SHARD1, "first missing id: 19"),
    ),
    # ids
    Damaged(
        "ids-repeated-within-a-shard",
        _ids(1, lambda ids: np.where(ids == 20, 21, ids)),
        (MANIFEST, "id 21", "shard-00001.npz"),
    ),
    Damaged(
        "ids-repeated-across-shards",
        _ids(2, lambda ids: ids - 16),
        (MANIFEST, "shard-00001.npz", "shard-00002.npz"),
    ),
    Damaged(
        "ids-out-of-line-with-manifest",
        _rewrite_shard(SHARD1, lambda a: _set(a, "ids", a["ids"][::-1].copy())),
        (SHARD1, "ids differ"),
    ),
]

# The CLI runs one case of each kind of damage (a different file or check each).
CLI_CASES = [
    "manifest-missing",
    "manifest-not-json",
    "manifest-shards-a-string",
    "manifest-without-split",
    "test-split-under-train",
    "shard-missing",
    "shard-truncated",
    "shard-bytes-overwritten",
    "shard-missing-a-field",
    "shard-narrower-embeddings",
    "shard-nan-embedding",
    "shard-zero-embedding",
    "ids-repeated-across-shards",
    # damage the Python API's case (train/) does not read, or that only the config reveals
    "test-split-nan-embedding",
    "heldout-shard-truncated",
    "every-split-narrower-than-the-config",
]


def _narrower_everywhere(root: Path) -> None:
    """Valid shards, but 8-wide embeddings where the config's model reads 16."""
    for seed, (split, (count, shard_size)) in enumerate(SPLITS.items()):
        shutil.rmtree(root / split)
        arrays = _arrays(count, seed)
        _narrow(arrays)
        _write(root, split, arrays, shard_size)


CLI_ONLY = [
    Damaged(
        "test-split-nan-embedding",
        _rewrite_shard("test/shard-00001.npz", _nan),
        ("test/shard-00001.npz", "'image_embeds'", "NaN"),
    ),
    Damaged(
        "heldout-shard-truncated",
        truncate("heldout/shard-00000.npz", 0.5),
        ("heldout/shard-00000.npz", "damaged"),
    ),
    Damaged(
        "every-split-narrower-than-the-config",
        _narrower_everywhere,
        ("embeddings/train", "embedding_dim is 16 in the config, 8 in the shards"),
    ),
]
BY_NAME = {case.name: case for case in DAMAGED + CLI_ONLY}


def _damaged_copy(pristine, tmp_path: Path, case: Damaged) -> Path:
    root = tmp_path / "embeddings"
    shutil.copytree(pristine[0], root)
    case.damage(root)
    return root


def _named(message: str, names: tuple[str, ...]) -> bool:
    return "\n" not in message.strip() and all(name in message for name in names)


@pytest.mark.parametrize("case", DAMAGED, ids=lambda case: case.name)
def test_python_api_refuses_damaged_shards(pristine, tmp_path, case):
    root = _damaged_copy(pristine, tmp_path, case)
    outcome, message = outcome_of(
        lambda: embeddings.load_split(root / "train", True, "train"),
        lambda text: _named(text, case.names),
    )
    OUTCOMES.append(("shards api", case.name, outcome))
    assert outcome == "clear", f"{case.name}: {outcome}: {message}"


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_train_refuses_damaged_shards_before_compiling(pristine, tmp_path, capsys, name):
    case = BY_NAME[name]
    root = _damaged_copy(pristine, tmp_path, case)
    workdir = tmp_path / "run"
    lowered = len(LOWERED)
    argv = [
        f"--config={CONFIG}:tiny",
        f"--config.data.embeddings={root}",
        "--config.data.clip_workdir=",
        "--workdir",
        str(workdir),
    ]
    try:
        status = cli.main(["train", *argv])
    except BaseException as error:  # noqa: BLE001 - what the fuzz counts
        status = f"raised {type(error).__name__}: {error}"
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if status == 0:
        outcome = "silent"
    elif status != 2 or "Traceback" in err or len(lines) != 1:
        outcome = "traceback"
    else:
        outcome = "clear" if _named(lines[0], case.names) else "unclear"
    OUTCOMES.append(("shards cli", name, outcome))
    assert outcome == "clear", f"{name}: {outcome}: status {status}, stderr {err!r}"
    assert lines[0].startswith("clipgen train: ")
    assert len(LOWERED) == lowered, f"{name}: compiled {LOWERED[lowered:]} before failing"


# --- odd but valid -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Odd:
    name: str
    arrays: Callable[[], dict[str, np.ndarray]]
    shard_size: int = 16
    edit: Callable[[Path], None] | None = None


def _extra_field(root: Path) -> None:
    """A field the manifest does not list, in every shard: not read."""
    for path in sorted((root / "train").glob("shard-*.npz")):
        _rewrite_shard(
            str(path.relative_to(root)), lambda a: _set(a, "extra", np.zeros(len(a["ids"])))
        )(root)


ODD = [
    Odd(
        "float16-embeddings",
        lambda: _arrays(40, 5, image_embeds=np.float16, text_embeds=np.float16),
    ),
    Odd(
        "float64-everything",
        lambda: _arrays(40, 6, image_embeds=np.float64, text_tokens=np.float64),
    ),
    Odd("boolean-mask", lambda: _arrays(40, 7, text_mask=bool)),
    Odd("one-example-a-shard", lambda: _arrays(7, 8), shard_size=1),
    Odd(
        "ids-shuffled-from-1000",
        lambda: _arrays(40, 9, ids=np.random.default_rng(1).permutation(40) + 1000),
    ),
    Odd("an-extra-field-in-the-shards", lambda: _arrays(40, 10), edit=_extra_field),
    Odd(
        "manifest-without-recorded-layout",
        lambda: _arrays(40, 11),
        edit=_edit_manifest(lambda m: (m.pop("shapes"), m.pop("dtypes"))),
    ),
    Odd(
        "uint8-ids-and-mask",
        lambda: _arrays(40, 12, ids=np.arange(40, dtype=np.uint8), text_mask=np.uint8),
    ),
]


@pytest.mark.parametrize("case", ODD, ids=lambda case: case.name)
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_python_api_loads_odd_but_valid_shards(tmp_path, case, normalize):
    written = case.arrays()
    root = tmp_path / "embeddings"
    _write(root, "train", written, case.shard_size)
    if case.edit is not None:
        case.edit(root)
    name = f"{case.name} ({'normalized' if normalize else 'raw'})"
    try:
        loaded = embeddings.load_split(root / "train", normalize, "train")
    except Exception as error:  # noqa: BLE001 - what the fuzz counts
        OUTCOMES.append(("shards api", name, "traceback"))
        raise AssertionError(f"{name} was refused: {error}") from error

    def unit(x):
        x = x.astype(np.float64)
        return x / np.sqrt((x * x).sum(-1, keepdims=True))

    expected = {
        "ids": written["ids"],
        "image_embeds": written["image_embeds"].astype(np.float32),
        "text_embed": written["text_embeds"].astype(np.float32),
        "text_tokens": written["text_tokens"].astype(np.float32),
        "text_mask": written["text_mask"].astype(np.int32),
    }
    if normalize:
        expected["image_embeds"] = unit(written["image_embeds"])
        expected["text_embed"] = unit(written["text_embeds"])
    differing = [
        field
        for field, value in expected.items()
        if loaded[field].shape != value.shape
        or not np.allclose(loaded[field], value, rtol=1e-6, atol=1e-7 if normalize else 0)
        or (field in ("text_mask",) and loaded[field].dtype != np.int32)
    ]
    OUTCOMES.append(("shards api", name, "silent" if differing else "handled"))
    assert not differing, f"{name} loaded different values in {differing}"


def test_zz_outcome_counts():
    """The fuzz's note: per entry point, cases tried, clear InputErrors, correct handling,
    tracebacks and silent loads (the last two must be 0)."""
    check_outcome_counts(OUTCOMES)
