"""Data-parallel scaling: environment steps per second of ``trpo_ext.train`` against the number of
torchrun ranks, with the efficiency speed-up / ranks.

Strong scaling: the run's settings are fixed (``--n-envs`` environments, ``--n-steps`` steps each
per iteration, the defaults 16 × 128 = 2048 samples, a usual TRPO batch for MuJoCo) and split over
K ranks, as a user's run is.  Each measurement is one ``torchrun --nproc-per-node K`` launch (K = 1
too, so that every row pays the same launcher) training ``--iterations`` iterations; the rate is
rank 0's steps over its wall time from the end of the first iteration (start-up and the first
iteration's one-off costs excluded) to the end of the last, logging and checkpoints off.  Every
launch first checks that its ranks end with the same parameters, bit for bit.

On a machine whose cores other work shares, wall-clock rates say little about scaling; the CPU
seconds per 1000 steps, summed over the ranks, say how much work the ranks add (collectives,
duplicated per-iteration work): the CPU efficiency, 1-rank CPU time / K-rank CPU time, is what
the ranks would reach on idle cores, waits at the collectives aside.

The rows of one repeat run in turn (tasks × rank counts), and the table reports each row's median
over ``--repeats`` with its range: on a machine shared with other work the rows see about the same
load.  Use ``--ranks`` up to the machine's cores (each rank is one process on one thread).

    python benchmarks/scaling.py [--tasks HalfCheetah-v5 Hopper-v5] [--ranks 1 2 4 8 16]
        [--n-envs 16] [--n-steps 128] [--iterations 6] [--repeats 3]
        [--out scaling.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args) -> None:
    """One rank of one launch: train, then write its rate and its parameters' digest."""
    import hashlib

    import torch

    sys.path.insert(0, ROOT)
    import trpo_ext

    torch.set_num_threads(1)
    steps = args.iterations * args.n_envs * args.n_steps
    cpu = []  # this process's CPU seconds at the end of each iteration
    result = trpo_ext.train(args.tasks[0], steps, seed=0, n_envs=args.n_envs,
                            n_steps=args.n_steps,
                            callback=lambda entry: cpu.append(time.process_time()))
    h = result.history
    timed_steps = h[-1]["time/total_steps"] - h[0]["time/total_steps"]
    rate = timed_steps / (h[-1]["time/elapsed_s"] - h[0]["time/elapsed_s"])
    digest = hashlib.sha256(result.policy.flat.detach().numpy().tobytes() +
                            result.value_fn.flat.detach().numpy().tobytes()).hexdigest()
    with open(f"{args.worker_out}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump({"steps_per_s": rate, "digest": digest,
                   "cpu_s_per_kstep": 1000 * (cpu[-1] - cpu[0]) / timed_steps}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(task: str, ranks: int, args, tmp: str):
    out = os.path.join(tmp, f"{task}-{ranks}-{time.monotonic_ns()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), os.path.abspath(__file__), "--worker-out", out,
           "--tasks", task, "--n-envs", str(args.n_envs), "--n-steps", str(args.n_steps),
           "--iterations", str(args.iterations)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRPO_EXT_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    records = []
    for r in range(ranks):
        with open(f"{out}.{r}") as f:
            records.append(json.load(f))
    digests = {rec["digest"] for rec in records}
    if len(digests) != 1:
        raise AssertionError(f"{task} on {ranks} ranks: the ranks' parameters differ")
    # Rank 0's rate is the run's (it waits for the others at every collective); the CPU time is
    # all ranks'.
    return records[0]["steps_per_s"], sum(rec["cpu_s_per_kstep"] for rec in records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--n-envs", type=int, default=16)
    p.add_argument("--n-steps", type=int, default=128)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="append one JSON line per measurement")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        _worker(args)
        return
    if args.iterations < 2:
        p.error("--iterations must be >= 2 (the first is not timed)")
    bad = [k for k in args.ranks if k < 1 or args.n_envs % k]
    if bad:
        p.error(f"--ranks {bad}: each must divide --n-envs {args.n_envs}")

    rows = [(task, k) for task in args.tasks for k in args.ranks]
    print(f"# {platform.node()} | {os.cpu_count()} CPUs | {time.strftime('%Y-%m-%d %H:%M')} | "
          f"n_envs={args.n_envs} n_steps={args.n_steps} iterations={args.iterations} "
          f"repeats={args.repeats} | load average {os.getloadavg()[0]:.1f}", flush=True)
    rates = {row: [] for row in rows}
    cpus = {row: [] for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for row in rows:
                rate, cpu = _launch(*row, args, tmp)
                rates[row].append(rate)
                cpus[row].append(cpu)
                print(f"  repeat {repeat}: {row[0]} ranks={row[1]}: "
                      f"{rate:,.0f} steps/s, {cpu:.3f} CPU s per 1000 steps", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({"task": row[0], "ranks": row[1],
                                            "steps_per_s": rate,
                                            "cpu_s_per_kstep": cpu,
                                            "n_envs": args.n_envs, "n_steps": args.n_steps,
                                            "host": platform.node(), "time": time.time()}) + "\n")
    # Efficiency = speed-up / ranks from the wall-clock rates; on a machine whose cores other
    # work also uses, the CPU-time ratio (1-rank CPU time per step / K ranks' together) says
    # what the ranks would give on idle cores, waits at the collectives aside.
    print("\n| task | ranks | steps/s median (range) | speed-up | efficiency "
          "| CPU s / 1000 steps | CPU efficiency |")
    print("|---|---|---|---|---|---|---|")
    nan = float("nan")
    for task, k in rows:
        med, cpu = statistics.median(rates[(task, k)]), statistics.median(cpus[(task, k)])
        base = statistics.median(rates[(task, 1)]) if (task, 1) in rates else nan
        base_cpu = statistics.median(cpus[(task, 1)]) if (task, 1) in cpus else nan
        speedup = med / base
        lo, hi = min(rates[(task, k)]), max(rates[(task, k)])
        print(f"| {task} | {k} | {med:,.0f} ({lo:,.0f}–{hi:,.0f}) | {speedup:.2f} | "
              f"{speedup / k:.0%} | {cpu:.3f} | {base_cpu / cpu:.0%} |")


if __name__ == "__main__":
    main()
