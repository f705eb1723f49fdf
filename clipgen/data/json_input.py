"""One reader for the JSON files a user hands clipgen beside weights and data (a model's
config.json, a pipeline's model_index.json, scheduler_config.json, tokenizer_config.json, a
sharded checkpoint's index, an embedding manifest): a file that is missing, unreadable, not
JSON or not a JSON object, and a field of the wrong type, fail with an InputError naming the
file (and the field) and saying what to do.

    config = Fields(read_json_object(path, "a model config"), str(path))
    width = config.get("hidden_size", 768, POSITIVE_INT)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from clipgen.errors import InputError

RESAVE = "fix the file, or re-save the model with save_pretrained"


def read_json_object(path: str | os.PathLike, what: str, fix: str = RESAVE) -> dict[str, Any]:
    """The JSON object in the file at `path` (`what` it should hold names it in errors;
    `fix` says what to do). Duplicate keys are refused: JSON readers disagree on which wins."""
    path = Path(path)
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"{path} {where}; expected {what} there")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise InputError(f"{path} cannot be read ({error.strerror or error}); {fix}") from None
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not UTF-8 text (byte {error.start}), so not JSON: expected {what}; {fix}"
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as error:
        raise InputError(f"{path}: key {error.key!r} appears twice; {fix}") from None
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}): expected {what}; {fix}"
        ) from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply to be {what}; {fix}") from None
    if not isinstance(value, dict):
        raise InputError(
            f"{path} holds a JSON {_json_type(value)}, not an object: expected {what}; {fix}"
        )
    return value


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _json_type(value: Any) -> str:
    """How JSON calls a value's type, with the value when it is short."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    name = "null" if value is None else names.get(type(value), "object")
    shown = json.dumps(value) if not isinstance(value, (dict, list)) else ""
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return f"{name} {shown}".strip()


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field may hold: `accepts(value)`, described as `name` ("an integer")."""

    name: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


INT = Kind("an integer", _is_int)
POSITIVE_INT = Kind("a positive integer", lambda v: _is_int(v) and v > 0)
COUNT = Kind("an integer >= 0", lambda v: _is_int(v) and v >= 0)
NUMBER = Kind("a finite number", _is_number)
STR = Kind("a string", lambda v: isinstance(v, str))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))


def list_of(kind: Kind, min_length: int = 0) -> Kind:
    """A JSON array of `kind` items, at least `min_length` of them."""
    longest = f", at least {min_length} of them" if min_length else ""
    return Kind(
        f"an array of items each {kind.name}{longest}",
        lambda v: isinstance(v, list) and len(v) >= min_length and all(map(kind.accepts, v)),
    )


def optional(kind: Kind) -> Kind:
    """`kind` or null."""
    return Kind(f"{kind.name} or null", lambda v: v is None or kind.accepts(v))


def either(*kinds: Kind) -> Kind:
    """Any of `kinds`."""
    return Kind(" or ".join(k.name for k in kinds), lambda v: any(k.accepts(v) for k in kinds))


class Fields:
    """A JSON object's fields read with their kinds checked; `source` (the file, and the
    path of a nested object) and `fix` (what to do) make the InputError of a wrong one."""

    def __init__(self, values: Mapping[str, Any], source: str, fix: str = RESAVE):
        self.values = values
        self.source = source
        self.fix = fix

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def keys(self):
        return self.values.keys()

    def raw(self, name: str, default: Any = None) -> Any:
        """A field as it is, unchecked."""
        return self.values.get(name, default)

    def get(self, name: str, default: Any, kind: Kind) -> Any:
        """Field `name` (`default`, unchecked, when absent), which must be of `kind`."""
        if name not in self.values:
            return default
        value = self.values[name]
        if not kind.accepts(value):
            self.fail(name, f"is {_json_type(value)}, expected {kind.name}")
        return value

    def section(self, *names: str) -> Fields:
        """The first of the nested objects `names` that is present and not null ({} when
        none is), as Fields."""
        for name in names:
            value = self.values.get(name)
            if value is not None:
                if not isinstance(value, dict):
                    self.fail(name, f"is {_json_type(value)}, expected an object")
                return Fields(value, f"{self.source} {name}", self.fix)
        return Fields({}, f"{self.source} {names[0]}", self.fix)

    def fail(self, name: str, problem: str) -> None:
        """Raise the InputError of field `name`: `problem` says what is wrong with it."""
        raise InputError(f"{self.source}: field {name!r} {problem}; {self.fix}")

    def error(self, message: str) -> InputError:
        """An InputError about the file: `message`, then what to do."""
        return InputError(f"{self.source}: {message}; {self.fix}")
