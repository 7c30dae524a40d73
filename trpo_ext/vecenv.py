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
same-step autoreset mode; a step hands each worker its slice of the actions, steps the local shard
meanwhile, and gathers the workers' results.  The batches are those of one ``SyncVectorEnv`` over
the same environments and seeds, bit for bit.

A step's round trip goes through shared memory (``_StepBuffers``: the actions in, the results out)
with two semaphores per worker, waited on by spinning before blocking: a pickled message each way
over a pipe costs hundreds of times the semaphore handshake on a small VM, where a blocked process
is slow to wake.  The pipe stays for start-up, ``reset``, error tracebacks, spaces of no fixed
shape and dtype (anything but Box and Discrete), and actions not of the action space's dtype (which
reach the environments unconverted, as in one process).

Sharded stepping: ``choose_workers`` decides how many workers pay off: none on a single core, or
when one environment step is too cheap for a message round trip to be worth it.
"""
from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import pickle
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from .envs import EnvSpec

__all__ = ["EnvFactory", "SameStepVectorEnv", "ShardedVectorEnv", "choose_workers", "usable_cpus"]

# A worker pays off when the steps it takes over cost clearly more than its round trip (a few µs
# of semaphore handshake and copies, a process wake-up after each learner update).  The line sits
# between classic control, where a worker broke even, and the cheapest MuJoCo tasks, where it won.
_MIN_STEP_SECONDS = 7e-6


class EnvFactory:
    """Makes one copy of an environment: ``gymnasium.make(env)`` for an id, else ``env()``
    checked to be a gymnasium Env.  A class, not a closure, so that it pickles to worker processes
    whenever ``env`` does."""

    def __init__(self, env: "EnvSpec"):
        self.env = env.env if isinstance(env, EnvFactory) else env

    def __call__(self):
        import gymnasium as gym

        if isinstance(self.env, str):
            # The passive env checker wraps every step in Python checks; the env is a registered one.
            return gym.make(self.env, disable_env_checker=True)
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


def choose_workers(env: "EnvSpec", make_env: Callable[[], Any], n_envs: int, requested: int) -> int:
    """Worker processes for ``n_envs`` environments: ``requested`` when >= 0, else (auto) one per
    spare CPU core when one step of the environment takes over 7 µs and ``env`` can be sent to a
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


def _shard_sizes(n_envs: int, shards: int) -> List[int]:
    base, extra = divmod(n_envs, shards)
    # The local shard (index 0) takes the smaller share: it also runs the policy between steps.
    return [base + (1 if i >= shards - extra else 0) for i in range(shards)]


# The handshake of a step in shared memory.  The parent waits for a worker's results by spinning
# while they are a few hundred µs away; a worker waits for the next actions by spinning while the
# policy runs between two steps, and both block once the other side has gone quiet for longer (a
# worker during the learner's update, which lasts seconds: it must not hold a core then).  On the
# 2-vCPU development VM a blocked process takes about 450 µs to wake, a spinning one about 1 µs.
_PARENT_SPIN_SECONDS = 20e-3  # well over one shard's step (MuJoCo, 4 envs: ~0.5 ms)
_WORKER_SPIN_SECONDS = 3e-3   # well over the policy's step and the collector's bookkeeping
_BLOCK_SLICE_SECONDS = 0.1    # a blocked wait checks this often that the other side still lives

# The command word (written by the parent before it releases "go") and the status word (written by
# the worker before it releases "done").
_STEP, _MESSAGE, _CLOSE = 0, 1, 2          # command: step the actions / read the pipe / exit
_OK, _OK_FINALS_ON_PIPE, _ERROR = 0, 1, 2  # status: results in the buffers / finals follow on the
#                                            pipe / a traceback follows on the pipe


# A spinning wait yields its core at every try: without that, a spinner that shares a core with
# the process it waits for (more workers than cores, or another program's load) holds it for whole
# scheduler time slices.  8 HalfCheetah-v5 envs, 2 workers on the 2-vCPU VM: 4.5 ms a vector step
# without, 0.74–0.85 ms with (one process: 0.69–0.87 ms); no cost with 1 worker (0.5–0.67 ms).
_yield_core = getattr(os, "sched_yield", lambda: None)  # not on Windows


