"""Learning curves from the ``progress.csv`` files that :class:`trpo_ext.logger.RunLogger` writes.

:func:`plot_learning_curves` draws mean episode return against environment steps for one or more runs.
Runs of the same task and settings that differ only in their seed are one *group*: drawn as the mean
curve over the seeds with a band of ± one standard deviation, on the steps all of them reached.  A group
of one run is drawn as its own curve.

A run's task, seed and settings come from its ``config.json`` (keys ``env_id`` or ``env``, ``seed``, and
the settings); without one, from a directory name of the form ``<env>-<seed>-<YYYYmmdd-HHMMSS>`` (the
``trpo-ext train`` default); otherwise the run is a group of its own, named by its directory.

matplotlib is imported only inside :func:`plot_learning_curves`, through its object-oriented API (no
pyplot), so drawing never changes the backend or the figures of the program that calls it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["read_progress", "find_runs", "Run", "load_runs", "group_runs", "plot_learning_curves"]

STEPS_KEY = "time/total_steps"
RETURN_KEY = "rollout/ep_return_mean"
CSV_NAME = "progress.csv"
CONFIG_NAME = "config.json"

# Settings that say where and how a run was recorded, not what was trained: they never split a group.
_RUN_ONLY_KEYS = {"seed", "log_dir", "resume", "progress", "checkpoint_every", "device", "env",
                  "env_id", "total_steps"}
_DEFAULT_DIR = re.compile(r"^(?P<env>.+)-(?P<seed>\d+)-(?P<stamp>\d{8}-\d{6})(?:-\d+)?$")


def read_progress(path: str) -> Dict[str, np.ndarray]:
    """The columns of a ``progress.csv`` (or of the one in directory ``path``) as float64 arrays.

    Empty cells and values that are not numbers read as NaN; ``True``/``False`` as 1/0.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CSV_NAME)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    cols: Dict[str, np.ndarray] = {}
    for key in header:
        cols[key] = np.array([_to_float(row.get(key)) for row in rows], dtype=np.float64)
    return cols


def _to_float(text: Optional[str]) -> float:
    if text is None or text == "":
        return math.nan
    if text in ("True", "False"):
        return float(text == "True")
    try:
        return float(text)
    except ValueError:
        return math.nan


def find_runs(paths: Sequence[str]) -> List[str]:
    """Run directories (those holding a ``progress.csv``) named by ``paths``.

    Each path is a run directory, a ``progress.csv`` file, or a directory whose immediate
    subdirectories are runs (such as ``runs/``).  Raises FileNotFoundError, naming the path, when one
    of them holds no run.
    """
    found: List[str] = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isfile(path) and os.path.basename(path) == CSV_NAME:
            found.append(os.path.dirname(path) or ".")
        elif os.path.isfile(os.path.join(path, CSV_NAME)):
            found.append(path)
        elif os.path.isdir(path):
            subs = sorted(os.path.join(path, d) for d in os.listdir(path)
                          if os.path.isfile(os.path.join(path, d, CSV_NAME)))
            if not subs:
                raise FileNotFoundError(
                    f"{path!r} holds no training run: no {CSV_NAME} in it or in its subdirectories")
            found.extend(subs)
        else:
            raise FileNotFoundError(f"{path!r} is neither a run directory nor a {CSV_NAME} file")
    unique: List[str] = []
    for run in found:
        if os.path.abspath(run) not in {os.path.abspath(u) for u in unique}:
            unique.append(run)
    return unique


@dataclass
class Run:
    path: str
    env: str
    seed: Optional[int]
    settings: Dict[str, Any] = field(default_factory=dict)
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    returns: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _describe(path: str) -> Tuple[str, Optional[int], Dict[str, Any]]:
    config_path = os.path.join(path, CONFIG_NAME)
    config: Dict[str, Any] = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                loaded = json.load(f)
            if isinstance(loaded, dict):
                config = loaded
        except (OSError, ValueError):
            config = {}
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    match = _DEFAULT_DIR.match(name)
    env = config.get("env_id") or config.get("env")
    seed = config.get("seed")
    if not isinstance(env, str) or not env:
        env = match.group("env") if match else os.path.normpath(path)
    if not isinstance(seed, int) or isinstance(seed, bool):
        seed = int(match.group("seed")) if match else None
    settings = {k: v for k, v in config.items() if k not in _RUN_ONLY_KEYS}
    return env, seed, settings


