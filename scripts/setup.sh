#!/usr/bin/env bash
# Installs everything trpo_ext needs on a fresh machine (Python >= 3.10 + pip + a C++ compiler; the
# CUDA toolkit is optional) and builds the extension.  Rerunning is quick: installed packages are
# skipped and the extension build is incremental (object files stay in build/), so an unchanged
# extension is not recompiled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.14.1 is a CUDA 13.0 build; the build needs it present (no build isolation) so that the
# extension is compiled against the torch that will import it.
"$PY" -m pip install --quiet "torch==2.14.1" ninja numpy "setuptools>=64" wheel \
  "gymnasium[mujoco]>=1.0" scipy pytest hypothesis pytest-benchmark matplotlib tensorboard tqdm \
  sb3-contrib "envpool==1.2.5; python_version < '3.12'"

export MAX_JOBS=${MAX_JOBS:-2}
if [ -e build ]; then
  echo "setup.sh: bringing trpo_ext's compiled extension up to date (only changed files recompile)"
else
  echo "setup.sh: compiling trpo_ext's C++ extension: about 5 minutes on 2 cores, 15-20 with CUDA" \
       "kernels (TRPO_EXT_CUDA=0 skips them); the [n/N] lines below are its progress"
fi
"$PY" setup.py --quiet build_ext --inplace

# Register this source tree as the installed package (editable), once.  The extension built above
# is reused (setup.py keeps the object files in build/ for pip too), so this only links it.
if ! "$PY" - <<'EOF' 2>/dev/null; then
import importlib.metadata as md, json, os, sys
url = json.loads(md.distribution("trpo_ext").read_text("direct_url.json") or "{}")
here = url.get("url", "").removeprefix("file://")
sys.exit(0 if url.get("dir_info", {}).get("editable") and os.path.samefile(here, ".") else 1)
EOF
  "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
fi
"$PY" -c "import trpo_ext; print('trpo_ext built:', trpo_ext.build_info())"
