"""Data-parallel training under ``torchrun`` (torch.distributed): K ranks, one update.

``torchrun --nproc-per-node K -m trpo_ext train ...`` (or ``trpo_ext.train`` in a script that
torchrun starts) runs K copies of the driver.  The settings describe the whole run: ``n_envs`` is
the total number of environments, rank r steps environments ``[r·n, (r+1)·n)``, n = n_envs / K,
seeded ``seed + i`` as environment i is in one process, with the action noise of environment i
(every rank draws the noise of all n_envs environments from the same generator and keeps its own
columns, so the generators of all ranks stay in the same state).  Every sum over the batch goes
through the helpers below, which make each rank's update that of one process on the union of the
ranks' batches; the parameters therefore stay identical on every rank without being sent, and K
ranks give the one-process run on the same seed up to floating-point reduction order.

Every collective is one all-reduce through :func:`reduce_sum_` (the other helpers build on it;
the scalars of one step are batched into one), except the critic's: its inputs and targets are
all-gathered (:func:`gather_rows`) and every rank fits the critic on the whole batch.  Per
iteration: 1 for the finished episodes' statistics, 1 for the advantages' mean and spread, 1 for
g, ``cg_iters`` for the Fisher-vector products, 1 for the value-target scale, 1 all-gather per
observation tensor and 1 for the targets, one per line-search trial, 1 for the logged entropy, 1
for the explained variance, 1 for the observation normaliser, and 1 more when a ``callback`` is
given (any rank's stop stops all); and once per run, 1 to check that all ranks resumed from the
same step, and a barrier at the end.  With the defaults (2048 samples, flat observations):
7 + 10 + 2 + 1 to 10 trials, 20 to 29.

Rank 0 alone writes logs, plot, progress bar and checkpoints.  In one process (no torchrun, or
``distributed="off"``) every helper returns its input unchanged, and nothing is imported beyond
torch.  gloo serves CPU runs, NCCL CUDA runs (``device="cuda"`` is each rank's ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch

__all__ = ["World", "Shard", "DistributedError", "MODES", "world", "started",
           "launched_by_torchrun", "running", "shard", "reduce_mean_", "reduce_sum_", "reduce_scalars", "moments", "gather_episodes",
           "any_rank", "check_same", "gather_rows", "restart_checkpoint"]

MODES = ("auto", "on", "off")
# What torchrun (and any launcher of the env:// kind) sets in each worker's environment.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A collective waits this long for a rank that stopped without closing its connections (a machine
# gone); a rank that dies closes them and the others fail at once.  Longer than any stretch
# between two collectives (a rollout, rank 0's checkpoint).
_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("TRPO_EXT_DIST_TIMEOUT_S", 600)))


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped (died, or raised), or the network did."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL: this rank's GPU)


_world = World()
# A collective has completed in this process: errors after it can be a rank's own, errors before
# it (settings, environments) are the same on every rank (the CLI prints them once, on rank 0).
_started = False
_groups = 0  # process groups this process has set up


def world() -> World:
    """The ranks of the run in progress: ``World(0, 1, 0)`` outside data-parallel training."""
    return _world


def started() -> bool:
    """Whether a collective has completed in this process (training has begun)."""
    return _started


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def _wanted(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False
    if not launched_by_torchrun():
        if mode == "on":
            missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
            raise ValueError(f"distributed='on' but {', '.join(missing)} not set: start the run "
                             f"with torchrun (torchrun --nproc-per-node K -m trpo_ext train ...)")
        return False
    return True


@contextlib.contextmanager
def running(mode: str, device: torch.device, n_envs: int
            ) -> Iterator[Tuple[World, torch.device]]:
    """Around one training run: joins torchrun's ranks when ``mode`` asks for it (``"auto"``: when
    torchrun's environment is present), yields ``(world, device)`` (a bare ``"cuda"`` becomes
    ``cuda:LOCAL_RANK``), and afterwards leaves the process group as found (one that the caller
    set up stays up).  ``n_envs`` that the ranks cannot share evenly are refused first."""
    global _world
    import torch.distributed as dist

    if not _wanted(mode) and not (mode != "off" and dist.is_available() and dist.is_initialized()):
        yield World(), device
        return
    own = not dist.is_initialized()
    _check_split(n_envs, int(os.environ["WORLD_SIZE"]) if own else dist.get_world_size())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun's static rendezvous (--master-addr/--master-port) keeps one store across
        # --max-restarts and across the runs of one script: without a key prefix per attempt
        # and per run, a new group reads an old one's addresses and never connects.
        global _groups
        _groups += 1
        store, rank, size = next(dist.rendezvous("env://", timeout=_TIMEOUT))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"trpo_ext/attempt_{attempt}/group_{_groups}"
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT,
                                store=dist.PrefixStore(prefix, store), rank=rank, world_size=size)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    _world = World(dist.get_rank(), dist.get_world_size(), local_rank, comm)
    try:
        yield _world, device
        if _world.size > 1:
            # train() returns once rank 0's last checkpoint is on disk.
            with _collective("the final barrier"):
                dist.barrier()
    finally:
        _world = World()
        if own:
            dist.destroy_process_group()


@contextlib.contextmanager
def _collective(what: str):
    try:
        yield
    except RuntimeError as e:  # gloo / NCCL errors, DistBackendError included
        w = _world
        raise DistributedError(
            f"rank {w.rank} of {w.size}: {what} failed, most likely because another rank stopped "
            f"(torchrun's report names the failed rank and its error): {e}") from e


@dataclass(frozen=True)
class Shard:
    """This rank's environments: global indices ``[start, stop)`` of ``total``."""
    start: int
    stop: int
    total: int


