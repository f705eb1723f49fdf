"""`python -m clipgen.cli ...`: the `clipgen` command."""

from clipgen.cli import run

run()
