"""The in-process vector env of the ``"sync"`` engine: ``SameStepVectorEnv`` steps a few environments
one after another in this process.

It is gymnasium's ``SyncVectorEnv`` in same-step autoreset mode minus what the collector never
reads: ``SyncVectorEnv.step`` merges every environment's info dict into the batch's at every step
(for MuJoCo tasks, four or five entries per environment per step) and stacks the observations
through the generic space utilities, a large share of a cheap environment's own stepping time.
Its batches are those of ``SyncVectorEnv`` bit for bit (tested); its infos hold only
``final_obs`` (and ``final_info``) when an episode ended.

More cores are used by the other engines and by ranks: ``vector_env="envpool"`` (EnvPool's C++
environments on a thread pool) and data-parallel training under torchrun (any environment).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from .envs import EnvSpec

__all__ = ["EnvFactory", "SameStepVectorEnv", "usable_cpus"]


class EnvFactory:
    """Makes one copy of an environment: ``gymnasium.make(env, **kwargs)`` for an id, else
    ``env()`` checked to be a gymnasium Env.  A class, not a closure, so that it pickles to
    ``AsyncVectorEnv``'s processes whenever ``env`` does."""

    def __init__(self, env: "EnvSpec", kwargs: Optional[Dict[str, Any]] = None):
        if isinstance(env, EnvFactory):
            env, kwargs = env.env, {**env.kwargs, **(kwargs or {})}
        if kwargs and not isinstance(env, str):
            raise ValueError(f"env_kwargs are keyword arguments of gymnasium.make for an "
                             f"environment id; env is the callable {env!r}: build them into it")
        self.env, self.kwargs = env, dict(kwargs or {})

    def __repr__(self) -> str:
        return f"EnvFactory({self.env!r}, {self.kwargs!r})" if self.kwargs else repr(self.env)

    def __call__(self):
        import gymnasium as gym

        if isinstance(self.env, str):
            # The passive env checker wraps every step in Python checks; the env is a registered one.
            try:
                return gym.make(self.env, disable_env_checker=True, **self.kwargs)
            except TypeError as e:
                if not self.kwargs:
                    raise
                raise TypeError(f"env_kwargs {self.kwargs!r} for {self.env!r}: {e}") from None
        env = self.env()
        if not isinstance(env, gym.Env):
            raise TypeError(f"env: the callable {self.env!r} returned {type(env).__name__}, not a "
                            f"gymnasium.Env")
        return env


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class SameStepVectorEnv:
    """``len(env_fns)`` environments stepped one after another in this process, in gymnasium's
    same-step autoreset mode: when environment i ends an episode, ``step`` returns the first
    observation of its next episode, with ``infos["final_obs"][i]`` and ``infos["final_info"][i]``
    the final observation and info of the one that ended (``infos`` is empty otherwise; the
    environments' other per-step infos are not collected).  Observations are stacked into an array
    of the observation space's dtype, rewards are float64, as ``SyncVectorEnv`` returns them.

    Attributes as gymnasium's vector envs: ``num_envs``, ``envs``, ``single_observation_space``,
    ``single_action_space``, ``observation_space``, ``action_space``; and ``reset``, ``step``,
    ``close``.
    """

    def __init__(self, env_fns: Sequence[Callable[[], Any]]):
        from gymnasium.vector.utils import batch_space

        if len(env_fns) < 1:
            raise ValueError("env_fns must hold at least one environment factory")
        self.envs = []
        try:
            for fn in env_fns:
                self.envs.append(fn())
        except BaseException:
            self.close()
            raise
        self.num_envs = len(self.envs)
        first = self.envs[0]
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        for i, e in enumerate(self.envs[1:], start=1):
            if e.observation_space != first.observation_space or e.action_space != first.action_space:
                self.close()
                raise ValueError(f"environment {i} has spaces {e.observation_space}, "
                                 f"{e.action_space}; environment 0 has {first.observation_space}, "
                                 f"{first.action_space}: a vector env needs them all alike")
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._closed = False

    def _empty_obs(self):
        from gymnasium.vector.utils import create_empty_array

        # An array of the space's dtype, or a dict of them for a Dict space.
        return create_empty_array(self.single_observation_space, self.num_envs, fn=np.empty)

    @staticmethod
    def _put(batch, i: int, o) -> None:
        if isinstance(batch, dict):
            for k in batch:
                batch[k][i] = o[k]
        else:
            batch[i] = o

    def reset(self, *, seed: Union[None, int, Sequence[Optional[int]]] = None, options=None):
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed must give one seed per environment ({self.num_envs}), "
                                 f"got {len(seeds)}")
        obs = self._empty_obs()
        for i, (env, s) in enumerate(zip(self.envs, seeds)):
            self._put(obs, i, env.reset(seed=s, options=options)[0])
        return obs, {}

    def step(self, actions):
        n = self.num_envs
        obs = self._empty_obs()
        rewards = np.empty(n, dtype=np.float64)
        terminated = np.empty(n, dtype=np.bool_)
        truncated = np.empty(n, dtype=np.bool_)
        infos = {}
        for i, env in enumerate(self.envs):
            o, rewards[i], terminated[i], truncated[i], info = env.step(actions[i])
            if terminated[i] or truncated[i]:
                if not infos:
                    infos = {"final_obs": np.full(n, None, dtype=object),
                             "final_info": np.full(n, None, dtype=object),
                             "_final_obs": np.zeros(n, dtype=np.bool_)}
                infos["final_obs"][i] = o
                infos["final_info"][i] = info
                infos["_final_obs"][i] = True
                o, _ = env.reset()
            self._put(obs, i, o)
        return obs, rewards, terminated, truncated, infos

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for env in getattr(self, "envs", []):
            env.close()
