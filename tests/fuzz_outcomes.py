"""The outcome tally the fuzz tests of damaged inputs share: each case records (entry point,
case, outcome) and a last test prints the counts for the note and fails on any traceback or
silent load."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from clipgen.errors import InputError


def check_outcome_counts(outcomes: list[tuple[str, str, str]]) -> None:
    """Print per entry point the cases tried, clear InputErrors, correct handling, unclear
    errors, tracebacks and silent loads; the last two must be 0."""
    counts: dict[str, Counter] = {}
    for entry, _, outcome in outcomes:
        counts.setdefault(entry, Counter())[outcome] += 1
    for entry, counted in sorted(counts.items()):
        print(
            f"{entry}: tried {sum(counted.values())}, clear InputError {counted['clear']}, "
            f"correct handling {counted['handled']}, unclear {counted['unclear']}, "
            f"tracebacks {counted['traceback']}, silent {counted['silent']}"
        )
    if not outcomes:
        pytest.skip("no fuzz case ran")
    assert all(c["traceback"] == 0 and c["silent"] == 0 for c in counts.values())


def outcome_of(call: Callable[[], object], named: Callable[[str], bool]) -> tuple[str, str]:
    """(outcome, message) of feeding a damaged input to `call`: "clear" for an InputError
    whose message `named` accepts, "unclear" for another InputError, "traceback" for any
    other exception, "silent" when it loads."""
    try:
        call()
    except InputError as error:
        return ("clear" if named(str(error)) else "unclear"), str(error)
    except Exception as error:  # noqa: BLE001 - what the fuzz counts
        return "traceback", f"{type(error).__name__}: {error}"
    return "silent", "loaded"
