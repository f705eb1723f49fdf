"""Checkpoints: a thin layer over orbax's CheckpointManager.

One composite item per thing: `state` (every field of the train state but its `ema`: step,
parameters, optimizer state, RNG, counters), `ema` (the EMA parameters), `config` (JSON),
`data` (the input iterator's position) and `meta` (clipgen version and stage), and
`checksums`: a content checksum of every saved array (computed on the devices, so only
the sums travel) and of each JSON item, verified on every restore. Orbax's array files
carry none of their own; a step that fails its checksums is treated as unreadable: set
aside, the one before restored, and said so. Saves are async and atomic (orbax writes to a
temporary directory and renames it); restores land straight on the target sharding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

import clipgen
from clipgen.errors import InputError

# Config sections whose values fix the shapes of what a checkpoint holds.
SHAPE_KEYS = ("model", "lora")


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for a different model than the one being restored."""


class CorruptCheckpointError(InputError):
    """A checkpoint's contents differ from the checksums recorded when it was saved, or
    no checkpoint of a run can be read."""


# A train state: a dataclass (clipgen.train.state.TrainState) with a `step` and an `ema` field.
TrainState = Any


@dataclasses.dataclass
class Restored:
    state: TrainState
    data: dict[str, Any]
    step: int


class Checkpointer:
    """Saves and restores the train state of one run directory."""

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 3,
        keep_every: int = 0,
        asynchronous: bool = True,
    ):
        self.directory = Path(directory).absolute()
        policies = [checkpoint_managers.LatestN(keep)]
        if keep_every:
            policies.append(checkpoint_managers.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=asynchronous,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._recorded: dict[int, dict[str, Any]] = {}  # checksums read, by step

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        state: TrainState,
        config: ml_collections.ConfigDict,
        data: dict[str, Any],
        *,
        stage: str = "",
        force: bool = False,
    ) -> bool:
        """Start saving `state` at its step; returns at once while the write goes on.
        A step that is already saved is not written again."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        fields = _state_fields(state)
        ema = fields.pop("ema")
        meta = {"clipgen_version": clipgen.__version__, "stage": stage, "step": step}
        items = {"config": config.to_dict(), "data": data, "meta": meta}
        checksums = {
            "state": array_checksums(fields),
            "ema": array_checksums(ema),
            **{name: json_checksum(value) for name, value in items.items()},
        }
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(fields),
                ema=ocp.args.StandardSave(ema),
                checksums=ocp.args.JsonSave(checksums),
                **{name: ocp.args.JsonSave(value) for name, value in items.items()},
            ),
            force=force,
        )

    def restore(
        self, abstract_state: TrainState, config: ml_collections.ConfigDict
    ) -> Restored | None:
        """The newest readable checkpoint restored onto `abstract_state`'s shardings.

        An unreadable checkpoint is skipped, with a warning naming it, for the one before;
        one written for another model raises `CheckpointMismatchError` naming the keys that
        differ. Returns None when there is no checkpoint.
        """
        steps = self.all_steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                saved_config, meta = self._read_json(step)
            except Exception as error:  # noqa: BLE001 - any failure means unreadable
                self._skip(step, error, errors)
                continue
            check_compatible(saved_config, config, meta, self.directory / str(step))
            try:
                return self._restore_step(step, abstract_state)
            except Exception as error:  # noqa: BLE001
                self._skip(step, error, errors)
        raise RuntimeError(
            f"no readable checkpoint in {self.directory}: " + "; ".join(errors)
        ) from None

    def restore_for_inference(self) -> tuple[dict[str, Any], Any, int]:
        """(saved config, EMA parameters by name, step) of the newest checkpoint whose
        contents match their checksums, as host arrays, for inference; a damaged one is
        passed over (left in place) with a warning naming it."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors = []
        for step in reversed(steps):
            try:
                saved_config, _ = self._read_json(step)
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(ema=ocp.args.StandardRestore())
                )
                self._verify(step, "ema", array_checksums(restored["ema"]))
                return saved_config, restored["ema"], step
            except Exception as error:  # noqa: BLE001 - any failure means unreadable
                where = self.directory / str(step)
                logging.warning(
                    "checkpoint %s is unreadable (%s: %s); trying the one before",
                    where,
                    type(error).__name__,
                    error,
                )
                errors.append(f"{where}: {type(error).__name__}: {error}")
        raise CorruptCheckpointError(
            f"no readable checkpoint in {self.directory}: " + "; ".join(errors)
        )

    def _read_json(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config, meta) of a step, checked against its checksums."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()),
        )
        for name in ("config", "meta"):
            self._verify(step, name, json_checksum(restored[name]))
        return restored["config"], restored["meta"]

    def _restore_step(self, step: int, abstract_state: TrainState) -> Restored:
        fields = _state_fields(abstract_state)
        abstract_ema = fields.pop("ema")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(fields),
                ema=ocp.args.StandardRestore(abstract_ema),
                data=ocp.args.JsonRestore(),
            ),
        )
        self._verify(step, "state", array_checksums(restored["state"]))
        self._verify(step, "ema", array_checksums(restored["ema"]))
        self._verify(step, "data", json_checksum(restored["data"]))
        state = type(abstract_state)(**restored["state"], ema=restored["ema"])
        return Restored(state=state, data=restored["data"], step=step)

    def _checksums(self, step: int) -> dict[str, Any] | None:
        """What was recorded for a step; None for a checkpoint from before checksums."""
        if not (self.directory / str(step) / "checksums").is_dir():
            return None
        if step not in self._recorded:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())
            )
            self._recorded[step] = restored["checksums"]
        return self._recorded[step]

    def _verify(self, step: int, item: str, found: Any) -> None:
        """Raise CorruptCheckpointError naming the item (and array) when `found` differs
        from the checksum recorded at save."""
        recorded = self._checksums(step)
        if recorded is None:
            logging.warning(
                "checkpoint %s has no checksums: not verified", self.directory / str(step)
            )
            return
        expected = recorded[item]
        if found == expected:
            return
        where = self.directory / str(step) / item
        if isinstance(expected, dict):
            damaged = sorted(
                k for k in set(expected) | set(found) if expected.get(k) != found.get(k)
            )
            raise CorruptCheckpointError(
                f"{where}: the contents of {', '.join(damaged[:5])} differ from the checksums "
                "recorded when it was saved"
            )
        raise CorruptCheckpointError(
            f"{where} differs from the checksum recorded when it was saved"
        )

    def _skip(self, step: int, error: Exception, errors: list[str]) -> None:
        """Set an unreadable checkpoint aside (renamed, never deleted) so that training can
        save that step again, and say so."""
        where = self.directory / str(step)
        aside = self.directory / f"unreadable-{step}-{int(time.time())}"
        self._recorded.pop(step, None)
        if jax.process_index() == 0:
            where.rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        logging.warning(
            "checkpoint %s is unreadable (%s: %s); moved it to %s and trying the one before",
            where,
            type(error).__name__,
            error,
            aside,
        )
        errors.append(f"{where}: {type(error).__name__}: {error}")

    def wait(self) -> None:
        """Block until pending saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_compatible(
    saved: dict[str, Any], config: ml_collections.ConfigDict, meta: dict[str, Any], where: Path
) -> None:
    """Fail, naming the differing keys, when a checkpoint's model config differs from ours."""
    current = config.to_dict()
    differing = []
    for section in SHAPE_KEYS:
        old = _flatten(saved.get(section, {}), section)
        new = _flatten(current.get(section, {}), section)
        differing += [
            f"{key}: checkpoint {old.get(key, '<absent>')!r} vs config {new.get(key, '<absent>')!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not _new_option_off(key, old, new)
        ]
    if differing:
        raise CheckpointMismatchError(
            f"checkpoint {where} (clipgen {meta.get('clipgen_version', '?')}, stage "
            f"{meta.get('stage', '?')!r}) was written for another model; differing keys: "
            + "; ".join(differing)
            + ". Use a fresh --workdir, or the config the checkpoint was trained with."
        )


