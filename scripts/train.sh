#!/usr/bin/env bash
# Set up (scripts/setup.sh) and train the embedded default task: CartPole-v1, 100k steps, default
# settings; ends with the evaluation and the paths of the learning curve and the last checkpoint.
# Extra arguments go to `trpo-ext train` (e.g. --env InvertedPendulum-v5 --steps 200000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m trpo_ext train "$@"
