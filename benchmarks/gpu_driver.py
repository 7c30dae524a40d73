"""The driver on a GPU: host synchronisations inside the update, and wall time against the CPU.

1. Sync audit.  ``train(..., device="cuda")`` runs a few iterations with each ``trpo_update`` call
   under ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising call inside the update is
   counted by the innermost trpo_ext source line that made it.  The issue's contract: the only host
   synchronisations in the update are the line-search decisions (one per trial).
2. Wall time.  The same ``train`` call on ``device="cpu"`` and ``device="cuda"`` on the same
   machine, per-iteration wall time (median over the iterations after the first) and its sampling
   share.  On CUDA the ``time/*`` split inside the update is host time (the update does not
   synchronise), so only the iteration's wall time and sampling time are compared.

    PYTHONPATH=. python benchmarks/gpu_driver.py [--envs Pendulum-v1,HalfCheetah-v5] [--steps 20480]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trpo_ext  # noqa: E402

_train_module = sys.modules["trpo_ext.train"]
PACKAGE_DIR = os.path.dirname(os.path.abspath(trpo_ext.__file__))


def _innermost_package_frame(stack) -> str:
    for frame in reversed(stack):
        if os.path.abspath(frame.filename).startswith(PACKAGE_DIR):
            rel = os.path.relpath(frame.filename, os.path.dirname(PACKAGE_DIR))
            return f"{rel}:{frame.lineno} {frame.line.strip() if frame.line else ''}"
    return "(outside trpo_ext)"


def sync_audit(env_id: str, steps: int) -> collections.Counter:
    """Counts the synchronising calls inside each trpo_update, by the trpo_ext line that made them.

    torch reports each one as a Python warning (set_sync_debug_mode("warn")); a showwarning hook
    takes the Python stack at that moment.
    """
    counts: collections.Counter = collections.Counter()
    original = _train_module.trpo_update
    updates = 0

    def show(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" in str(message):
            counts[_innermost_package_frame(traceback.extract_stack()[:-1])] += 1

    def audited(*args, **kwargs):
        nonlocal updates
        updates += 1
        torch.cuda.synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    _train_module.trpo_update = audited
    try:
        result = trpo_ext.train(env_id, steps, device="cuda", seed=0)
    finally:
        _train_module.trpo_update = original
    trials = sum(int(h["train/line_search_steps"]) for h in result.history)
    print(f"sync audit, {env_id}: {updates} updates, {trials} line-search trials in all")
    return counts


def wall_times(env_id: str, steps: int, device: str):
    result = trpo_ext.train(env_id, steps, device=device, seed=0)
    h = result.history
    walls = [b["time/elapsed_s"] - a["time/elapsed_s"] for a, b in zip(h, h[1:])]
    sampling = [b["time/sampling_s"] for b in h[1:]]
    return statistics.median(walls), statistics.median(sampling), h[-1]["rollout/ep_return_mean"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--envs", default="Pendulum-v1,HalfCheetah-v5")
    ap.add_argument("--steps", type=int, default=20480)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_driver.py needs a GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for env_id in args.envs.split(","):
        try:
            counts = sync_audit(env_id, 3 * 2048)
        except Exception as e:  # an env that cannot be made here (no MuJoCo): say so, go on
            print(f"{env_id}: skipped ({type(e).__name__}: {e})")
            continue
        if not counts:
            print("  no synchronising call inside the update")
        for where, n in counts.most_common():
            print(f"  {n:5d}  {where}")
        per = {}
        for device in ("cpu", "cuda"):
            per[device] = wall_times(env_id, args.steps, device)
        rows.append((env_id, per))
    print("\n| task | cpu s/iter | cpu sampling | cuda s/iter | cuda sampling | cuda/cpu |")
    print("|---|---|---|---|---|---|")
    for env_id, per in rows:
        c, g = per["cpu"], per["cuda"]
        print(f"| {env_id} | {c[0]:.3f} | {c[1]:.3f} | {g[0]:.3f} | {g[1]:.3f} | {g[0] / c[0]:.2f} |")


if __name__ == "__main__":
    main()