def _new_option_off(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A model option newer than the checkpoint, left off (False/None/0), changes nothing
    it holds: such a key is not a difference."""
    return key not in old and new.get(key) in (False, None, 0)


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: list(tree) if isinstance(tree, tuple) else tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}"))
    return flat


def _fingerprint(x: jax.Array) -> jax.Array:
    """A uint32 content checksum of an array: its bits as 32-bit (or narrower) words, each
    times an odd weight set by its position, summed mod 2^32; any one changed bit changes
    it, and so does moving words about."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2 * 2654435761 % 2**32)
    return jnp.sum(words * (weights + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_fingerprint(leaf) for leaf in leaves]) if leaves else jnp.zeros(0)


def array_checksums(tree: Any) -> dict[str, int]:
    """A content checksum of every array of `tree` by key path, computed where the arrays
    are (a sharded array's shards are summed on their devices)."""
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree)
    sums = jax.device_get(_fingerprints([jnp.asarray(leaf) for _, leaf in paths_and_leaves]))
    return {
        jax.tree_util.keystr(path): int(total)
        for (path, _), total in zip(paths_and_leaves, sums, strict=True)
    }


def json_checksum(value: Any) -> str:
    """The sha256 of a JSON item's canonical form."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _state_fields(state: TrainState) -> dict[str, Any]:
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
