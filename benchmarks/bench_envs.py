"""Vector-env engines end to end: ``train(env, steps)`` with ``vector_env="sync"`` (the default)
against ``vector_env="envpool"``, and EnvPool's own raw stepping rate for the same environments and
threads (random actions).

Same process, alternating sync / envpool, ``--repeats`` times each after one untimed warm-up of
each; medians reported.  The sampling time is the history's ``time/sampling_s``.  EnvPool's own
raw rate, random actions drawn beforehand, ``n_envs`` environments and ``--threads`` threads: "sync"
is one pool's ``step`` in a loop, "async" its send/recv mode with batches of ``n_envs / 2`` (each
batch's actions sent as soon as it comes back); the fractions are of the better of the two.  "ours,
no policy" is :class:`EnvPoolVectorEnv` (what ``vector_env="envpool"`` builds) with the same random
actions.

    python benchmarks/bench_envs.py [--envs HalfCheetah-v5 Hopper-v5] [--steps 20480]
        [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trpo_ext  # noqa: E402
from benchmarks._common import describe_machine, print_table  # noqa: E402
from trpo_ext.config import TRPOConfig  # noqa: E402
from trpo_ext.envs import EnvPoolVectorEnv  # noqa: E402


def run_train(env_id: str, steps: int, seed: int, **settings):
    t0 = time.perf_counter()
    result = trpo_ext.train(env_id, steps, seed=seed, **settings)
    total = time.perf_counter() - t0
    h = result.history
    assert h[-1]["time/total_steps"] >= steps
    # Correctness first: every accepted step inside the trust region with a positive improvement.
    for e in h:
        if e["train/line_search_success"]:
            assert e["train/kl"] <= settings.get("max_kl", TRPOConfig().max_kl), e
            assert e["train/surrogate_improvement"] > 0, e
    return total, sum(e["time/sampling_s"] for e in h)


def raw_envpool(env_id: str, n_envs: int, threads: int, steps: int, mode: str) -> float:
    """Steps per second of EnvPool alone with random actions."""
    import envpool

    rng = np.random.default_rng(0)
    if mode == "ours":
        envs = EnvPoolVectorEnv(env_id, n_envs, threads)
        space = envs.single_action_space
    else:
        batch = n_envs if mode == "sync" else n_envs // 2
        envs = envpool.make(env_id, env_type="gymnasium", num_envs=n_envs, batch_size=batch,
                            num_threads=threads, seed=0)
        space = envs.action_space
    actions = rng.uniform(space.low, space.high, (256, n_envs) + space.shape).astype(space.dtype)
    iters = steps // n_envs
    if mode == "async":
        envs.async_reset()
    else:
        envs.reset()
    t0 = time.perf_counter()
    if mode == "ours":
        groups = envs.env_groups
        for g, sl in enumerate(groups):
            envs.send(actions[0, sl], g)
        for t in range(1, iters + 1):
            for g, sl in enumerate(groups):
                envs.recv(g)
                if t < iters:
                    envs.send(actions[t % 256, sl], g)
    elif mode == "async":
        for t in range(2 * iters):
            *_, info = envs.recv()
            ids = info["env_id"]
            envs.send(actions[t % 256, ids], ids)
    else:
        for t in range(iters):
            envs.step(actions[t % 256])
    rate = iters * n_envs / (time.perf_counter() - t0)
    envs.close()
    return rate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"])
    ap.add_argument("--steps", type=int, default=20480)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n_envs = TRPOConfig().n_envs
    print(f"machine: {describe_machine()}; train(env, {args.steps}) on defaults ({n_envs} envs), "
          f"envpool with env_threads={args.threads}; alternating, median of {args.repeats}")
    engines = {"sync": {}, "envpool": {"vector_env": "envpool", "env_threads": args.threads}}
    rows, rates = [], []
    for env_id in args.envs:
        for settings in engines.values():  # warm-up, untimed
            run_train(env_id, TRPOConfig().n_envs * TRPOConfig().n_steps, 0, **settings)
        runs = {k: [] for k in engines}
        raws = {"sync": [], "async": [], "ours": []}
        for r in range(args.repeats):
            for name, settings in engines.items():
                runs[name].append(run_train(env_id, args.steps, r, **settings))
            for mode in raws:
                raws[mode].append(raw_envpool(env_id, n_envs, args.threads, args.steps, mode))
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
               for k, v in runs.items()}
        raw = {k: statistics.median(v) for k, v in raws.items()}
        (s_tot, s_samp), (e_tot, e_samp) = med["sync"], med["envpool"]
        rows.append([env_id, s_tot, e_tot, s_tot / e_tot, s_samp, e_samp, s_samp / e_samp])
        e_sample_sps = args.steps / e_samp
        best = max(raw["sync"], raw["async"])
        rates.append([env_id, raw["sync"], raw["async"], raw["ours"], e_sample_sps,
                      e_sample_sps / best, args.steps / e_tot, args.steps / e_tot / best])
        print(f"{env_id}: sync totals {[round(x[0], 2) for x in runs['sync']]}, envpool totals "
              f"{[round(x[0], 2) for x in runs['envpool']]}", flush=True)
    print("\nEnd to end and sampling (seconds, median)")
    print_table(["env", "sync total", "envpool total", "speedup", "sync sampling",
                 "envpool sampling", "sampling speedup"], rows)
    print("\nSteps per second (EnvPool raw: random actions, same envs and threads)")
    print_table(["env", "raw sync", "raw async", "ours, no policy", "envpool sampling",
                 "fraction of raw", "envpool end to end", "fraction of raw"], rates)


if __name__ == "__main__":
    main()
