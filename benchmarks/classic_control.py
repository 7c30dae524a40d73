"""trpo_ext against sb3-contrib's TRPO on the classic-control tasks, each on its own defaults.

Issue 5 asks that, on the classic-control tasks other than CartPole-v1 (which has its own test),
``trpo_ext.train`` with its default settings reach at least what sb3-contrib's TRPO reaches with
*its* defaults at the same budget.  So neither side is tuned or matched to the other: ours is
``trpo_ext.train(task, steps, seed=s)``, theirs is ``TRPO("MlpPolicy", task, seed=s)`` then
``learn(steps)``.  The only settings given to sb3 are ``seed``, ``verbose=0`` and ``device="cpu"``
(so that both libraries run on the CPU even on a machine with a GPU).  torch runs on one thread
in both.

Each trained policy is evaluated deterministically on ``--episodes`` episodes (20 by default) of
a fresh environment; episode i of training seed s is reset with seed ``eval_seed_base + 1000·s
+ i``, never a seed that training used, and both libraries see the same episodes.  Our policy goes
through ``trpo_ext.evaluate``; sb3's through ``model.predict(obs, deterministic=True)`` in the
same per-episode loop shape (sb3 clips Box actions to the bounds there, as ours does in ``act``).

Runs go task by task, and within a task seed by seed with the two libraries taking turns, so both
see about the same machine load.  Each run's result (or its error, with the traceback) is appended
as one JSON line to ``--out`` as soon as it finishes; a run that already has an ``ok`` line there
for the same (task, library, seed, steps, episodes, eval seed) is skipped, so an interrupted run
resumes where it stopped.  ``--table-only`` prints the table from the file without training.

``--settings '{"vf_epochs": 10}'`` trains ours with those settings instead of its defaults (an A/B of
a setting; the records and the table keep runs with different settings apart).  The same script
measures the MuJoCo tasks at 10⁶ steps (``--libs ours``; see benchmarks/RESULTS.md).

    python benchmarks/classic_control.py [--tasks Acrobot-v1 ...] [--seeds 0 1] [--steps 100000]
        [--libs ours sb3] [--episodes 20] [--settings JSON] [--out classic_control.jsonl]
        [--table-only]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Dict, List, Tuple

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import trpo_ext  # noqa: E402
from benchmarks import _settings  # noqa: E402
from benchmarks._common import print_table, sb3_returns  # noqa: E402

TASKS = ["Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0", "Pendulum-v1"]
LIBS = ["ours", "sb3"]


def eval_seed(base: int, seed: int) -> int:
    # 1000 apart per training seed: episodes of different training seeds never share a reset seed
    # (for up to 1000 episodes), and the base keeps them away from the small seeds training uses.
    return base + 1000 * seed


def run_ours(task: str, steps: int, seed: int, episodes: int, ev_seed: int,
             settings: Dict[str, Any]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    result = trpo_ext.train(task, steps, seed=seed, **settings)
    train_s = time.perf_counter() - t0
    h = result.history
    if h[-1]["time/total_steps"] < steps:
        raise RuntimeError(f"trained {h[-1]['time/total_steps']} steps, fewer than {steps}")
    t1 = time.perf_counter()
    returns = trpo_ext.evaluate_returns(result.policy, task, episodes=episodes, seed=ev_seed,
                                        deterministic=True)
    eval_s = time.perf_counter() - t1
    accepted = sum(1 for e in h if e["train/line_search_success"])
    return {"returns": [float(r) for r in returns], "train_s": train_s, "eval_s": eval_s,
            "trained_steps": int(h[-1]["time/total_steps"]), "iterations": len(h),
            "accepted_updates": accepted,
            "train_return_last": _finite_or_none(h[-1].get("rollout/ep_return_mean"))}


def run_sb3(task: str, steps: int, seed: int, episodes: int, ev_seed: int,
            settings: Dict[str, Any]) -> Dict[str, Any]:
    from sb3_contrib import TRPO

    t0 = time.perf_counter()
    model = TRPO("MlpPolicy", task, seed=seed, verbose=0, device="cpu")
    model.learn(total_timesteps=steps)
    train_s = time.perf_counter() - t0
    if model.num_timesteps < steps:
        raise RuntimeError(f"trained {model.num_timesteps} steps, fewer than {steps}")
    model.get_env().close()
    t1 = time.perf_counter()
    returns = sb3_returns(model, task, [ev_seed + i for i in range(episodes)])
    eval_s = time.perf_counter() - t1
    return {"returns": returns, "train_s": train_s, "eval_s": eval_s,
            "trained_steps": int(model.num_timesteps)}


def _finite_or_none(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


RUNNERS = {"ours": run_ours, "sb3": run_sb3}


def _settings_key(settings: Dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)


def _ours_settings(rec: Dict[str, Any]) -> Dict[str, Any]:
    """Our run's learning settings that differ from today's defaults (benchmarks/_settings.py);
    {} for sb3's runs."""
    return _settings.relative(rec) if rec["lib"] == "ours" else {}


def _key(rec: Dict[str, Any]) -> Tuple:
    return (rec["task"], rec["lib"], rec["seed"], rec["steps"], rec["episodes"], rec["eval_seed"],
            _settings_key(_ours_settings(rec)))


def load(path: str) -> List[Dict[str, Any]]:
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    # A line cut short by a killed run: ignore it, the run will be redone.
                    print(f"warning: {path}:{n} is not valid JSON, ignored", file=sys.stderr)
    return recs


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "gymnasium": gym.__version__, "numpy": np.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "cpus": str(os.cpu_count())}
    try:
        import sb3_contrib
        import stable_baselines3

        out["sb3_contrib"] = sb3_contrib.__version__
        out["stable_baselines3"] = stable_baselines3.__version__
    except ImportError as e:
        out["sb3_contrib"] = f"unavailable: {e}"
    return out