def _check_split(n_envs: int, size: int) -> None:
    if n_envs % size:
        raise ValueError(f"n_envs={n_envs} cannot be split evenly over {size} ranks: choose a "
                         f"multiple of {size} (n_envs counts the environments of all ranks)")


def shard(n_envs: int) -> Shard:
    """The environments rank r steps, out of the run's ``n_envs``; an uneven split is refused."""
    w = _world
    _check_split(n_envs, w.size)
    n = n_envs // w.size
    return Shard(w.rank * n, (w.rank + 1) * n, n_envs)


# --- the reductions ------------------------------------------------------------------------------

def reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (returns ``t``)."""
    global _started
    if _world.size > 1:
        import torch.distributed as dist

        with _collective("an all-reduce"):
            dist.all_reduce(t)
        _started = True
    return t


def reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the ranks, in place (returns ``t``): a batch mean from the ranks' equal
    shares."""
    if _world.size > 1:
        reduce_sum_(t).div_(_world.size)
    return t


def _gather(rows: torch.Tensor) -> torch.Tensor:
    """``rows [...]`` of every rank, stacked ``[size, ...]`` in float64, by one all-reduce of a
    zero-padded tensor: exact (sums with zeros), and the same bits on every rank."""
    buf = torch.zeros(_world.size, *rows.shape, dtype=torch.float64, device=_world.device)
    buf[_world.rank] = rows
    return reduce_sum_(buf).to(rows.device)


def reduce_scalars(values: Sequence[torch.Tensor], ops: Sequence[str]) -> List[torch.Tensor]:
    """0-d tensors reduced over the ranks in one collective, each by its op (``"mean"``, ``"sum"``
    or ``"max"``), in float64, returned in each value's dtype; the same bits on every rank, so that
    every decision taken from them is the same."""
    if _world.size == 1:
        return list(values)
    rows = _gather(torch.stack([torch.as_tensor(v).to(torch.float64).reshape(()) for v in values]))
    reduce = {"mean": lambda c: c.mean(), "sum": lambda c: c.sum(), "max": lambda c: c.max()}
    return [reduce[op](rows[:, j]).to(torch.as_tensor(v).dtype)
            for j, (v, op) in enumerate(zip(values, ops))]


