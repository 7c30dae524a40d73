"""Evaluation of a trained policy: mean (or list of) episode returns."""
from __future__ import annotations

from typing import Any, Callable, List, Union

import numpy as np
import torch

from . import _checks
from .policies import Policy
from .envs import check_env_id, env_factory
from .vecenv import EnvFactory

__all__ = ["evaluate", "evaluate_returns"]

# Episodes run side by side, at most this many at a time, so that the policy does one batched
# forward per step.
_MAX_PARALLEL = 32


def evaluate_returns(policy, env: Union[str, Callable[[], Any], None] = None, episodes: int = 10,
                     seed: int = 0, deterministic: bool = True) -> List[float]:
    """The undiscounted return of each of ``episodes`` episodes, episode i seeded ``seed + i``.

    ``env`` is a gymnasium id or a callable returning an Env; None: the policy's own,
    ``policy.env_id`` made with ``policy.env_kwargs`` (the run's ``env_kwargs``).  Actions come
    from ``policy.act`` (its saved observation normalisation; the distribution's mode when
    ``deterministic``, else samples drawn from a generator seeded with ``seed``).
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a trpo_ext Policy (TrainResult.policy or "
                        f"trpo_ext.load(...)), got {type(policy).__name__}")
    episodes = _checks.require_int(episodes, "episodes", 1)
    seed = _checks.require_seed(seed)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if env is None:
        env = getattr(policy, "env_id", None)
        if env is None:
            raise ValueError("evaluate: pass env= (the policy records no environment id)")
        check_env_id(env)
        env = EnvFactory(env, getattr(policy, "env_kwargs", None))
    else:
        check_env_id(env)
    generator = torch.Generator(device=policy.flat.device).manual_seed(seed)
    was_training = policy.training
    policy.eval()
    # One thread: per-step batches are tiny, and a thread pool only adds wake-up latency.
    with _checks.torch_threads(1):
        return _run(policy, env, episodes, seed, deterministic, generator, was_training)


def _run(policy, env, episodes, seed, deterministic, generator, was_training) -> List[float]:
    from .rollout import _stack_obs

    returns: List[float] = []
    try:
        for start in range(0, episodes, _MAX_PARALLEL):
            n = min(_MAX_PARALLEL, episodes - start)
            envs = [env_factory(env)() for _ in range(n)]
            try:
                policy.check_spaces(envs[0].observation_space, envs[0].action_space, "evaluate")
                obs = [e.reset(seed=seed + start + i)[0] for i, e in enumerate(envs)]
                total = [0.0] * n
                running = list(range(n))
                while running:
                    actions = policy.act(_stack_obs([obs[i] for i in running]),
                                         deterministic=deterministic, generator=generator)
                    still = []
                    for a, i in zip(actions, running):
                        obs[i], r, terminated, truncated, _ = envs[i].step(a)
                        total[i] += float(r)
                        if not (terminated or truncated):
                            still.append(i)
                    running = still
                returns.extend(total)
            finally:
                for e in envs:
                    e.close()
    finally:
        policy.train(was_training)
    return returns


def evaluate(policy, env: Union[str, Callable[[], Any], None] = None, episodes: int = 10,
             seed: int = 0, deterministic: bool = True) -> float:
    """Mean undiscounted return over ``episodes`` episodes; see :func:`evaluate_returns`."""
    return float(np.mean(evaluate_returns(policy, env, episodes, seed, deterministic)))
