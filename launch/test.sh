#!/usr/bin/env bash
# Lint and run the test suite on the CPU (8 fake devices a worker), in .venv made on first use.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k diffusion`.
source "$(dirname "$0")/_venv.sh" test
echo "== ruff check"
ruff check .
echo "== ruff format --check"
ruff format --check .
echo "== pytest"
# Two workers: one XLA:CPU process leaves a 2-core machine a third idle (compiles and
# Python run on one core); worksteal keeps both busy to the end. The 25 slowest tests are
# listed at the end, to keep the suite within its 25 minutes.
python -m pytest -q -n 2 --dist worksteal --durations=25 "$@"
