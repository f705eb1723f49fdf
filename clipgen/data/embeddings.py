"""Embedding shards: CLIP outputs for a dataset, written once and read by later stages.

A directory holds `shard-NNNNN.npz` files (ids, image_embeds, text_embeds, text_tokens,
text_mask, or the fields its manifest lists; no pickles) and a `manifest.json` written
last, listing the fields and each shard's example ids. The reader checks every shard
against the manifest and, given the image dataset's ids, that the two line up, and refuses
them naming the first mismatch: misaligned shards are how other implementations silently
train on wrong pairs or hang.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipgen.data import pipeline
from clipgen.data.files import atomic_write
from clipgen.data.json_input import (
    COUNT,
    INT,
    OBJECT,
    STR,
    Fields,
    list_of,
    optional,
    read_json_object,
)
from clipgen.errors import InputError

FIELDS = ("ids", "image_embeds", "text_embeds", "text_tokens", "text_mask")
MANIFEST = "manifest.json"


class ShardMismatchError(InputError):
    """Embedding shards that are damaged, or do not match their manifest or their image
    dataset."""


# Fields of integer ids and masks (the mask may be boolean); every other field holds floats.
_INTEGER_FIELDS = ("ids", "text_mask")
_REWRITE = "re-run `clipgen embed` (or delete the directory: `clipgen train` writes it again)"


def write_shards(
    directory: str | Path,
    batches: Iterable[dict[str, np.ndarray]],
    shard_size: int,
    metadata: dict[str, Any],
    fields: tuple[str, ...] = FIELDS,
) -> Path:
    """Write batches of `fields` ("ids" among them) into shards of `shard_size` examples,
    then the manifest: `metadata` (its "split", when given, is checked by readers that ask
    for a split), the fields, each field's shape after the first axis and dtype, and each
    shard's file and example ids.

    Each file is written to a temporary name and renamed, and the manifest comes last, so
    an interrupted run leaves no manifest and is refused by the reader, never half-read.
    """
    if "ids" not in fields:
        raise ValueError(f"shards need an 'ids' field; got {fields}")
    if not isinstance(metadata.get("split", ""), str):
        raise ValueError(f"metadata's split must be a string, got {metadata['split']!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    pending: dict[str, list[np.ndarray]] = {field: [] for field in fields}
    shards: list[dict[str, Any]] = []
    layout: dict[str, tuple[tuple[int, ...], str]] = {}

    def flush(count: int) -> None:
        arrays = {field: np.concatenate(pending[field]) for field in fields}
        chunk = {field: value[:count] for field, value in arrays.items()}
        name = f"shard-{len(shards):05d}.npz"
        atomic_write(directory / name, lambda file: np.savez(file, **chunk))
        shards.append({"file": name, "ids": [int(i) for i in chunk["ids"]]})
        for field in fields:
            pending[field] = [arrays[field][count:]]

    buffered = 0
    for batch in batches:
        lengths = {field: len(batch[field]) for field in fields}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"a batch's fields have different lengths: {lengths}")
        for field in fields:
            value = np.asarray(batch[field])
            found = (value.shape[1:], value.dtype.str)
            if layout.setdefault(field, found) != found:
                raise ValueError(
                    f"field {field!r} changes from shape (n, *{layout[field][0]}) "
                    f"{layout[field][1]} to (n, *{found[0]}) {found[1]} between batches"
                )
            pending[field].append(value)
        buffered += lengths["ids"]
        while buffered >= shard_size:
            flush(shard_size)
            buffered -= shard_size
    if buffered:
        flush(buffered)
    manifest = dict(
        metadata,
        fields=list(fields),
        shapes={field: list(shape) for field, (shape, _) in layout.items()},
        dtypes={field: dtype for field, (_, dtype) in layout.items()},
        shards=shards,
        num_examples=sum(len(s["ids"]) for s in shards),
    )
    atomic_write(
        directory / MANIFEST, lambda file: file.write(json.dumps(manifest, indent=1).encode())
    )
    return directory


class EmbeddingShards:
    """Random access over written shards: `shards[i]` is example i's fields.

    Opening checks the manifest (its fields, shards, unique example ids, and, given `split`,
    that the shards are that split's) and every shard's layout from the archives' array
    headers without reading the data: each field present, with the manifest's number of
    rows, an integer (ids, text_mask) or floating dtype, and one shape per field across the
    shards (the manifest's, where it records one). Reading a shard's data checks the rest:
    the archive's checksums, the ids against the manifest's, and finite floats. Anything
    wrong raises a ShardMismatchError (an InputError) naming the file."""

    def __init__(self, directory: str | Path, split: str | None = None):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            where = "" if self.directory.is_dir() else " (no such directory)"
            raise ShardMismatchError(
                f"{self.directory}{where} has no {MANIFEST}: the embedding run did not finish "
                f"or did not run; {_REWRITE}"
            )
        try:
            self.manifest = read_json_object(
                manifest_path, "an embedding manifest (written by clipgen embed)", _REWRITE
            )
            self._read_manifest(Fields(self.manifest, str(manifest_path), _REWRITE), split)
        except InputError as error:
            raise ShardMismatchError(str(error)) from None
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {
            field: (tuple(shape), f"{MANIFEST}'s") for field, shape in self._recorded.items()
        }
        for number in range(len(self.files)):
            self._inspect(number)

    def _read_manifest(self, manifest: Fields, split: str | None) -> None:
        self.fields = tuple(manifest.get("fields", FIELDS, list_of(STR, 1)))
        if "ids" not in self.fields or len(set(self.fields)) != len(self.fields):
            manifest.fail("fields", f"is {list(self.fields)}; it must list 'ids', each field once")
        recorded = manifest.get("split", None, optional(STR))
        if split is not None and recorded != split:
            if recorded is None:
                raise manifest.error(
                    f"it records no split, so clipgen cannot tell whether these shards are the "
                    f"{split!r} split (ids restart at 0 in every split); add "
                    f'"split": "{split}" to it if they are'
                )
            raise manifest.error(
                f"these shards are the {recorded!r} split, loaded as the {split!r} split; put "
                f"them under {self.directory.parent / recorded}"
            )
        shapes = manifest.get("shapes", {}, OBJECT)
        section = Fields(shapes, f"{manifest.source} shapes", manifest.fix)
        self._recorded = {
            field: section.get(field, None, list_of(COUNT))
            for field in self.fields
            if field in shapes
        }
        entries = manifest.get("shards", None, list_of(OBJECT))
        if entries is None:
            manifest.fail("shards", "is missing")
        self.files, ids = [], []
        for number, entry in enumerate(entries):
            shard = Fields(entry, f"{manifest.source} shards[{number}]", manifest.fix)
            name = shard.get("file", None, STR)
            if name is None or Path(name).name != name or name in (".", ".."):
                shard.fail("file", f"is {name!r}, not a file name in {self.directory}")
            self.files.append(name)
            ids.append(np.asarray(shard.get("ids", None, list_of(INT)) or [], np.int64))
        if len(set(self.files)) != len(self.files):
            manifest.fail("shards", "lists a file twice")
        self._shard_ids = ids
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        count = manifest.get("num_examples", len(self.ids), COUNT)
        if count != len(self.ids) or not len(self.ids):
            what = "no examples" if not len(self.ids) else f"{len(self.ids)} example ids"
            raise manifest.error(f"num_examples is {count}, but its shards list {what}")
        values, first = np.unique(self.ids, return_index=True)
        if len(values) != len(self.ids):
            position = int(np.setdiff1d(np.arange(len(self.ids)), first)[0])
            repeated = int(self.ids[position])
            where = [self.files[n] for n, part in enumerate(ids) if repeated in part]
            raise manifest.error(
                f"example id {repeated} appears more than once ({', '.join(where)}); each "
                "example must be embedded once"
            )
        self._starts = np.cumsum([0] + [len(part) for part in ids])

    def _path(self, number: int) -> Path:
        return self.directory / self.files[number]

    def _inspect(self, number: int) -> None:
        """Shard `number`'s fields from its archive's array headers: present, as many rows
        as the manifest lists ids, of their kind of dtype, one shape per field."""
        path = self._path(number)
        if not path.is_file():
            raise ShardMismatchError(f"{path} is missing ({MANIFEST} lists it); {_REWRITE}")
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                headers = {}
                for field in self.fields:
                    if f"{field}.npy" not in names:
                        stored = sorted(n.removesuffix(".npy") for n in names)
                        raise ShardMismatchError(
                            f"{path} has no field {field!r} ({MANIFEST} lists {list(self.fields)}, "
                            f"the shard holds {stored}); {_REWRITE}"
                        )
                    with archive.open(f"{field}.npy") as member:
                        headers[field] = _npy_header(member)
                with archive.open("ids.npy") as member:
                    ids = np.lib.format.read_array(member, allow_pickle=False)
        except ShardMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - zipfile's and numpy's errors vary
            raise self._damaged(path, error) from None
        for field, (shape, _, dtype) in headers.items():
            self._check_layout(path, number, field, shape, dtype, ids)
        self._check_ids(path, number, ids)

    def _check_layout(
        self,
        path: Path,
        number: int,
        field: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        ids: np.ndarray,
    ) -> None:
        expected = self._shard_ids[number]
        where = f"{path}: field {field!r}"
        if not shape or shape[0] != len(expected):
            found = f"{shape[0]} rows" if shape else "a scalar"
            missing = _first_difference(expected, np.asarray(ids).reshape(-1))
            raise ShardMismatchError(
                f"{where} has {found}, the manifest lists {len(expected)} examples; first "
                f"missing id: {missing}; {_REWRITE}"
            )
        integer = field in _INTEGER_FIELDS
        if integer and dtype.kind not in "iub" or not integer and dtype.kind != "f":
            wanted = "integers" if integer else "floating-point numbers"
            raise ShardMismatchError(f"{where} holds {dtype}, not {wanted}; {_REWRITE}")
        width = tuple(shape[1:])
        if 0 in width:
            raise ShardMismatchError(f"{where} is empty: shape {tuple(shape)}; {_REWRITE}")
        known = self._shapes.setdefault(field, (width, f"{self.files[number]}'s"))
        if known[0] != width:
            raise ShardMismatchError(
                f"{where} has shape (n, {', '.join(map(str, width))}) where {known[1]} is "
                f"(n, {', '.join(map(str, known[0]))}): shards of different widths (embedded "
                f"with different CLIPs?); {_REWRITE}"
            )

    def _check_ids(self, path: Path, number: int, ids: np.ndarray) -> None:
        expected = self._shard_ids[number]
        if not np.array_equal(ids, expected):
            raise ShardMismatchError(
                f"{path}: example ids differ from the manifest at id "
                f"{_first_difference(expected, ids)}; {_REWRITE}"
            )

    @staticmethod
    def _damaged(path: Path, error: Exception) -> ShardMismatchError:
        detail = (str(error).splitlines() or [""])[0][:160]
        return ShardMismatchError(
            f"{path} is damaged or not a .npz archive ({type(error).__name__}: {detail}); "
            f"{_REWRITE}"
        )

    def _load(self, number: int) -> dict[str, np.ndarray]:
        if self._cache is not None and self._cache[0] == number:
            return self._cache[1]
        path = self._path(number)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {field: data[field] for field in self.fields}
        except Exception as error:  # noqa: BLE001 - zipfile's and numpy's errors vary
            raise self._damaged(path, error) from None
        for field, value in arrays.items():
            self._check_layout(path, number, field, value.shape, value.dtype, arrays["ids"])
        self._check_ids(path, number, arrays["ids"])
        for field, value in arrays.items():
            if field not in _INTEGER_FIELDS:
                finite = np.isfinite(value).reshape(len(value), -1).all(axis=1)
                if not finite.all():
                    first = int(arrays["ids"][np.argmin(finite)])
                    raise ShardMismatchError(
                        f"{path}: field {field!r} holds NaN or inf (first at example id {first}, "
                        f"{int((~finite).sum())} of {len(finite)} examples); {_REWRITE}"
                    )
        self._cache = (number, arrays)
        return arrays

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        number = int(np.searchsorted(self._starts, index, side="right") - 1)
        arrays = self._load(number)
        row = index - self._starts[number]
        return {field: arrays[field][row] for field in self.fields}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field of every example, concatenated in order (checked shard by shard)."""
        parts = [self._load(number) for number in range(len(self.files))]
        return {field: np.concatenate([part[field] for part in parts]) for field in self.fields}

    def require(self, fields: Iterable[str], reader: str) -> None:
        """Refuse shards without one of `fields`, which `reader` (a stage) needs."""
        lacking = [field for field in fields if field not in self.fields]
        if lacking:
            raise ShardMismatchError(
                f"{self.directory / MANIFEST}: the shards have no {', '.join(lacking)} (they "
                f"hold {list(self.fields)}); {reader} reads {list(fields)}: point the config "
                "at the right shards"
            )

    def unit(self, arrays: dict[str, np.ndarray], field: str) -> np.ndarray:
        """`arrays[field]` (of these shards) as float32 unit vectors along the last axis;
        an all-zero vector, which has no direction, is refused naming its shard."""
        values = np.asarray(arrays[field], np.float32)
        norms = np.linalg.norm(values, axis=-1, keepdims=True)
        zero = (norms == 0).reshape(len(values), -1).any(axis=1)
        if zero.any():
            position = int(np.argmax(zero))
            number = int(np.searchsorted(self._starts, position, side="right") - 1)
            raise ShardMismatchError(
                f"{self._path(number)}: field {field!r} of example id {int(self.ids[position])} "
                f"is all zeros, which cannot be normalised ({int(zero.sum())} of {len(zero)} "
                f"examples); {_REWRITE}"
            )
        return values / norms

    def check_aligned(self, dataset_ids: np.ndarray) -> None:
        """Refuse shards whose examples are not the dataset's, in the dataset's order."""
        dataset_ids = np.asarray(dataset_ids, np.int64)
        if len(dataset_ids) != len(self.ids) or not np.array_equal(dataset_ids, self.ids):
            raise ShardMismatchError(
                f"embeddings in {self.directory} do not line up with the image dataset: "
                f"{len(self.ids)} embedded vs {len(dataset_ids)} images; first mismatch at id "
                f"{_first_difference(dataset_ids, self.ids)}"
            )


def _npy_header(member: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the header of a .npy file object."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"unsupported .npy format version {version}")


def _first_difference(expected: np.ndarray, found: np.ndarray) -> int | str:
    """The first expected id that `found` does not have at the same position."""
    for position, wanted in enumerate(expected):
        if position >= len(found) or found[position] != wanted:
            return int(wanted)
    return f"(extra id {int(found[len(expected)])})" if len(found) > len(expected) else "none"


# --- a split as training arrays ------------------------------------------------------------------


def embedding_dir(data_config: Any, split: str) -> Path:
    """Where a split's shards live: `<data_config.embeddings>/<split>`."""
    return Path(data_config.embeddings) / split


def load_split(
    directory: str | Path, normalize: bool, split: str | None = None
) -> dict[str, np.ndarray]:
    """A split's embeddings as the prior's inputs: ids, image_embeds, text_embed,
    text_tokens, text_mask (embeddings L2-normalised when `normalize`). Given `split`, the
    manifest must record that split. Damaged or inconsistent shards raise a
    ShardMismatchError (an InputError) naming the file."""
    shards = EmbeddingShards(directory, split)
    shards.require(FIELDS, "a prior or decoder")
    arrays = shards.arrays()
    if normalize:
        image, text = shards.unit(arrays, "image_embeds"), shards.unit(arrays, "text_embeds")
    else:
        image = arrays["image_embeds"].astype(np.float32)
        text = arrays["text_embeds"].astype(np.float32)
    for field, width in (("image_embeds", image.shape[1:]), ("text_embeds", text.shape[1:])):
        if len(width) != 1:
            raise ShardMismatchError(
                f"{shards.directory / MANIFEST}: {field} are (n, {width}), not (n, width) vectors"
            )
    if image.shape[1:] != text.shape[1:] or arrays["text_tokens"].ndim != 3:
        raise ShardMismatchError(
            f"{shards.directory / MANIFEST}: image_embeds (n, {image.shape[1]}) and text_embeds "
            f"(n, {text.shape[1]}) must be one width and text_tokens (n, length, width), found "
            f"{arrays['text_tokens'].shape}; {_REWRITE}"
        )
    if arrays["text_mask"].shape != arrays["text_tokens"].shape[:2]:
        raise ShardMismatchError(
            f"{shards.directory / MANIFEST}: text_mask {arrays['text_mask'].shape} does not "
            f"match text_tokens {arrays['text_tokens'].shape}; {_REWRITE}"
        )
    return {
        "ids": arrays["ids"],
        "image_embeds": image,
        "text_embed": text,
        "text_tokens": arrays["text_tokens"].astype(np.float32),
        "text_mask": arrays["text_mask"].astype(np.int32),
    }


def synthetic_split(
    count: int, seed: int, dim: int, length: int, token_dim: int
) -> dict[str, np.ndarray]:
    """Random unit embeddings (dim) and token encodings (length x token_dim), for
    benchmarks and tests; ids 0..count-1."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    lengths = rng.integers(1, length + 1, count)
    return {
        "ids": np.arange(count),
        "image_embeds": unit((count, dim)),
        "text_embed": unit((count, dim)),
        "text_tokens": rng.standard_normal((count, length, token_dim)).astype(np.float32),
        "text_mask": (np.arange(length)[None] < lengths[:, None]).astype(np.int32),
    }


class ArraySource:
    """Rows of equally long arrays as a random-access example source."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: value[index] for name, value in self.arrays.items()}


def stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Examples of equally shaped fields -> one array per field."""
    return {name: np.stack([e[name] for e in examples]) for name in examples[0]}


def training_split(config: Any) -> dict[str, np.ndarray]:
    """A prior stage's training embeddings (synthetic ones for `data.embeddings ==
    "synthetic"`), checked against config.model. Shards must exist: `clipgen train` and the
    demo write missing ones first (clipgen.pipelines.embed.ensure_embeddings)."""
    model = config.model
    if config.data.embeddings == "synthetic":
        return synthetic_split(
            int(config.data.num_examples["train"]),
            config.data.seed,
            model.embedding_dim,
            model.num_text_tokens,
            model.text_token_dim,
        )
    directory = embedding_dir(config.data, "train")
    train = load_split(directory, config.data.normalize, "train")
    check_dimensions(config, train, directory)
    return train


def check_dimensions(config: Any, data: dict[str, np.ndarray], directory: Any = "") -> None:
    """The shards' (in `directory`) embedding, token-width and length against config.model."""
    model = config.model
    found = {
        "embedding_dim": data["image_embeds"].shape[-1],
        "text_token_dim": data["text_tokens"].shape[-1],
        "num_text_tokens": data["text_tokens"].shape[1],
    }
    wrong = {key: value for key, value in found.items() if model[key] != value}
    if wrong:
        raise InputError(
            f"the embedding shards {directory} do not fit config.model: "
            + ", ".join(
                f"{k} is {model[k]} in the config, {v} in the shards" for k, v in wrong.items()
            )
            + "; set config.model to the CLIP the shards come from, or embed with that CLIP"
        )


def prior_batch_spec(model_config: Any, global_batch_size: int) -> dict[str, Any]:
    """The global batch of the diffusion and autoregressive priors (`model_config` gives
    the widths), as ShapeDtypeStructs."""
    model = model_config
    b, length = global_batch_size, model.num_text_tokens
    return {
        "image_embeds": jax.ShapeDtypeStruct((b, model.embedding_dim), jnp.float32),
        "text_embed": jax.ShapeDtypeStruct((b, model.embedding_dim), jnp.float32),
        "text_tokens": jax.ShapeDtypeStruct((b, length, model.text_token_dim), jnp.float32),
        "text_mask": jax.ShapeDtypeStruct((b, length), jnp.int32),
    }


def shuffled_batches(
    arrays: dict[str, np.ndarray], seed: int
) -> Callable[[int, int], Iterator[dict[str, np.ndarray]]]:
    """batches(first_batch, global_batch_size) over rows of `arrays` (all but "ids"), in a
    seeded order: this process's slices of consecutive global batches."""
    source = ArraySource({k: v for k, v in arrays.items() if k != "ids"})

    def batches(first_batch: int, global_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        return pipeline.host_batches(source, stack, first_batch, global_batch_size, seed)

    return batches
