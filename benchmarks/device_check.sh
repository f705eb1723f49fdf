#!/usr/bin/env bash
# The accelerator check: benchmarks/device_check.py's JSON lines (train steps of the bench
# presets and of the decoder at paper width, bf16 and f32; the cascade's sampling time)
# into $OUT (default ./device_check_out), at most a few minutes.
#
# On a GPU (or TPU) box whose Python already has jax with its accelerator, flax, optax and
# orbax-checkpoint, and no network:
#   1. here, where the registries are reachable:   bash benchmarks/device_check.sh --fetch-wheels
#      (wheels of what else the check imports, for Python $PYVER (3.12) on x86_64 Linux, into
#      benchmarks/wheels/, which git ignores)
#   2. copy the checkout (with benchmarks/wheels/) to the box and run there:
#                                                   bash benchmarks/device_check.sh
#      (installs the wheels with pip --no-index, then runs the check)
# Anywhere, without an accelerator (the smoke mode the test suite runs, so it cannot rot):
#   bash benchmarks/device_check.sh --cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=benchmarks/wheels
# What clipgen imports on the check's path beyond jax, flax, optax and orbax-checkpoint
# (TensorFlow, tensorflow-datasets and clu are not imported there).
NEEDED=(ml_collections absl-py PyYAML tokenizers pillow scipy tqdm)
if [ "${1:-}" = "--fetch-wheels" ]; then
  "$PYTHON" -m pip download -q --dest "$WHEELS" --only-binary=:all: \
    --python-version "${PYVER:-3.12}" --implementation cp --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "${NEEDED[@]}"
  echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l)"
  exit 0
fi
if [ -d "$WHEELS" ] && ! "$PYTHON" -c "import ml_collections, tokenizers, PIL, scipy, tqdm" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "${NEEDED[@]}"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" benchmarks/device_check.py \
  --out "${OUT:-device_check_out}" "$@"
