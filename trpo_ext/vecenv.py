"""Vector envs for the collector: ``SameStepVectorEnv`` steps a few environments in this process,
and ``ShardedVectorEnv`` steps them in shards: one shard in this process, one in each of a few
worker processes, all at the same time.

``SameStepVectorEnv`` is gymnasium's ``SyncVectorEnv`` in same-step autoreset mode minus what the
collector never reads: ``SyncVectorEnv.step`` merges every environment's info dict into the batch's
at every step (for MuJoCo tasks, four or five entries per environment per step) and stacks the
observations through the generic space utilities, which costs about a third of the environments'
own stepping time (8 HalfCheetah-v5 copies, 8000 steps: 1.17 s against 0.85 s for the same
environments in a plain loop, 2-vCPU VM).  Its batches are those of ``SyncVectorEnv`` bit for bit
(tested); its infos hold only ``final_obs`` (and ``final_info``) when an episode ended.

gymnasium's ``AsyncVectorEnv`` gives every environment its own process and a round trip per
environment per step; on a machine with a few cores that costs more than it saves (8 MuJoCo
environments on 2 cores: about 3× slower than stepping them in one process).  Here the
environments are split into ``workers + 1`` contiguous shards, each a ``SyncVectorEnv`` in
same-step autoreset mode; a step sends each worker its slice of the actions, steps the local shard
meanwhile, and gathers the workers' results (one message each way per worker).  The batches are
those of one ``SyncVectorEnv`` over the same environments and seeds, bit for bit.

Sharded stepping: ``choose_workers`` decides how many workers pay off: none on a single core, or when one
environment step is too cheap for a message round trip to be worth it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

__all__ = ["SameStepVectorEnv", "ShardedVectorEnv", "choose_workers", "usable_cpus"]

EnvSpec = Union[str, Callable[[], Any]]

# One worker round trip (pickle, pipe, wake-up) costs tens of µs; a worker pays off when the steps
# it takes over cost clearly more.  Measured on a 2-core VM: CartPole ~10 µs a step (workers lose),
# MuJoCo HalfCheetah/Hopper ~150–300 µs (workers win).
_MIN_STEP_SECONDS = 60e-6


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _probe_step_seconds(make_env: Callable[[], Any], steps: int = 64) -> float:
    """Mean seconds of one random-action step of one environment (resets excluded)."""
    env = make_env()
    try:
        env.reset(seed=0)
        env.action_space.seed(0)
        actions = [env.action_space.sample() for _ in range(steps)]
        total, counted = 0.0, 0
        for a in actions:
            t0 = time.perf_counter()
            _, _, term, trunc, _ = env.step(a)
            total += time.perf_counter() - t0
            counted += 1
            if term or trunc:
                env.reset()
        return total / max(counted, 1)
    finally:
        env.close()


def choose_workers(env: EnvSpec, make_env: Callable[[], Any], n_envs: int, requested: int) -> int:
    """Worker processes for ``n_envs`` environments: ``requested`` when >= 0, else (auto) one per
    spare CPU core when one step of the environment takes over 60 µs and ``env`` can be sent to a
    process (a gymnasium id or a picklable callable); 0 otherwise."""
    if requested >= 0:
        return min(requested, max(n_envs - 1, 0))
    spare = min(usable_cpus() - 1, n_envs - 1)
    if spare <= 0 or not _picklable(env):
        return 0
    return spare if _probe_step_seconds(make_env) > _MIN_STEP_SECONDS else 0


def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


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
        self._obs_shape = (self.num_envs,) + tuple(self.single_observation_space.shape or ())
        self._obs_dtype = self.single_observation_space.dtype
        self._closed = False

    def reset(self, *, seed: Union[None, int, Sequence[Optional[int]]] = None, options=None):
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed must give one seed per environment ({self.num_envs}), "
                                 f"got {len(seeds)}")
        obs = np.empty(self._obs_shape, dtype=self._obs_dtype)
        for i, (env, s) in enumerate(zip(self.envs, seeds)):
            obs[i], _ = env.reset(seed=s, options=options)
        return obs, {}

    def step(self, actions):
        n = self.num_envs
        obs = np.empty(self._obs_shape, dtype=self._obs_dtype)
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
            obs[i] = o
        return obs, rewards, terminated, truncated, infos

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for env in getattr(self, "envs", []):
            env.close()


def _shard_sizes(n_envs: int, shards: int) -> List[int]:
    base, extra = divmod(n_envs, shards)
    # The local shard (index 0) takes the smaller share: it also runs the policy between steps.
    return [base + (1 if i >= shards - extra else 0) for i in range(shards)]


def _worker(conn, env: EnvSpec, n: int) -> None:
    from .rollout import make_vector_env

    envs = None
    try:
        envs = make_vector_env(env, n)
        conn.send(("ok", None))
        while True:
            cmd, data = conn.recv()
            if cmd == "step":
                obs, rew, term, trunc, infos = envs.step(data)
                done = np.flatnonzero(np.logical_or(term, trunc))
                finals = {int(i): infos["final_obs"][i] for i in done} if len(done) else {}
                conn.send(("ok", (obs, rew, term, trunc, finals)))
            elif cmd == "reset":
                obs, _ = envs.reset(seed=data)
                conn.send(("ok", obs))
            elif cmd == "close":
                break
    except KeyboardInterrupt:
        pass
    except Exception:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
    finally:
        if envs is not None:
            envs.close()
        conn.close()


class ShardedVectorEnv:
    """``n_envs`` copies of ``env`` stepped in ``workers + 1`` shards (see the module docstring).

    The subset of the gymnasium VectorEnv interface that trpo_ext's collector uses: ``num_envs``,
    ``single_observation_space``, ``single_action_space``, ``observation_space``, ``action_space``,
    ``reset(seed=[...])``, ``step(actions)`` (same-step autoreset; ``infos["final_obs"][i]`` is the
    final observation of environment i when it just ended an episode) and ``close()``.
    """

    def __init__(self, env: EnvSpec, n_envs: int, workers: int):
        from .rollout import make_vector_env

        if workers < 1 or workers >= n_envs:
            raise ValueError(f"workers must be in [1, n_envs - 1] = [1, {n_envs - 1}], got {workers}")
        if not _picklable(env):
            raise ValueError("env must be a gymnasium id or a picklable callable to be stepped in "
                             "worker processes (env_workers=0 keeps every environment in this "
                             "process)")
        sizes = _shard_sizes(n_envs, workers + 1)
        self.num_envs = n_envs
        self._bounds = np.cumsum([0] + sizes)
        # fork starts a worker in milliseconds (spawn would import torch again, about a second);
        # the workers only step environments and never touch torch or its thread pools.
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        self._conns, self._procs = [], []
        self._closed = False
        try:
            for k in range(1, len(sizes)):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, env, sizes[k]), daemon=True,
                                   name=f"trpo_ext-env-worker-{k}")
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            self._local = make_vector_env(env, sizes[0])
            for conn in self._conns:
                self._receive(conn)
        except BaseException:
            self.close()
            raise
        self.single_observation_space = self._local.single_observation_space
        self.single_action_space = self._local.single_action_space
        from gymnasium.vector.utils import batch_space

        self.observation_space = batch_space(self.single_observation_space, n_envs)
        self.action_space = batch_space(self.single_action_space, n_envs)

    def _receive(self, conn):
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError("an environment worker process exited unexpectedly") from None
        if status == "error":
            raise RuntimeError(f"an environment worker process failed:\n{payload}")
        return payload

    def reset(self, *, seed: Optional[Sequence[int]] = None, options=None):
        seeds = list(seed) if seed is not None else [None] * self.num_envs
        b = self._bounds
        for k, conn in enumerate(self._conns, start=1):
            conn.send(("reset", seeds[b[k]:b[k + 1]]))
        obs_local, _ = self._local.reset(seed=seeds[b[0]:b[1]])
        parts = [np.asarray(obs_local)] + [self._receive(c) for c in self._conns]
        return np.concatenate(parts), {}

    def step(self, actions):
        actions = np.asarray(actions)
        b = self._bounds
        for k, conn in enumerate(self._conns, start=1):
            conn.send(("step", actions[b[k]:b[k + 1]]))
        obs, rew, term, trunc, infos = self._local.step(actions[b[0]:b[1]])
        obs_parts, rew_parts, term_parts, trunc_parts = [np.asarray(obs)], [rew], [term], [trunc]
        final_obs = np.full(self.num_envs, None, dtype=object)
        any_done = False
        for i in np.flatnonzero(np.logical_or(term, trunc)):
            final_obs[i] = infos["final_obs"][i]
            any_done = True
        for k, conn in enumerate(self._conns, start=1):
            o, r, te, tr, finals = self._receive(conn)
            obs_parts.append(o)
            rew_parts.append(r)
            term_parts.append(te)
            trunc_parts.append(tr)
            for i, f in finals.items():
                final_obs[b[k] + i] = f
                any_done = True
        return (np.concatenate(obs_parts), np.concatenate(rew_parts), np.concatenate(term_parts),
                np.concatenate(trunc_parts), {"final_obs": final_obs} if any_done else {})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except Exception:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for conn in self._conns:
            conn.close()
        local = getattr(self, "_local", None)
        if local is not None:
            local.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