def run_all(args) -> None:
    done = {_key(r) for r in load(args.out) if r.get("status") == "ok"}
    env_info = versions()
    for task in args.tasks:
        for seed in args.seeds:
            for lib in args.libs:
                rec = {"task": task, "lib": lib, "seed": seed, "steps": args.steps,
                       "episodes": args.episodes,
                       "eval_seed": eval_seed(args.eval_seed_base, seed)}
                if lib == "ours":
                    rec["settings"] = args.settings
                    rec["config"] = _settings.config(args.settings)
                if _key(rec) in done:
                    print(f"skip {task} {lib} seed {seed}: already in {args.out}", flush=True)
                    continue
                print(f"run  {task} {lib} seed {seed} ({args.steps} steps) ...", flush=True)
                t0 = time.perf_counter()
                try:
                    rec.update(RUNNERS[lib](task, args.steps, seed, args.episodes,
                                            rec["eval_seed"], rec.get("settings", {})))
                    rec["mean_return"] = float(np.mean(rec["returns"]))
                    rec["status"] = "ok"
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                    rec["status"] = "error"
                    rec["error"] = f"{type(e).__name__}: {e}"
                    rec["traceback"] = traceback.format_exc()
                rec["wall_s"] = time.perf_counter() - t0
                rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
                rec["env"] = env_info
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                if rec["status"] == "ok":
                    print(f"     {task} {lib} seed {seed}: mean return {rec['mean_return']:.2f}, "
                          f"train {rec['train_s']:.1f} s, eval {rec['eval_s']:.1f} s", flush=True)
                else:
                    print(f"     {task} {lib} seed {seed}: FAILED {rec['error']}", flush=True)


def table(args) -> None:
    wanted = {task: _settings_key(_settings.relative({"task": task,
                                                      "config": _settings.config(args.settings)}))
              for task in args.tasks}
    recs = [r for r in load(args.out) if r.get("steps") == args.steps
            and r.get("episodes") == args.episodes and r["task"] in args.tasks
            and r["lib"] in args.libs and r["seed"] in args.seeds
            and (r["lib"] != "ours" or _settings_key(_ours_settings(r)) == wanted[r["task"]])]
    # The latest record per key wins (a redone run replaces an earlier failure).
    latest: Dict[Tuple, Dict[str, Any]] = {}
    for r in recs:
        latest[(r["task"], r["lib"], r["seed"])] = r
    print(f"\n{args.steps} steps per run, deterministic evaluation over {args.episodes} episodes; "
          f"per-seed returns in seed order {args.seeds}; times are training wall seconds"
          + (f"; ours with {wanted}" if args.settings else ""))
    rows, verdicts = [], []
    for task in args.tasks:
        means = {}
        for lib in args.libs:
            per_seed, times, notes = [], [], []
            for s in args.seeds:
                r = latest.get((task, lib, s))
                if r is None:
                    notes.append(f"seed {s}: not run")
                elif r["status"] != "ok":
                    notes.append(f"seed {s}: {r['error'][:60]}")
                else:
                    per_seed.append(r["mean_return"])
                    times.append(r["train_s"])
            complete = len(per_seed) == len(args.seeds)
            mean = statistics.fmean(per_seed) if complete else None
            means[lib] = mean
            rows.append([task, lib, "n/a" if mean is None else f"{mean:.2f}",
                         ", ".join(f"{x:.2f}" for x in per_seed) or "-",
                         ", ".join(f"{t:.0f}" for t in times) or "-",
                         f"{statistics.fmean(times):.0f}" if times else "-",
                         "; ".join(notes)])
        if "ours" in means and "sb3" in means:
            o, s = means["ours"], means["sb3"]
            verdicts.append([task, "n/a" if o is None else f"{o:.2f}",
                             "n/a" if s is None else f"{s:.2f}",
                             "incomplete" if o is None or s is None
                             else (f"{o - s:+.2f}"), "incomplete" if o is None or s is None
                             else ("yes" if o >= s else "no")])
    print_table(["task", "library", "mean return", "per seed", "train s per seed",
                 "mean train s", "notes"], rows)
    if verdicts:
        print()
        print_table(["task", "ours", "sb3", "ours - sb3", "ours ≥ sb3"], verdicts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--libs", nargs="+", choices=LIBS, default=LIBS)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--eval-seed-base", type=int, default=10_000,
                    help="episode i of training seed s resets with base + 1000*s + i")
    ap.add_argument("--out", default="classic_control.jsonl",
                    help="JSON-lines file the results are appended to (and resumed from)")
    ap.add_argument("--settings", type=json.loads, default={},
                    help="JSON object of trpo_ext.train settings for ours (default: its defaults)")
    ap.add_argument("--table-only", action="store_true", help="print the table from --out only")
    args = ap.parse_args(argv)
    if not isinstance(args.settings, dict):
        ap.error("--settings must be a JSON object, e.g. '{\"vf_epochs\": 10}'")
    if args.steps <= 0 or args.episodes <= 0:
        ap.error("--steps and --episodes must be positive")
    for task in args.tasks:  # an unknown id should fail now, not after hours of other runs
        gym.spec(task)
    torch.set_num_threads(1)
    if not args.table_only:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {versions()}", flush=True)
        run_all(args)
    table(args)


if __name__ == "__main__":
    main()
