"""The one error type for a user's unusable input (a damaged image, weights file, shard or
config; a wrong path): its message says what was wrong, where (the file, key or stage) and
what to do. The CLI prints it in one line and exits 2; it is a ValueError, so callers that
catch those keep working."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """A user's input cannot be used; the message says what, where and what to do."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (the messages of libraries it quotes may span
    several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def output_directory(path: str | os.PathLike, flag: str = "--workdir") -> Path:
    """`path` as a directory that exists or can be created and written, checked before
    anything loads or compiles; InputError naming `flag` otherwise."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise InputError(f"{flag} {path} {where}, not a directory: give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: {existing} is not writable; give a writable directory")
    return path
