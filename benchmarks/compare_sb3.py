"""trpo_ext.train against sb3-contrib's TRPO for the same work, and raw environment stepping rates.

Same work: ours runs on its default settings, and sb3-contrib is given ours, read from
:class:`trpo_ext.config.TRPOConfig` (so that the comparison follows them when they change): the
samples per update (n_envs × n_steps, in sb3's DummyVecEnv of the same number of environments;
``--sb3-n-envs 1`` gives sb3's own default of 1 env), network sizes (tanh), CG iterations and
damping, line-search steps and ratio, max KL, GAE γ and λ, the initial log σ, and the critic's
work: ``n_critic_updates`` = our ``vf_epochs`` passes over the batch in minibatches of
``batch_size`` = our ``vf_minibatch_size``, Adam at our ``vf_lr``; one torch thread in both.  Both
sides' settings are printed, with what still differs (ours normalises observations and value
targets; sb3 does neither).
The two alternate within one process, ``--repeats`` times each, after one untimed warm-up of each
(imports, first-call costs).  End-to-end time counts everything from the call of ``train`` (for
sb3: constructing the model and its environments, then ``learn``) to its return.  The update time
is everything but sampling: for ours the sum of the history's time split, for sb3 the time inside
``TRPO.train``.  The last table is the ceiling of one process: the plain loop's stepping time for
the same number of steps (one env, random actions) plus our update time; sb3's total over that
floor is the largest end-to-end speedup possible without stepping environments in parallel.

``--time-to-score R`` measures instead, at each library's own defaults (sb3-contrib's: one
environment × 2048 steps, its critic of 10 epochs of 128, 15 CG iterations), the training wall
time until the policy's deterministic evaluation (``--eval-episodes`` episodes, fixed seeds) first
reaches the return R, within ``--budget`` steps.  Policies are evaluated every ``--eval-every``
steps from snapshots taken during training; the evaluations are not counted in the time.

    python benchmarks/compare_sb3.py [--envs HalfCheetah-v5 Hopper-v5] [--steps 20480]
        [--repeats 2] [--sb3-n-envs 8] [--vector-env envpool]
    python benchmarks/compare_sb3.py --envs Hopper-v5 --time-to-score 1000 --budget 300000
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))
import trpo_ext  # noqa: E402
from benchmarks import _settings  # noqa: E402
from benchmarks._common import describe_machine, print_table, sb3_returns  # noqa: E402
from trpo_ext.config import TRPOConfig  # noqa: E402

OURS = TRPOConfig()
N_ENVS, N_STEPS = OURS.n_envs, OURS.n_steps


def log_std_on(env_id: str) -> float:
    """The initial log σ our defaults give on ``env_id`` (sb3 takes one number for every action
    dimension; unused for discrete actions)."""
    values = _settings.initial_log_stds(env_id, OURS.init_log_std)
    if values is None:
        return 0.0
    if len(set(values)) != 1:
        raise ValueError(f"{env_id}: actions of different ranges; sb3 takes one initial log σ")
    return values[0]


def sb3_settings(n_envs: int, env_id: str) -> dict:
    """sb3-contrib TRPO's keyword arguments for the work our defaults do on ``env_id``."""
    return dict(n_steps=N_ENVS * N_STEPS // n_envs, batch_size=OURS.vf_minibatch_size,
                n_critic_updates=OURS.vf_epochs, learning_rate=OURS.vf_lr, gamma=OURS.gamma,
                gae_lambda=OURS.gae_lambda, cg_max_steps=OURS.cg_iters,
                cg_damping=OURS.cg_damping, line_search_max_iter=OURS.line_search_steps,
                line_search_shrinking_factor=OURS.backtrack_ratio, target_kl=OURS.max_kl,
                normalize_advantage=OURS.normalize_advantages,
                policy_kwargs=dict(net_arch=dict(pi=list(OURS.hidden_sizes),
                                                 vf=list(OURS.hidden_sizes)),
                                   activation_fn=torch.nn.Tanh, log_std_init=log_std_on(env_id)))


def print_settings(n_envs: int, ours_settings: dict, env_ids) -> None:
    theirs = sb3_settings(n_envs, env_ids[0])
    print("ours (TRPOConfig defaults" + (f" + {ours_settings}" if ours_settings else "") + "): "
          + ", ".join(f"{f.name}={getattr(OURS, f.name)!r}" for f in dataclasses.fields(OURS)
                      if f.name in ("n_envs", "n_steps", "max_kl", "cg_iters", "cg_damping",
                                    "line_search_steps", "backtrack_ratio", "gamma",
                                    "gae_lambda", "hidden_sizes", "init_log_std", "vf_lr",
                                    "vf_epochs", "vf_minibatch_size", "normalize_advantages",
                                    "normalize_obs", "normalize_value_targets")))
    print(f"sb3-contrib TRPO ({n_envs} env(s) in a DummyVecEnv): "
          + ", ".join(f"{k}={v!r}" for k, v in theirs.items() if k != "policy_kwargs")
          + f", net_arch={theirs['policy_kwargs']['net_arch']}, activation Tanh, log_std_init="
          + ", ".join(f"{log_std_on(e):g} ({e})" for e in env_ids)
          + "; no observation or value-target normalisation")


