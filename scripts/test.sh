#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite: CPU kernels, the C++ embedding (ctest), the
# driver and the CLI.  CUDA tests skip when no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
