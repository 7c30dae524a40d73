"""trpo_ext.train against sb3-contrib's TRPO for the same work, and raw environment stepping rates.

Same work: same environment, total steps, samples per update (2048 = 8 envs × 256 steps), network
sizes (64, 64) tanh, CG iterations (10), line-search steps (10, ratio 0.8), max KL (0.01), GAE
(0.99, 0.95), and one torch thread in both.  Ours runs on its default settings; sb3-contrib keeps
its own critic defaults (10 epochs of 128-sample minibatches; ours: 5 epochs of 256) and runs the
same 8 environments in a DummyVecEnv (``--sb3-n-envs 1`` gives sb3's own default of 1 env × 2048).
The two alternate within one process, ``--repeats`` times each, after one untimed warm-up of each
(imports, first-call costs).  End-to-end time counts everything from the call of ``train`` (for
sb3: constructing the model and its environments, then ``learn``) to its return.  The update time
is everything but sampling: for ours the sum of the history's time split, for sb3 the time inside
``TRPO.train``.  The last table is the ceiling of one process: the plain loop's stepping time for
the same number of steps (one env, random actions) plus our update time; sb3's total over that
floor is the largest end-to-end speedup possible without stepping environments in parallel.

``--env-workers K`` passes ``env_workers=K`` to ours (``-1``: auto, one worker per spare core), to
measure stepping in parallel on machines with more cores; without it ours keeps its default.

    python benchmarks/compare_sb3.py [--envs HalfCheetah-v5 Hopper-v5] [--steps 20480]
        [--repeats 2] [--sb3-n-envs 8] [--env-workers K]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))
import trpo_ext  # noqa: E402
from benchmarks._common import describe_machine, print_table  # noqa: E402

N_ENVS, N_STEPS = 8, 256


def run_ours(env_id: str, steps: int, seed: int, settings=None):
    t0 = time.perf_counter()
    result = trpo_ext.train(env_id, steps, seed=seed, **(settings or {}))
    total = time.perf_counter() - t0
    h = result.history
    # Correctness first: every accepted step inside the trust region with a positive improvement.
    assert h[-1]["time/total_steps"] >= steps
    for e in h:
        if e["train/line_search_success"]:
            assert e["train/kl"] <= 0.01 and e["train/surrogate_improvement"] > 0, e
    split = {k: sum(e[f"time/{k}_s"] for e in h)
             for k in ("sampling", "gae", "gradient", "cg", "line_search", "critic")}
    update = sum(v for k, v in split.items() if k != "sampling")
    return total, update, split, h[-1]["time/total_steps"]


def run_sb3(env_id: str, steps: int, seed: int, n_envs: int):
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env

    t0 = time.perf_counter()
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    model = TRPO("MlpPolicy", venv, n_steps=N_ENVS * N_STEPS // n_envs, gamma=0.99,
                 gae_lambda=0.95, cg_max_steps=10, cg_damping=0.1, line_search_max_iter=10,
                 line_search_shrinking_factor=0.8, target_kl=0.01, seed=seed, device="cpu",
                 policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]),
                                    activation_fn=torch.nn.Tanh))
    update_time = [0.0]
    inner_train = model.train

    def timed_train():
        t = time.perf_counter()
        inner_train()
        update_time[0] += time.perf_counter() - t

    model.train = timed_train
    model.learn(total_timesteps=steps)
    total = time.perf_counter() - t0
    assert model.num_timesteps >= steps
    venv.close()
    return total, update_time[0], model.num_timesteps


def raw_rate(env_id: str, n: int = 5000) -> float:
    """Steps per second of one env in a plain loop with random actions (resets included)."""
    env = gym.make(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(256)]
    t0 = time.perf_counter()
    for i in range(n):
        _, _, term, trunc, _ = env.step(actions[i % 256])
        if term or trunc:
            env.reset()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"])
    ap.add_argument("--steps", type=int, default=20480)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sb3-n-envs", type=int, default=N_ENVS)
    ap.add_argument("--env-workers", type=int, default=None,
                    help="env_workers for ours (default: ours' default setting)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ours_settings = {} if args.env_workers is None else {"env_workers": args.env_workers}
    print(f"machine: {describe_machine()}; steps {args.steps}, {N_ENVS}×{N_STEPS} samples per "
          f"update; sb3 with {args.sb3_n_envs} env(s); ours on its defaults"
          + (f" but env_workers={args.env_workers}" if ours_settings else ""))
    rows, splits, rates, ceilings = [], [], [], []
    for env_id in args.envs:
        run_ours(env_id, N_ENVS * N_STEPS, 0, ours_settings)  # warm-up, untimed
        run_sb3(env_id, N_ENVS * N_STEPS, 0, args.sb3_n_envs)
        ours, theirs = [], []
        for r in range(args.repeats):
            ours.append(run_ours(env_id, args.steps, r, ours_settings))
            theirs.append(run_sb3(env_id, args.steps, r, args.sb3_n_envs))
        o_tot = statistics.median(x[0] for x in ours)
        o_upd = statistics.median(x[1] for x in ours)
        s_tot = statistics.median(x[0] for x in theirs)
        s_upd = statistics.median(x[1] for x in theirs)
        rows.append([env_id, s_tot, o_tot, s_tot / o_tot, s_upd, o_upd, s_upd / o_upd])
        split = {k: statistics.median(x[2][k] for x in ours) for k in ours[0][2]}
        splits.append([env_id] + [split[k] for k in ("sampling", "gae", "gradient", "cg",
                                                     "line_search", "critic")])
        raw = raw_rate(env_id)
        o_sps = args.steps / o_tot
        o_sample_sps = args.steps / split["sampling"]
        rates.append([env_id, raw, o_sample_sps, o_sample_sps / raw, o_sps, o_sps / raw,
                      args.steps / s_tot])
        # The ceiling of one process: stepping the environments costs at least the plain loop's
        # time, and the update comes on top.
        stepping = args.steps / raw
        ceilings.append([env_id, stepping, o_upd, stepping + o_upd, s_tot / (stepping + o_upd),
                         s_tot / o_tot])
    print("\nEnd to end and update (seconds, median of repeats)")
    print_table(["env", "sb3 total", "ours total", "speedup", "sb3 update", "ours update",
                 "update speedup"], rows)
    print("\nOur time split (seconds over the run)")
    print_table(["env", "sampling", "gae", "gradient", "cg+fvp", "line search", "critic"], splits)
    print("\nSteps per second")
    print_table(["env", "raw env loop", "ours sampling", "fraction of raw", "ours end to end",
                 "fraction of raw", "sb3 end to end"], rates)
    print("\nCeiling in one process: the plain loop's stepping time for the run's steps plus our "
          "update (seconds)")
    print_table(["env", "raw stepping", "ours update", "floor", "sb3 total / floor",
                 "speedup reached"], ceilings)


if __name__ == "__main__":
    main()