def run_ours(env_id: str, steps: int, seed: int, settings=None):
    t0 = time.perf_counter()
    result = trpo_ext.train(env_id, steps, seed=seed, **(settings or {}))
    total = time.perf_counter() - t0
    h = result.history
    # Correctness first: every accepted step inside the trust region with a positive improvement.
    assert h[-1]["time/total_steps"] >= steps
    for e in h:
        if e["train/line_search_success"]:
            assert e["train/kl"] <= OURS.max_kl and e["train/surrogate_improvement"] > 0, e
    split = {k: sum(e[f"time/{k}_s"] for e in h)
             for k in ("sampling", "gae", "gradient", "cg", "line_search", "critic")}
    update = sum(v for k, v in split.items() if k != "sampling")
    return total, update, split, h[-1]["time/total_steps"]


def run_sb3(env_id: str, steps: int, seed: int, n_envs: int):
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env

    t0 = time.perf_counter()
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    model = TRPO("MlpPolicy", venv, seed=seed, device="cpu", **sb3_settings(n_envs, env_id))
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


def _first_reaching(points, evaluate, threshold):
    """(steps, seconds, return) of the first snapshot whose evaluation reaches ``threshold``, and
    every evaluation made (in order; the search stops at the first success)."""
    evals = []
    for steps, seconds, snapshot in points:
        ret = evaluate(snapshot)
        evals.append((steps, round(seconds, 1), round(ret, 1)))
        if ret >= threshold:
            return (steps, seconds, ret), evals
    return None, evals


def time_to_score_ours(env_id, threshold, budget, every, episodes, seed, settings):
    with tempfile.TemporaryDirectory() as log_dir:
        per_update = N_ENVS * N_STEPS
        k = max(1, every // per_update)
        result = trpo_ext.train(env_id, budget, seed=seed, log_dir=log_dir, checkpoint_every=k,
                                **settings)
        elapsed = {h["time/total_steps"]: h["time/elapsed_s"] for h in result.history}
        directory = os.path.join(log_dir, "checkpoints")
        points = sorted((int(f[5:14]), elapsed[int(f[5:14])], os.path.join(directory, f))
                        for f in os.listdir(directory) if f.startswith("step_"))

        def evaluate(path):
            return trpo_ext.evaluate(trpo_ext.load(path), env_id, episodes=episodes,
                                     seed=100_000)

        return _first_reaching(points, evaluate, threshold)


def time_to_score_sb3(env_id, threshold, budget, every, episodes, seed):
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    points = []

    class Snapshots(BaseCallback):
        """Policy snapshots every ``every`` steps, with the training time so far."""

        def __init__(self):
            super().__init__()
            self.next = every

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            pass

        def _on_rollout_start(self) -> None:  # after the update of the previous rollout
            if self.num_timesteps >= self.next:
                self.next += every
                points.append((self.num_timesteps, time.perf_counter() - t0,
                               copy.deepcopy(self.model.policy.state_dict())))

    t0 = time.perf_counter()
    model = TRPO("MlpPolicy", make_vec_env(env_id, n_envs=1, seed=seed), seed=seed, device="cpu")
    model.learn(total_timesteps=budget, callback=Snapshots())
    points.append((model.num_timesteps, time.perf_counter() - t0,
                   copy.deepcopy(model.policy.state_dict())))

    def evaluate(state):
        model.policy.load_state_dict(state)
        return float(np.mean(sb3_returns(model, env_id, [100_000 + i for i in range(episodes)])))

    return _first_reaching(points, evaluate, threshold)


def run_time_to_score(args, ours_settings) -> None:
    print(f"time to score: deterministic evaluation ({args.eval_episodes} episodes, reset seeds "
          f"100000 + i) >= {args.time_to_score} within {args.budget} steps, snapshots every "
          f"{args.eval_every} steps; each library on its own defaults"
          + (f" (ours + {ours_settings})" if ours_settings else ""))
    rows = []
    for env_id in args.envs:
        for seed in range(args.repeats):
            for lib in ("ours", "sb3"):
                if lib == "ours":
                    hit, evals = time_to_score_ours(env_id, args.time_to_score, args.budget,
                                                    args.eval_every, args.eval_episodes, seed,
                                                    ours_settings)
                else:
                    hit, evals = time_to_score_sb3(env_id, args.time_to_score, args.budget,
                                                   args.eval_every, args.eval_episodes, seed)
                print(f"{env_id} {lib} seed {seed}: evaluations (steps, train s, return) {evals}",
                      flush=True)
                rows.append([env_id, lib, seed] + (list(hit) if hit else ["not reached", "", ""]))
    print_table(["env", "library", "seed", "steps", "train seconds", "return"], rows)


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
    ap.add_argument("--vector-env", default=None, help="vector_env for ours (default: its default)")
    ap.add_argument("--time-to-score", type=float, default=None, metavar="RETURN")
    ap.add_argument("--budget", type=int, default=300_000)
    ap.add_argument("--eval-every", type=int, default=20_480)
    ap.add_argument("--eval-episodes", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ours_settings = {}
    if args.vector_env is not None:
        ours_settings["vector_env"] = args.vector_env
    if args.time_to_score is not None:
        print(f"machine: {describe_machine()}")
        run_time_to_score(args, ours_settings)
        return
    print(f"machine: {describe_machine()}; steps {args.steps}, {N_ENVS}×{N_STEPS} samples per "
          f"update; sb3 with {args.sb3_n_envs} env(s); ours on its defaults"
          + (f" but {ours_settings}" if ours_settings else ""))
    print_settings(args.sb3_n_envs, ours_settings, args.envs)
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
