"""The README's benchmark commands, run in their smallest form so that none goes stale.

Each benchmark asserts agreement with its baseline before it times anything, so a wrong kernel fails
here too.  Timings are printed, never asserted.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_gae_quick():
    out = run_benchmark("benchmarks/bench_gae.py", "--quick")
    assert "(2048, 16)" in out and "speedup" in out


def test_bench_cg_small():
    out = run_benchmark("benchmarks/bench_cg.py", "--sizes", "1e4")
    assert "speedup" in out


def test_bench_kl_quick():
    out = run_benchmark("benchmarks/bench_kl.py", "--device", "cpu", "--quick")
    assert "surr+kl gauss" in out and "fvp kl gauss" in out


@pytest.mark.skipif(importlib.util.find_spec("sb3_contrib") is None,
                    reason="compare_sb3.py needs `pip install sb3-contrib`")
def test_compare_sb3_tiny():
    out = run_benchmark("benchmarks/compare_sb3.py", "--envs", "CartPole-v1", "--steps", "4096",
                        "--repeats", "1")
    assert "CartPole-v1" in out and "Ceiling in one process" in out


@pytest.mark.skipif(importlib.util.find_spec("envpool") is None,
                    reason="bench_envs.py needs EnvPool (pip install 'trpo_ext[envpool]')")
def test_bench_envs_tiny():
    out = run_benchmark("benchmarks/bench_envs.py", "--envs", "Hopper-v5", "--steps", "2048",
                        "--repeats", "1")
    assert "Hopper-v5" in out and "speedup" in out
