#!/usr/bin/env bash
# The main job on one CPU: `clipgen demo` on the shapes world, in .venv made on first use.
# Arguments go to `clipgen demo`, e.g. `bash launch/demo.sh --workdir /tmp/demo`.
source "$(dirname "$0")/_venv.sh" run
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
clipgen demo "$@"
