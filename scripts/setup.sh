#!/usr/bin/env bash
# Installs everything trpo_ext needs on a fresh machine (Python + pip + a C++ compiler; the CUDA
# toolkit is optional) and builds the extension.  Idempotent: rerunning reinstalls the package only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.14.1 is a CUDA 13.0 build; the build needs it present (no build isolation) so that the
# extension is compiled against the torch that will import it.
"$PY" -m pip install --quiet "torch==2.14.1" ninja numpy "setuptools>=64" wheel
"$PY" -m pip install --quiet "gymnasium[mujoco]>=1.0" scipy pytest hypothesis pytest-benchmark \
  matplotlib tensorboard tqdm sb3-contrib
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --quiet --no-build-isolation -e .
"$PY" -c "import trpo_ext; print('trpo_ext built:', trpo_ext.build_info())"
