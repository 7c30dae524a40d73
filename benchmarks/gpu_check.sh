#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): build with CUDA, run the CUDA tests, then
# every benchmark with --device cuda and the driver's GPU check.  Logs go to $OUT (or ./gpu_logs).
# Python packages missing there travel as cp312 wheels in .whl/ (git-ignored; `run` with carry
# [".whl"]): gymnasium 1.4.0, farama-notifications, mujoco 4.0.0 with mujoco-core, mujoco-studio,
# glfw, pyopengl and websockets; stable-baselines3 and sb3-contrib 2.9.2 for the comparison.
# Budget about 6 minutes (build ~1 min, CUDA tests ~1.5 min, benchmarks ~3 min); the CPU tests need
# their own 2-3 min, and the sb3-contrib comparisons (when its wheels are in .whl/; SKIP_SB3=1 skips
# them) up to 5 min more.
#   bash benchmarks/gpu_check.sh            # from the repository root
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stage() { echo "=== $1 ($(( $(date +%s) - start )) s)"; }

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

stage "machine"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; nproc
} 2>&1 | tee "$OUT/machine.txt"

stage "build (CUDA, sm_90)"
if ! (TRPO_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
        timeout 300 python3 setup.py build_ext --inplace) >"$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; exit 1
fi
python3 -c "import trpo_ext; print(trpo_ext.build_info())" 2>&1 | tee -a "$OUT/machine.txt"

stage "CUDA tests"
timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider -n 8 -k "cuda or CUDA" tests \
    2>&1 | tee "$OUT/tests.log" | tail -25

stage "bench_kl"
timeout 120 python3 benchmarks/bench_kl.py --device cuda --repeats 1 2>&1 \
    | tee "$OUT/bench_kl.log" | tail -45
stage "gpu_driver"
timeout 60 python3 benchmarks/gpu_driver.py 2>&1 | grep -v "settotalmass\|^$" \
    | tee "$OUT/gpu_driver.log" | tail -20
stage "bench_cg"
timeout 60 python3 benchmarks/bench_cg.py --device cuda 2>&1 | tee "$OUT/bench_cg.log" | tail -12
stage "bench_gae"
timeout 40 python3 benchmarks/bench_gae.py --device cuda 2>&1 | tee "$OUT/bench_gae.log" | tail -7
stage "CPU tests on this machine's torch (not slow)"
timeout ${CPU_TEST_TIMEOUT:-150} python3 -m pytest -v -rf -p no:cacheprovider -n 16 -m "not slow" \
    -k "not cuda and not CUDA" --ignore=tests/test_cpp.py tests 2>&1 | tee "$OUT/cpu_tests.log" \
    | grep -E "FAILED|ERROR|passed|failed" | tail -12
# The driver against sb3-contrib on this machine's CPU, our defaults, then EnvPool's engine.
# Needs sb3-contrib and stable-baselines3 wheels in .whl/ (pure Python).
if python3 -c "import sb3_contrib" 2>/dev/null && [ -z "${SKIP_SB3:-}" ]; then
    stage "compare_sb3, defaults"
    timeout 150 python3 benchmarks/compare_sb3.py --repeats 2 2>&1 | grep -v "settotalmass\|^$" \
        | tee "$OUT/compare_sb3.log" | tail -24
    stage "compare_sb3, vector_env=envpool"
    timeout 150 python3 benchmarks/compare_sb3.py --repeats 2 --vector-env envpool 2>&1 \
        | grep -v "settotalmass\|^$" | tee "$OUT/compare_sb3_envpool.log" | tail -24
fi
# Data-parallel scaling over torchrun ranks on this machine's cores (issue 18's 8-rank target).
stage "scaling (torchrun ranks)"
timeout 300 python3 benchmarks/scaling.py --ranks 1 2 4 8 16 --repeats 1 \
    --out "$OUT/scaling.jsonl" 2>&1 | grep -v "settotalmass\|^$" | tee "$OUT/scaling.log" | tail -14
stage "done"
