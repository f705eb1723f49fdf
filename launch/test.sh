#!/usr/bin/env bash
# Lint and run the test suite on the CPU (8 fake devices), in .venv made on first use.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k diffusion`.
source "$(dirname "$0")/_venv.sh" test
echo "== ruff check"
ruff check .
echo "== ruff format --check"
ruff format --check .
echo "== pytest"
python -m pytest -q "$@"
