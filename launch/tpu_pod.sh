#!/usr/bin/env bash
# Train one stage on a Cloud TPU pod slice. Run the same command on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \
#     "cd clipgen && bash launch/tpu_pod.sh --config=configs/prior.py:paper --workdir=gs://BUCKET/run"
# Each worker makes its own .venv with jax[tpu]; `clipgen train` detects the pod and calls
# jax.distributed.initialize() before touching a device. Every worker must run it: all of
# them take part in saving and restoring checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e . "jax[tpu]==0.10.2"
fi
exec .venv/bin/clipgen train "$@"