def moments(x: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, variance)`` over dim 0 of the ranks' batches ``x [B, ...]`` together
    (population variance), in one collective: the ranks' means and variances combined exactly in
    float64, mean = mean of the means, var = mean of (var_r + (mean_r − mean)²)."""
    mean, var = x.mean(0), x.var(0, unbiased=False)
    if _world.size == 1:
        return x.shape[0], mean, var
    both = _gather(torch.stack([mean, var]))
    m = both[:, 0].mean(0)
    v = (both[:, 1] + (both[:, 0] - m).square()).mean(0)
    return x.shape[0] * _world.size, m.to(x.dtype), v.to(x.dtype)


def check_same(value: float, what: str) -> None:
    """Raises :class:`DistributedError` on every rank unless ``value`` is the same on all."""
    if _world.size == 1:
        return
    values = _gather(torch.tensor(float(value))).tolist()
    if len(set(values)) > 1:
        raise DistributedError(f"the ranks disagree on {what}: {values} (rank 0, 1, ...)")


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a callback's stop)."""
    if _world.size == 1:
        return flag
    return bool(reduce_scalars([torch.tensor(float(flag))], ["max"])[0] > 0)


def gather_episodes(finished: Sequence[Tuple[int, float, int]], limit: int = 100
                    ) -> Tuple[int, List[Tuple[float, int]]]:
    """The episodes that ended on all ranks in one rollout, in one process's order.

    ``finished``: this rank's ``(key, return, length)``, key = t·n_envs + global env index, in key
    order.  Returns the number that ended on all ranks and the (return, length) of the last
    ``limit`` of them in key order: what one process stepping every environment appends to its
    last-``limit`` record (each rank sends only its own last ``limit``, which hold all of those).
    """
    if _world.size == 1:
        return len(finished), [(r, n) for _, r, n in finished]
    mine = list(finished)[-limit:]
    rows = torch.zeros(limit + 1, 3, dtype=torch.float64)
    rows[0, 0] = len(finished)
    if mine:
        rows[1:len(mine) + 1] = torch.tensor(mine, dtype=torch.float64)
    all_rows = _gather(rows)
    count = int(all_rows[:, 0, 0].sum())
    merged = sorted((tuple(r) for rank_rows in all_rows
                     for r in rank_rows[1:int(rank_rows[0, 0].clamp(max=limit)) + 1].tolist()),
                    key=lambda r: r[0])
    return count, [(r, int(n)) for _, r, n in merged[-limit:]]


def gather_rows(x: torch.Tensor, n_local: int) -> torch.Tensor:
    """The whole batch ``[T·n_envs, ...]`` on every rank, rows in one process's order (t·n_envs +
    global environment index), from each rank's ``x [T·n_local, ...]`` (t·n_local + its local
    index), by one all-gather.  In one process: ``x``."""
    if _world.size == 1:
        return x
    import torch.distributed as dist

    global _started
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_world.size)]
    with _collective("an all-gather"):
        dist.all_gather(parts, x)
    _started = True
    steps = x.shape[0] // n_local
    # Rank r steps the global environments [r·n_local, (r + 1)·n_local).
    both = torch.stack([p.view(steps, n_local, *x.shape[1:]) for p in parts], 1)
    return both.reshape(steps * n_local * _world.size, *x.shape[1:])


def restart_checkpoint(log_dir) -> "str | None":
    """Under torchrun's ``--max-restarts``, a restarted run (TORCHELASTIC_RESTART_COUNT > 0)
    continues from its log directory's last checkpoint, if one was written."""
    if log_dir is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        return None
    path = os.path.join(os.fspath(log_dir), "checkpoints", "last.pt")
    return path if os.path.isfile(path) else None
