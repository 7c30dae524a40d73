"""What a benchmark record's run was trained with, read against today's defaults.

A record holds ``settings``: the keyword arguments its run passed to ``trpo_ext.train``, on top of
the defaults of its day.  When a default changes, a record's settings alone no longer say what it
ran, so records also hold ``config``: every learning setting the run used.  Records written before
``config`` existed ran on the defaults in ``DEFAULTS_BEFORE_CONFIG``.  ``init_log_std=None`` (the
default: e^-1 times half of each action's width) is read as the number it gives on the record's
task, so a run with that number spelt out and one on the defaults are the same run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Dict, Optional, Tuple

import gymnasium as gym

from trpo_ext.config import TRPOConfig
from trpo_ext.policies import initial_log_std, space_spec
from trpo_ext.presets import EARLIER_DEFAULTS

# The defaults that differed, for records without "config" (written before commit 96a319a changed
# them).
DEFAULTS_BEFORE_CONFIG: Dict[str, Any] = EARLIER_DEFAULTS
# Settings that say where and how a run is executed and logged, not what it learns.
RUN_ONLY = {"device", "num_threads", "log_dir", "progress", "checkpoint_every", "distributed",
            "resume", "env_threads", "env_workers"}


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x))  # tuples as lists, as records hold them


def today() -> Dict[str, Any]:
    """Today's defaults of the learning settings."""
    return _plain({k: v for k, v in dataclasses.asdict(TRPOConfig()).items()
                   if k not in RUN_ONLY})


def config(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The learning settings a run with ``settings`` uses today (for a new record's "config")."""
    return {**today(), **_plain({k: v for k, v in settings.items() if k not in RUN_ONLY})}


@functools.lru_cache(maxsize=None)
def initial_log_stds(task: str, init_log_std: Optional[float] = None) -> Optional[Tuple[float, ...]]:
    """The policy's initial log-std per action dimension on ``task`` (float32 values, as the policy
    holds them) for that ``init_log_std``; None where the actions are not a Box."""
    env = gym.make(task)
    try:
        if not isinstance(env.action_space, gym.spaces.Box):
            return None
        spec = space_spec(env.observation_space, env.action_space)
    finally:
        env.close()
    return tuple(float(v) for v in initial_log_std(spec, init_log_std).float())


def _resolved(cfg: Dict[str, Any], task: Optional[str]) -> Dict[str, Any]:
    # init_log_std=None as the number it gives on the task, where that is one number.
    if cfg.get("init_log_std", 0.0) is None and task is not None:
        values = initial_log_stds(task)
        if values is not None and len(set(values)) == 1:
            return {**cfg, "init_log_std": values[0]}
    return cfg


def relative(rec: Dict[str, Any]) -> Dict[str, Any]:
    """The record's learning settings that differ from today's defaults on its task ({}: it ran
    today's defaults), in sorted order."""
    cfg = rec.get("config")
    if cfg is None:
        cfg = {**today(), **DEFAULTS_BEFORE_CONFIG,
               **_plain({k: v for k, v in (rec.get("settings") or {}).items()
                         if k not in RUN_ONLY})}
    task = rec.get("task")
    cfg, base = _resolved(cfg, task), _resolved(today(), task)
    return {k: cfg[k] for k in sorted(cfg) if k not in base or base[k] != cfg[k]}
