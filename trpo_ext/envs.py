"""Environment construction, in one place: id checks, factories and the vector-env engines.

Every engine hands the collector the same thing, gymnasium's *same-step* autoreset batches: when
environment i ends an episode at a step, that step already returns the first observation of its
next episode, with the episode's final observation in ``infos["final_obs"][i]``.  Every step is
then a real transition of the policy, and a truncated step bootstraps from that final observation.

Engines (``make_vector_env(..., engine=)``):

- ``"sync"``: :class:`trpo_ext.vecenv.SameStepVectorEnv` (gymnasium's ``SyncVectorEnv`` batches,
  bit for bit);
- ``"async"``: gymnasium's ``AsyncVectorEnv`` in same-step mode, one process per environment;
- ``"envpool"``: :class:`EnvPoolVectorEnv`, EnvPool's C++ environments on a thread pool.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from .vecenv import EnvFactory, SameStepVectorEnv, usable_cpus

__all__ = ["EnvSpec", "VECTOR_ENVS", "check_env_id", "check_vector_env", "env_factory",
           "envpool_task_id", "make_vector_env", "EnvPoolVectorEnv"]

EnvSpec = Union[str, Callable[[], Any]]
VECTOR_ENVS = ("sync", "async", "envpool")

_ENVPOOL_INSTALL = "pip install 'trpo_ext[envpool]' (EnvPool 1.2.5 needs Python <= 3.11)"


def check_env_id(env: EnvSpec) -> Optional[str]:
    """The gymnasium id of ``env`` (None for a callable); an unknown id is a ValueError."""
    import gymnasium as gym

    if callable(env) and not isinstance(env, str):
        return None
    if not isinstance(env, str):
        raise TypeError(f"env must be a gymnasium id (str) or a callable returning a gymnasium Env, "
                        f"got {type(env).__name__}")
    try:
        gym.spec(env)
    except gym.error.Error as e:
        raise ValueError(f"unknown gymnasium environment id {env!r}: {e}") from None
    return env


def env_factory(env: EnvSpec) -> Callable[[], Any]:
    """A zero-argument callable making one copy of ``env`` (picklable whenever ``env`` is)."""
    return EnvFactory(env)


def envpool_task_id(env: EnvSpec) -> str:
    """EnvPool's task id for the gymnasium id ``env``; a ValueError naming the alternatives when
    EnvPool lacks it (or ``env`` is a callable), an ImportError when EnvPool is not installed.

    EnvPool names its MuJoCo and classic-control tasks as gymnasium does and follows gymnasium's
    definitions for them (tests/test_envs.py compares trajectories); gymnasium ids EnvPool also
    uses for something else (Atari's ``ALE/`` ids: EnvPool's Atari tasks preprocess frames their
    own way) are not mapped.
    """
    alternatives = "use vector_env='sync' (the default) or 'async'"
    if isinstance(env, EnvFactory) and isinstance(env.env, str):
        if env.kwargs:
            raise ValueError(f"vector_env='envpool' does not take env_kwargs (got "
                             f"{env.kwargs!r}: they are gymnasium.make's); {alternatives}")
        env = env.env
    if not isinstance(env, str):
        raise ValueError(f"vector_env='envpool' needs a gymnasium id of a task EnvPool has, got a "
                         f"callable {env!r}; {alternatives}")
    try:
        import envpool
    except ImportError:
        raise ImportError(f"vector_env='envpool' needs EnvPool: {_ENVPOOL_INSTALL}; or "
                          f"{alternatives}") from None
    if env not in envpool.list_all_envs():
        raise ValueError(f"EnvPool has no task {env!r} (it has MuJoCo tasks such as "
                         f"'HalfCheetah-v5' and classic control such as 'CartPole-v1'); "
                         f"{alternatives}")
    return env


def check_vector_env(env: EnvSpec, engine: str) -> None:
    """Refuses, before any work, an engine that is not one of :data:`VECTOR_ENVS` or that cannot
    run ``env``."""
    if engine not in VECTOR_ENVS:
        raise ValueError(f"vector_env must be one of {', '.join(map(repr, VECTOR_ENVS))}, "
                         f"got {engine!r}")
    if engine == "envpool":
        envpool_task_id(env)


def make_vector_env(env: EnvSpec, n_envs: int, engine: Union[str, bool] = "sync",
                    threads: Optional[int] = None, workers: int = 0, *,
                    async_envs: Optional[bool] = None):
    """``n_envs`` copies of ``env`` in same-step autoreset mode, stepped by ``engine``: ``"sync"``
    (in this process), ``"async"`` (gymnasium's ``AsyncVectorEnv``) or ``"envpool"`` (``threads``
    pool threads; None: one per usable core).

    ``async_envs=True`` (or ``True`` as the third argument, the old signature) means ``"async"``.
    ``workers`` (env worker processes) is retired: ignored, with a warning when not 0.
    """
    if workers:
        warnings.warn("make_vector_env: workers is retired and ignored; the environments step in "
                      "this process", FutureWarning, stacklevel=2)
    if isinstance(engine, (bool, np.bool_)):
        engine = "async" if engine else "sync"
    if async_envs:
        engine = "async"
    check_vector_env(env, engine)
    if engine == "envpool":
        return EnvPoolVectorEnv(env, n_envs, threads)
    fns = [env_factory(env) for _ in range(n_envs)]
    if engine == "async":
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode

        return AsyncVectorEnv(fns, copy=False, autoreset_mode=AutoresetMode.SAME_STEP)
    return SameStepVectorEnv(fns)


class EnvPoolVectorEnv:
    """``n_envs`` EnvPool environments in same-step autoreset mode, stepped whole (``step``) or
    in ``groups`` contiguous groups (``env_groups``, their slices of the environments: environment i
    is column i of every batch): ``send(actions, g)`` starts group g's step, ``recv(g)`` waits for
    it, and the collector computes one group's actions while the others step.

    One group (one pool in EnvPool's sync mode) is the default: it sampled faster than two
    overlapped groups on 2 cores (benchmarks/RESULTS.md), whose waits put the main thread to sleep
    and wake it, where EnvPool's sync mode waits by spinning.

    EnvPool resets an environment on the step *after* it ends (that step's action ignored, its
    reward 0): here, when environment i ends at a step, ``recv`` returns the ending step's
    observation (the true final one) as ``infos["final_obs"][i]`` and resets i at once, alone, so
    that the observation returned for i is the first of its next episode and the reset is no step
    of the batch.

    The time limit (``max_episode_steps``, the task's by default) is applied here, from EnvPool's
    ``elapsed_step``, with EnvPool's own set one step further: EnvPool reports an episode that
    terminates on its limit's last step as truncated only, where gymnasium (and the bootstrap)
    needs ``terminated`` as well.

    With several groups each is its own EnvPool in async mode, with a batch size of the group's
    environments, so that a group's results come back all together: a seed gives the same history
    whatever the threads' timing.  Such a pool holds as many spare environments again, which only
    pad the resets of a few environments to a whole batch.  Environment i is seeded ``seed + i``
    (``reset(seed=...)`` remakes the pools with the seeds given: EnvPool fixes them at
    construction).
    """

    def __init__(self, env: str, n_envs: int, threads: Optional[int] = None, *,
                 groups: int = 1, seed: int = 0, **envpool_kwargs: Any):
        import envpool

        self.task_id = envpool_task_id(env)
        if int(n_envs) < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.num_envs = int(n_envs)
        threads = usable_cpus() if threads is None or threads == 0 else int(threads)
        if threads < 1:
            raise ValueError(f"threads (env_threads) must be >= 1 or 0 (one per usable core), "
                             f"got {threads}")
        self.threads = threads
        n_groups = int(groups)
        if not 1 <= n_groups <= self.num_envs:
            raise ValueError(f"groups must be in [1, n_envs] = [1, {self.num_envs}], got {groups}")
        bounds = np.linspace(0, self.num_envs, n_groups + 1).round().astype(int)
        self.env_groups: List[slice] = [slice(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
        self._ids = [np.arange(sl.stop - sl.start, dtype=np.int32) for sl in self.env_groups]
        # One group: a pool in sync mode, no spares (nothing to overlap with).
        self._spares = n_groups > 1
        limit = envpool_kwargs.pop("max_episode_steps", None)
        if limit is None:
            limit = envpool.make_spec(self.task_id).config.max_episode_steps
        if int(limit) < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {limit}")
        self.max_episode_steps = int(limit)
        self._kwargs = dict(envpool_kwargs, max_episode_steps=self.max_episode_steps + 1)
        self._make = envpool.make
        self._pools: List[Any] = []
        self._io: List[Optional[_DirectIO]] = []
        self._seeds: Optional[List[int]] = None
        self._build([seed + i for i in range(self.num_envs)])
        first = self._pools[0]
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        from gymnasium.vector.utils import batch_space

        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._closed = False

    def _build(self, seeds: List[int]) -> None:
        self._close_pools()
        # The threads split between the groups, which step at the same time; one each at least.
        per_group = max(1, self.threads // len(self.env_groups))
        for sl, ids in zip(self.env_groups, self._ids):
            n = len(ids)
            spare_seeds = [s + self.num_envs for s in seeds[sl]] if self._spares else []
            pool = self._make(self.task_id, env_type="gymnasium", num_envs=n + len(spare_seeds),
                              batch_size=n, num_threads=min(per_group, n),
                              env_seed=seeds[sl] + spare_seeds, **self._kwargs)
            self._pools.append(pool)
            self._io.append(_direct_io(pool))
        self._seeds = list(seeds)
        self._fresh = True

    def reset(self, *, seed: Union[None, int, Sequence[int]] = None, options=None):
        if options is not None:
            raise ValueError("EnvPoolVectorEnv.reset takes no options")
        if seed is not None:
            seeds = ([int(seed) + i for i in range(self.num_envs)] if isinstance(seed, int)
                     else [int(s) for s in seed])
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed must give one seed per environment ({self.num_envs}), "
                                 f"got {len(seeds)}")
            if not (self._fresh and seeds == self._seeds):
                self._build(seeds)
        self._fresh = False
        parts = [self._reset(g, ids) for g, ids in enumerate(self._ids)]
        return np.concatenate(parts), {}

    def _reset(self, group: int, ids: np.ndarray) -> np.ndarray:
        """First observations of the group's environments ``ids`` (in that order), resetting the
        spare ones too to fill a batch."""
        n = len(self._ids[group])
        request = (np.concatenate([ids, np.arange(n, 2 * n - len(ids), dtype=np.int32)])
                   if self._spares else ids)
        obs, info = self._pools[group].reset(request)
        got = np.asarray(info["env_id"])
        out = np.empty((len(ids),) + obs.shape[1:], obs.dtype)
        position = {int(e): k for k, e in enumerate(got)}
        for k, e in enumerate(ids):
            out[k] = obs[position[int(e)]]
        return out

    def send(self, actions, group: int) -> None:
        """Starts group ``group``'s step with its rows of the actions (``[n_g, *A]``)."""
        io = self._io[group]
        if io is None:
            self._pools[group].send(np.asarray(actions), self._ids[group])
        else:
            io.send(actions, self._ids[group])

    def recv(self, group: int):
        """Group ``group``'s step: ``obs, rewards, terminated, truncated, infos`` for its
        environments (rows in order), same-step autoreset as in the class docstring."""
        io = self._io[group]
        if io is None:
            obs, rew, term, pool_trunc, info = self._pools[group].recv()
            env_id, elapsed = info["env_id"], info["elapsed_step"]
        else:
            obs, rew, term, pool_trunc, env_id, elapsed = io.recv()
        trunc = elapsed >= self.max_episode_steps
        if not (env_id[:-1] < env_id[1:]).all():  # async mode returns them as they finish
            order = np.argsort(env_id)
            obs, rew, term, trunc = obs[order], rew[order], term[order], trunc[order]
            pool_trunc = pool_trunc[order]
        if pool_trunc.any():  # its limit is one step past ours: never reached
            raise RuntimeError("EnvPool truncated an episode past trpo_ext's time limit")
        ended = np.flatnonzero(np.logical_or(term, trunc))
        infos: Dict[str, Any] = {}
        if len(ended):
            # Copies: the pool may reuse its output buffers for the reset below.
            obs, rew, term = np.array(obs), np.array(rew), np.array(term)
            final_obs = np.full(len(term), None, dtype=object)
            for i in ended:
                final_obs[i] = obs[i].copy()
            infos = {"final_obs": final_obs, "_final_obs": np.logical_or(term, trunc)}
            obs[ended] = self._reset(group, ended.astype(np.int32))
        return obs, rew, term, trunc, infos

    def step(self, actions):
        actions = np.asarray(actions)
        if len(self.env_groups) == 1:
            self.send(actions, 0)
            return self.recv(0)
        for g, sl in enumerate(self.env_groups):
            self.send(actions[sl], g)
        results = [self.recv(g) for g in range(len(self.env_groups))]
        obs, rew, term, trunc = (np.concatenate([r[k] for r in results]) for k in range(4))
        infos: Dict[str, Any] = {}
        if any(r[4] for r in results):
            infos = {"final_obs": np.full(self.num_envs, None, dtype=object),
                     "_final_obs": np.logical_or(term, trunc)}
            for sl, r in zip(self.env_groups, results):
                if r[4]:
                    infos["final_obs"][sl] = r[4]["final_obs"]
        return obs, rew, term, trunc, infos

    def _close_pools(self) -> None:
        for pool in self._pools:
            pool.close()
        self._pools, self._io = [], []

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._close_pools()


class _DirectIO:
    """A pool's step through EnvPool's C++ ``_send``/``_recv``, the arrays in the pool's own key
    order: EnvPool's Python ``send``/``recv`` rebuild dicts and its config on every call, a large
    share of a small batch's step (benchmarks/RESULTS.md)."""

    def __init__(self, pool, action_keys: List[str], state_keys: List[str], action_spec):
        self._send, self._recv = pool._send, pool._recv
        # The other action arrays are the environment ids (single player: players' ids too).
        self._n_action = len(action_keys)
        self._action_at = action_keys.index("action")
        self._state_at = [state_keys.index(k) for k in
                          ("obs", "reward", "done", "trunc", "info:env_id", "elapsed_step")]
        self._dtype = np.dtype(action_spec.dtype)
        self._shape = tuple(action_spec.shape)[1:]  # after the batch dimension (-1)

    def send(self, actions, ids: np.ndarray) -> None:
        actions = np.ascontiguousarray(actions, dtype=self._dtype)
        # The C++ side reads the spec's shape from the buffer without checking it.
        if actions.shape != (len(ids),) + self._shape:
            raise ValueError(f"actions must have shape {(len(ids),) + self._shape}, got "
                             f"{actions.shape}")
        parts = [ids] * self._n_action
        parts[self._action_at] = actions
        self._send(parts)

    def recv(self):
        """``obs, rewards, terminated, truncated (EnvPool's), env_id, elapsed_step``."""
        state = self._recv()
        obs, rew, done, trunc, env_id, elapsed = (state[i] for i in self._state_at)
        return obs, rew, done & ~trunc, trunc, env_id, elapsed


def _direct_io(pool) -> Optional[_DirectIO]:
    """:class:`_DirectIO` for a single-player pool with one array observation, the layout of
    EnvPool 1.2.5's MuJoCo and classic-control tasks; None (the public API) for anything else."""
    try:
        action_keys, state_keys = list(pool._action_keys), list(pool._state_keys)
        action_spec = pool.spec.action_array_spec["action"]
        if (sorted(action_keys) != ["action", "env_id", "players.env_id"]
                or pool.config.get("max_num_players", 1) != 1):
            return None
        return _DirectIO(pool, action_keys, state_keys, action_spec)
    except (AttributeError, KeyError, ValueError):
        return None