def load_runs(paths: Sequence[str], x_key: str = STEPS_KEY, y_key: str = RETURN_KEY) -> List[Run]:
    """Every run under ``paths`` (see :func:`find_runs`) with its steps and returns, NaNs dropped."""
    runs = []
    for path in find_runs(paths):
        cols = read_progress(path)
        for key in (x_key, y_key):
            if key not in cols:
                raise ValueError(f"{os.path.join(path, CSV_NAME)} has no column {key!r}; "
                                 f"it has {sorted(cols)}")
        x, y = cols[x_key], cols[y_key]
        keep = np.isfinite(x) & np.isfinite(y)
        order = np.argsort(x[keep], kind="stable")
        env, seed, settings = _describe(path)
        runs.append(Run(path, env, seed, settings, x[keep][order], y[keep][order]))
    return runs


def group_runs(runs: Sequence[Run]) -> List[Tuple[str, List[Run]]]:
    """Runs grouped by task and settings (seeds merged), each group with a legend label.

    The label is the task id, plus the settings that tell apart groups of the same task.
    """
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        key = run.env + "\0" + json.dumps(run.settings, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    by_env: Dict[str, List[List[Run]]] = {}
    for members in groups.values():
        by_env.setdefault(members[0].env, []).append(members)
    out: List[Tuple[str, List[Run]]] = []
    for env, env_groups in by_env.items():
        keys = sorted({k for g in env_groups for k in g[0].settings})
        differing = [k for k in keys
                     if len({json.dumps(g[0].settings.get(k), default=str) for g in env_groups}) > 1]
        for members in env_groups:
            parts = [f"{k}={_short(members[0].settings.get(k))}" for k in differing]
            out.append((" ".join([env] + parts), members))
    return out


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _mean_band(members: Sequence[Run]) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Mean and std across runs on the union of their steps within the range all of them cover."""
    usable = [r for r in members if r.steps.size > 0]
    if len(usable) < 2:
        return None
    lo = max(float(r.steps[0]) for r in usable)
    hi = min(float(r.steps[-1]) for r in usable)
    if hi < lo:
        return None
    grid = np.unique(np.concatenate([r.steps for r in usable]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    curves = np.stack([np.interp(grid, r.steps, r.returns) for r in usable])
    return grid, curves.mean(axis=0), curves.std(axis=0)


def plot_learning_curves(log_dirs: Sequence[str], out: Optional[str] = None, *,
                         title: Optional[str] = None, x_key: str = STEPS_KEY,
                         y_key: str = RETURN_KEY) -> str:
    """Draw mean episode return against environment steps for the runs under ``log_dirs`` into a PNG.

    Args:
        log_dirs: run directories, ``progress.csv`` files, or directories of runs (see
            :func:`find_runs`).
        out: the PNG to write; by default ``<run>/learning_curve.png`` for a single run, else
            ``learning_curves.png`` in the current directory.  Written atomically.
        title: figure title (default: the task id when all runs share one).
        x_key, y_key: the CSV columns to draw.

    Returns the path written.  Raises FileNotFoundError when a path holds no run, ValueError when a run
    lacks one of the columns, ImportError when matplotlib is not installed.
    """
    runs = load_runs(log_dirs, x_key, y_key)
    if out is None:
        out = (os.path.join(runs[0].path, "learning_curve.png") if len(runs) == 1
               else "learning_curves.png")
    from matplotlib.figure import Figure  # noqa: WPS433 (lazy by design)
    from matplotlib.ticker import EngFormatter  # noqa: WPS433

    fig = Figure(figsize=(7.0, 4.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    groups = group_runs(runs)
    for index, (label, members) in enumerate(groups):
        color = f"C{index % 10}"
        band = _mean_band(members)
        if band is not None:
            grid, mean, std = band
            ax.plot(grid, mean, color=color, lw=1.8, label=f"{label} (mean ± std, {len(members)} seeds)")
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        else:
            for j, run in enumerate(members):
                seed = "" if run.seed is None or len(members) == 1 else f" seed {run.seed}"
                ax.plot(run.steps, run.returns, color=color, lw=1.5, alpha=1.0 if j == 0 else 0.6,
                        label=f"{label}{seed}")
    if not any(r.steps.size for r in runs):
        ax.text(0.5, 0.5, "no finished episodes yet", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    envs = {r.env for r in runs}
    ax.set_title(title if title is not None else (envs.pop() if len(envs) == 1 else "learning curves"))
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean episode return" if y_key == RETURN_KEY else y_key)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")

    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp.{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