def _acquire(sem, spin_seconds: float, alive: Callable[[], bool]) -> bool:
    """Acquire ``sem``: spin on non-blocking tries (yielding the core in between) for
    ``spin_seconds``, then block in slices of ``_BLOCK_SLICE_SECONDS``.  False (not acquired) once
    ``alive()`` says the process that should release it has gone."""
    if sem.acquire(False):
        return True
    deadline = time.perf_counter() + spin_seconds
    while time.perf_counter() < deadline:
        if sem.acquire(False):
            return True
        _yield_core()
    while not sem.acquire(timeout=_BLOCK_SLICE_SECONDS):
        if not alive():
            return sem.acquire(False)  # it may have released just before it exited
    return True


class _StepBuffers:
    """One worker's shard of a step in shared memory, as NumPy views: ``actions`` ``[n, *A]`` of the
    action space's dtype (written by the parent); ``obs`` and ``final_obs`` ``[n, *O]`` of the
    observation space's dtype, ``rewards`` ``[n]`` float64, ``terminated``, ``truncated`` and
    ``ended`` ``[n]`` bool (written by the worker; ``final_obs[i]`` is set where ``ended[i]``); and
    the ``command`` and ``status`` words.  Two semaphores order every access: the parent writes
    the actions and the command, then releases ``go``; the worker acquires ``go``, reads them,
    writes its results and the status, then releases ``done``; the parent acquires ``done`` and
    reads.  (Semaphore operations are full memory barriers.)

    The memory is an anonymous ``mmap`` that a forked worker inherits, or, where fork is
    unavailable, a ``multiprocessing.shared_memory`` block that the worker attaches by name.
    """

    def __init__(self, ctx, n: int, observation_space, action_space):
        fields = [("actions", (n,) + action_space.shape, action_space.dtype),
                  ("obs", (n,) + observation_space.shape, observation_space.dtype),
                  ("final_obs", (n,) + observation_space.shape, observation_space.dtype),
                  ("rewards", (n,), np.float64), ("terminated", (n,), np.bool_),
                  ("truncated", (n,), np.bool_), ("ended", (n,), np.bool_),
                  ("command", (), np.int64), ("status", (), np.int64)]
        self._fields, size = [], 0
        for name, shape, dtype in fields:
            dtype = np.dtype(dtype)
            self._fields.append((name, shape, dtype.str, size))
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            size += -(-nbytes // 64) * 64  # every field on its own cache lines
        self.go, self.done = ctx.Semaphore(0), ctx.Semaphore(0)
        self._owner = True
        if ctx.get_start_method() == "fork":
            self._mmap, self._shm = mmap.mmap(-1, size), None
        else:
            from multiprocessing import shared_memory

            self._mmap, self._shm = None, shared_memory.SharedMemory(create=True, size=size)
        self._map_views()

    def _map_views(self) -> None:
        buffer = self._mmap if self._mmap is not None else self._shm.buf
        for name, shape, dtype, offset in self._fields:
            setattr(self, name, np.ndarray(shape, dtype=dtype, buffer=buffer, offset=offset))

    def fits(self, actions: np.ndarray) -> bool:
        return actions.dtype == self.actions.dtype and actions.shape == self.actions.shape

    def __getstate__(self):  # a spawned worker only: a forked one inherits the object itself
        return {"fields": self._fields, "name": self._shm.name, "go": self.go, "done": self.done}

    def __setstate__(self, state) -> None:
        from multiprocessing import shared_memory

        self._fields, self.go, self.done = state["fields"], state["go"], state["done"]
        self._owner, self._mmap = False, None
        self._shm = shared_memory.SharedMemory(name=state["name"])
        self._map_views()

    def close(self) -> None:
        for name, *_ in self._fields:
            setattr(self, name, None)  # the views hold the buffer open
        if self._mmap is not None:
            self._mmap.close()
        if self._shm is not None:
            self._shm.close()
            if self._owner:
                self._shm.unlink()


def _shared_memory_spaces(observation_space, action_space) -> bool:
    """Whether steps can go through :class:`_StepBuffers`: both spaces of a fixed shape and dtype
    (Box or Discrete); other spaces take the pipe."""
    from gymnasium import spaces

    fixed = (spaces.Box, spaces.Discrete)
    return isinstance(observation_space, fixed) and isinstance(action_space, fixed)


def _step_message(envs, actions):
    """A step's reply on the pipe: the batches and ``{i: final observation}`` of ended episodes."""
    obs, rew, term, trunc, infos = envs.step(actions)
    done = np.flatnonzero(np.logical_or(term, trunc))
    finals = {int(i): infos["final_obs"][i] for i in done} if len(done) else {}
    return obs, rew, term, trunc, finals


def _serve_message(conn, envs) -> bool:
    """Answer one message of the pipe protocol; False when it asks the worker to exit."""
    cmd, data = conn.recv()
    if cmd == "step":
        conn.send(("ok", _step_message(envs, data)))
    elif cmd == "reset":
        obs, _ = envs.reset(seed=data)
        conn.send(("ok", obs))
    elif cmd == "close":
        return False
    return True


def _shared_step(conn, envs, shared: _StepBuffers) -> None:
    # A copy of the actions: an environment may keep the array it was given, and the parent
    # overwrites the buffer at the next step.
    obs, rew, term, trunc, infos = envs.step(shared.actions.copy())
    shared.obs[...] = obs
    shared.rewards[...] = rew
    shared.terminated[...] = term
    shared.truncated[...] = trunc
    np.logical_or(term, trunc, out=shared.ended)
    finals = {int(i): infos["final_obs"][i] for i in np.flatnonzero(shared.ended)}
    final_shape, final_dtype = shared.final_obs.shape[1:], shared.final_obs.dtype
    # A final observation goes through the buffer only where that keeps it as it is (an array of
    # the space's shape and dtype); otherwise all of this step's finals follow on the pipe.
    fit = all(isinstance(f, np.ndarray) and f.shape == final_shape and f.dtype == final_dtype
              for f in finals.values())
    if fit:
        for i, f in finals.items():
            shared.final_obs[i] = f
    shared.status[()] = _OK if fit else _OK_FINALS_ON_PIPE
    shared.done.release()
    if not fit:  # after the release: the parent reads the pipe once it has the status
        conn.send(("ok", finals))


def _worker(conn, env: "EnvSpec", n: int, shared: Optional[_StepBuffers]) -> None:
    envs = None
    try:
        envs = SameStepVectorEnv([EnvFactory(env) for _ in range(n)])
        conn.send(("ok", None))
        if shared is None:
            while _serve_message(conn, envs):
                pass
        else:
            parent = mp.parent_process()
            while _acquire(shared.go, _WORKER_SPIN_SECONDS, parent.is_alive):
                command = int(shared.command)
                if command == _STEP:
                    _shared_step(conn, envs, shared)
                elif command == _MESSAGE:
                    if not _serve_message(conn, envs):
                        break
                else:  # _CLOSE
                    break
    except KeyboardInterrupt:
        pass
    except Exception:
        message = ("error", traceback.format_exc())
        try:
            if shared is not None:  # wakes a parent that waits for this step's results
                shared.status[()] = _ERROR
                shared.done.release()
            conn.send(message)
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

    A worker that fails or dies makes the call that waits for it raise RuntimeError; the env is
    then unusable (its shards may stand at different steps) and only ``close`` is left to call.
    """

    def __init__(self, env: "EnvSpec", n_envs: int, workers: int):
        from gymnasium.vector.utils import batch_space

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
        self._conns, self._procs, self._shared = [], [], []
        self._closed = self._failed = False
        try:
            # The local shard first: its spaces size the workers' shared buffers.
            self._local = SameStepVectorEnv([EnvFactory(env) for _ in range(sizes[0])])
            self.single_observation_space = self._local.single_observation_space
            self.single_action_space = self._local.single_action_space
            shared = _shared_memory_spaces(self.single_observation_space, self.single_action_space)
            for k in range(1, len(sizes)):
                buffers = (_StepBuffers(ctx, sizes[k], self.single_observation_space,
                                        self.single_action_space) if shared else None)
                self._shared.append(buffers)
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, env, sizes[k], buffers),
                                   daemon=True, name=f"trpo_ext-env-worker-{k}")
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            for conn in self._conns:
                self._receive(conn)
        except BaseException:
            self.close()
            raise
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

    def _send(self, k: int, message) -> None:
        """A message of the pipe protocol to worker ``k`` (from 0); a worker that waits on its
        semaphore is woken to read it."""
        shared = self._shared[k]
        if shared is not None:
            shared.command[()] = _MESSAGE
            shared.go.release()
        self._conns[k].send(message)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this ShardedVectorEnv is closed")
        if self._failed:
            raise RuntimeError("an environment worker failed earlier in this ShardedVectorEnv; "
                               "close it and make a new one")

    def _wait_for_step(self, k: int) -> tuple:
        """Worker ``k``'s step results from shared memory: ``obs``, ``rewards``, ``terminated``,
        ``truncated`` as views into its buffers (valid until its next step), and ``{i: final
        observation}`` as copies."""
        shared, proc = self._shared[k], self._procs[k]
        if not _acquire(shared.done, _PARENT_SPIN_SECONDS, proc.is_alive):
            raise RuntimeError(f"environment worker process {proc.name} (pid {proc.pid}) died "
                               f"during a step (exit code {proc.exitcode})")
        status = int(shared.status)
        if status == _ERROR:
            self._receive(self._conns[k])  # raises with the worker's traceback
            raise RuntimeError(f"environment worker process {proc.name} failed during a step")
        if status == _OK_FINALS_ON_PIPE:
            finals = self._receive(self._conns[k])
        else:
            finals = {int(i): shared.final_obs[i].copy() for i in np.flatnonzero(shared.ended)}
        return shared.obs, shared.rewards, shared.terminated, shared.truncated, finals

    def reset(self, *, seed: Optional[Sequence[int]] = None, options=None):
        self._check_usable()
        seeds = list(seed) if seed is not None else [None] * self.num_envs
        b = self._bounds
        try:
            for k in range(len(self._conns)):
                self._send(k, ("reset", seeds[b[k + 1]:b[k + 2]]))
            obs_local, _ = self._local.reset(seed=seeds[b[0]:b[1]])
            parts = [np.asarray(obs_local)] + [self._receive(c) for c in self._conns]
        except BaseException:
            self._failed = True
            raise
        return np.concatenate(parts), {}

    def step(self, actions):
        self._check_usable()
        actions = np.asarray(actions)
        b = self._bounds
        try:
            # Through shared memory where the actions have the layout of the buffer (the action
            # space's dtype and shape); through the pipe otherwise, so that the worker's
            # environments get exactly the array the caller gave.
            in_buffers = []
            for k, shared in enumerate(self._shared):
                part = actions[b[k + 1]:b[k + 2]]
                in_buffers.append(shared is not None and shared.fits(part))
                if in_buffers[k]:
                    shared.actions[...] = part
                    shared.command[()] = _STEP
                    shared.go.release()
                else:
                    self._send(k, ("step", part))
            obs, rew, term, trunc, infos = self._local.step(actions[b[0]:b[1]])
            obs_parts, rew_parts = [np.asarray(obs)], [rew]
            term_parts, trunc_parts = [term], [trunc]
            final_obs = np.full(self.num_envs, None, dtype=object)
            any_done = False
            for i in np.flatnonzero(np.logical_or(term, trunc)):
                final_obs[i] = infos["final_obs"][i]
                any_done = True
            for k, conn in enumerate(self._conns):
                if in_buffers[k]:
                    o, r, te, tr, finals = self._wait_for_step(k)
                else:
                    o, r, te, tr, finals = self._receive(conn)
                obs_parts.append(o)
                rew_parts.append(r)
                term_parts.append(te)
                trunc_parts.append(tr)
                for i, f in finals.items():
                    final_obs[b[k + 1] + i] = f
                    any_done = True
            # np.concatenate copies: the arrays returned do not alias the workers' buffers.
            return (np.concatenate(obs_parts), np.concatenate(rew_parts),
                    np.concatenate(term_parts), np.concatenate(trunc_parts),
                    {"final_obs": final_obs} if any_done else {})
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shared_buffers = getattr(self, "_shared", [])
        for k, conn in enumerate(getattr(self, "_conns", [])):
            shared = shared_buffers[k]
            try:
                if shared is not None:
                    shared.command[()] = _CLOSE
                    shared.go.release()
                else:
                    conn.send(("close", None))
            except Exception:
                pass
        for proc in getattr(self, "_procs", []):
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for conn in getattr(self, "_conns", []):
            conn.close()
        local = getattr(self, "_local", None)
        if local is not None:
            local.close()
        for shared in shared_buffers:
            if shared is not None:
                shared.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
