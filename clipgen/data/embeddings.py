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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipgen.data import pipeline
from clipgen.data.files import atomic_write

FIELDS = ("ids", "image_embeds", "text_embeds", "text_tokens", "text_mask")
MANIFEST = "manifest.json"


class ShardMismatchError(ValueError):
    """Embedding shards that do not match their manifest or their image dataset."""


def write_shards(
    directory: str | Path,
    batches: Iterable[dict[str, np.ndarray]],
    shard_size: int,
    metadata: dict[str, Any],
    fields: tuple[str, ...] = FIELDS,
) -> Path:
    """Write batches of `fields` ("ids" among them) into shards of `shard_size` examples,
    then the manifest (which lists the fields).

    Each file is written to a temporary name and renamed, and the manifest comes last, so
    an interrupted run leaves no manifest and is refused by the reader, never half-read.
    """
    if "ids" not in fields:
        raise ValueError(f"shards need an 'ids' field; got {fields}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    pending: dict[str, list[np.ndarray]] = {field: [] for field in fields}
    shards: list[dict[str, Any]] = []

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
            pending[field].append(np.asarray(batch[field]))
        buffered += lengths["ids"]
        while buffered >= shard_size:
            flush(shard_size)
            buffered -= shard_size
    if buffered:
        flush(buffered)
    manifest = dict(
        metadata,
        fields=list(fields),
        shards=shards,
        num_examples=sum(len(s["ids"]) for s in shards),
    )
    atomic_write(
        directory / MANIFEST, lambda file: file.write(json.dumps(manifest, indent=1).encode())
    )
    return directory


class EmbeddingShards:
    """Random access over written shards: `shards[i]` is example i's fields."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            raise ShardMismatchError(
                f"{self.directory} has no {MANIFEST}: the embedding run did not finish"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self.fields = tuple(self.manifest.get("fields", FIELDS))
        self.ids = np.concatenate([np.asarray(s["ids"], np.int64) for s in self.manifest["shards"]])
        self._starts = np.cumsum([0] + [len(s["ids"]) for s in self.manifest["shards"]])
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        for number in range(len(self.manifest["shards"])):
            self._load(number)

    def _load(self, number: int) -> dict[str, np.ndarray]:
        if self._cache is not None and self._cache[0] == number:
            return self._cache[1]
        entry = self.manifest["shards"][number]
        path = self.directory / entry["file"]
        with np.load(path, allow_pickle=False) as data:
            arrays = {field: data[field] for field in self.fields}
        expected = np.asarray(entry["ids"], np.int64)
        for field in self.fields:
            if len(arrays[field]) != len(expected):
                raise ShardMismatchError(
                    f"{path}: {field} has {len(arrays[field])} rows, the manifest lists "
                    f"{len(expected)} examples; first missing id: "
                    f"{_first_difference(expected, arrays['ids'])}"
                )
        if not np.array_equal(arrays["ids"], expected):
            raise ShardMismatchError(
                f"{path}: example ids differ from the manifest at id "
                f"{_first_difference(expected, arrays['ids'])}"
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
        parts = [self._load(number) for number in range(len(self.manifest["shards"]))]
        return {field: np.concatenate([part[field] for part in parts]) for field in self.fields}

    def check_aligned(self, dataset_ids: np.ndarray) -> None:
        """Refuse shards whose examples are not the dataset's, in the dataset's order."""
        dataset_ids = np.asarray(dataset_ids, np.int64)
        if len(dataset_ids) != len(self.ids) or not np.array_equal(dataset_ids, self.ids):
            raise ShardMismatchError(
                f"embeddings in {self.directory} do not line up with the image dataset: "
                f"{len(self.ids)} embedded vs {len(dataset_ids)} images; first mismatch at id "
                f"{_first_difference(dataset_ids, self.ids)}"
            )


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


def load_split(directory: str | Path, normalize: bool) -> dict[str, np.ndarray]:
    """A split's embeddings as the prior's inputs: ids, image_embeds, text_embed,
    text_tokens, text_mask (embeddings L2-normalised when `normalize`)."""
    arrays = EmbeddingShards(directory).arrays()
    image, text = arrays["image_embeds"].astype(np.float32), arrays["text_embeds"]
    text = text.astype(np.float32)
    if normalize:
        image = image / np.linalg.norm(image, axis=-1, keepdims=True)
        text = text / np.linalg.norm(text, axis=-1, keepdims=True)
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
    train = load_split(embedding_dir(config.data, "train"), config.data.normalize)
    check_dimensions(config, train)
    return train


def check_dimensions(config: Any, data: dict[str, np.ndarray]) -> None:
    """The shards' embedding, token-width and length against config.model."""
    model = config.model
    found = {
        "embedding_dim": data["image_embeds"].shape[-1],
        "text_token_dim": data["text_tokens"].shape[-1],
        "num_text_tokens": data["text_tokens"].shape[1],
    }
    wrong = {key: value for key, value in found.items() if model[key] != value}
    if wrong:
        raise ValueError(
            "the embedding shards do not fit config.model: "
            + ", ".join(
                f"{k} is {model[k]} in the config, {v} in the shards" for k, v in wrong.items()
            )
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
