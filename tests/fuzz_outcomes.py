"""The outcome tally the fuzz tests of damaged inputs share: each case records (entry point,
case, outcome) and a last test prints the counts for the note and fails on any traceback or
silent load."""

from __future__ import annotations

from collections import Counter

import pytest


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
