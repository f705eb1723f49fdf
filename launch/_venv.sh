# Sourced by the launch scripts: make .venv when missing and (re)install clipgen into it
# whenever setup.py changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "clipgen needs Python 3.11 (jax 0.10.x is the last series for it); $PYTHON is $("$PYTHON" -V 2>&1)." >&2
  echo "Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.clipgen-install-$1
WANT="$(cat setup.py launch/_venv.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "== installing clipgen[$1] into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip
  if [ "$1" = test ]; then spec='.[test]'; else spec='.'; fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
  if [ "$1" = test ]; then
    # The FID parity tests compare with torch-fidelity, whose metadata demands torchvision
    # (which breaks beside this torch); the modules they use import without it.
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps torch-fidelity==0.4.0
  fi
  echo "$WANT" >"$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
