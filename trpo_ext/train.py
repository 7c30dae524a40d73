"""``trpo_ext.train``: Trust Region Policy Optimization on gymnasium environments.

One iteration, in the order of the algorithm (Schulman et al. 2015; the seed chapter, section 3):

1. sample ``n_envs × n_steps`` transitions with π_θold (:mod:`trpo_ext.rollout`);
2. advantages A_t by GAE (``trpo_ext.gae``), standardised;
3. g = ∇θ L(θ) at θ_old, L the surrogate mean(π_θ(a|s) / π_θold(a|s) · A);
4. s ≈ (F + damping·I)⁻¹ g by ``cg_iters`` conjugate-gradient iterations, F·v the Hessian of the
   batch-mean KL(π_θold ‖ π_θ) at θ_old times v, in closed form Jᵀ M J v (the network linearised at
   θ_old, M the distribution's Fisher metric; equal to double backward, tested against
   ``torch.autograd.functional.hvp``);
5. β = sqrt(2δ / sᵀ(F + damping·I)s), sᵀ(F + damping·I)s read from the CG result;
6. backtracking line search θ = θ_old + α·β·s, α = backtrack_ratio^k: accept the first trial with a
   surrogate improvement > 0 and mean KL ≤ δ; if none, θ_old is kept bit for bit;
7. the value function is fitted to the GAE returns by minibatched Adam.

Steps 3–7 are :func:`trpo_update`, one function that reads top to bottom.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from . import _checks, distributed
from .cg import conjugate_gradient
from .config import TRPOConfig
from .gae import gae
from .envs import check_env_id, make_vector_env
from .vecenv import EnvFactory
from .policies import (Adam, Policy, RunningMeanStd, ValueFunction, fisher_product, linearize, space_spec,
                       surrogate_gradient)
from .rollout import RolloutCollector, _tree_map, flatten_time

__all__ = ["train", "TrainResult", "trpo_update", "HISTORY_KEYS", "RewardNormalizer"]

HISTORY_KEYS = (
    "time/iteration", "time/total_steps", "rollout/ep_return_mean", "rollout/ep_length_mean",
    "rollout/episodes", "train/kl", "train/kl_max_row", "train/surrogate_improvement",
    "train/expected_improvement", "train/line_search_steps", "train/line_search_success",
    "train/cg_residual", "train/cg_iterations", "train/entropy", "train/value_loss",
    "train/explained_variance", "time/fps", "time/elapsed_s", "time/sampling_s", "time/gae_s",
    "time/gradient_s", "time/cg_s", "time/line_search_s", "time/critic_s",
)

# Settings that fix the shapes of what a checkpoint stores: a resumed run cannot change them.
_STRUCTURAL = ("hidden_sizes", "normalize_obs", "normalize_value_targets")
DEFAULT_TOTAL_STEPS = 100_000


@dataclass
class TrainResult:
    policy: Policy
    value_fn: ValueFunction
    history: List[Dict[str, Any]] = field(default_factory=list)
    checkpoint_path: Optional[str] = None
    log_dir: Optional[str] = None


class RewardNormalizer(torch.nn.Module):
    """Rewards divided by the running standard deviation of the discounted return (the rule of
    SB3's VecNormalize): per environment R ← γR + r, reset to 0 after an episode's last step; the
    running variance of R over every step seen (float64); reward / sqrt(var + ε), clipped to ±clip.

    One batch at a time: :meth:`update` folds a rollout's returns into the statistics (the only
    state a data-parallel run must all-reduce is ``return_rms``), then :meth:`normalize` scales that
    rollout's rewards by them.
    """

    def __init__(self, n_envs: int, gamma: float, epsilon: float = 1e-8, clip: float = 10.0):
        super().__init__()
        self.gamma, self.epsilon, self.clip = gamma, epsilon, clip
        self.return_rms = RunningMeanStd(1, epsilon, clip)
        self.register_buffer("returns", torch.zeros(n_envs, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rewards: torch.Tensor, dones: torch.Tensor) -> None:
        """Fold ``rewards [T, N]`` (``dones [T, N]``: the episode ended at that step) in."""
        returns = self.returns
        discounted = torch.empty(rewards.shape, dtype=torch.float64, device=rewards.device)
        rewards64, keep = rewards.to(torch.float64), (~dones).to(torch.float64)
        for t in range(rewards.shape[0]):
            returns = returns * self.gamma + rewards64[t]
            discounted[t] = returns
            returns = returns * keep[t]
        self.returns.copy_(returns)
        self.return_rms.update(discounted.reshape(-1, 1))

    @torch.no_grad()
    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt(self.return_rms.var + self.epsilon)
        return (rewards.to(torch.float64) / scale).clamp_(-self.clip, self.clip).to(rewards.dtype)


# --- the update: steps 3 to 7 --------------------------------------------------------------------

def trpo_update(policy: Policy, value_fn: ValueFunction, vf_optimizer: Adam,
                obs, actions: torch.Tensor, advantages: torch.Tensor,
                returns: torch.Tensor, cfg: TRPOConfig, generator: Optional[torch.Generator]
                ) -> Dict[str, Any]:
    """One TRPO policy step and one value-function fit on a flattened batch.

    ``obs`` is the network input ``[B, ...]`` (or a dict of such tensors), ``actions [B, ...]``,
    ``advantages [B]`` (standardised), ``returns [B]``.  Returns the iteration's ``train/*``
    metrics as 0-d tensors or Python numbers, and the time split.  The only host synchronisations
    are the line-search decisions (one per trial).
    """
    clock = time.perf_counter
    t0 = clock()

    # 3. The policy gradient g of the surrogate at θ_old.  The network is linearised there once
    # (closed form for the built-in MLP, autograd otherwise); g and every Fisher-vector product
    # below are products with its Jacobian.
    old, lin = linearize(policy, obs)
    with torch.no_grad():
        logp_old = policy.log_prob(old, actions)
        g = surrogate_gradient(policy, lin, old, actions, logp_old, advantages)
        distributed.reduce_mean_(g)  # data-parallel: g of the whole batch
    # The surrogate at θ_old, the line search's reference (nothing here requires grad).
    surrogate_old = policy.surrogate_kl(old, old, actions, logp_old, advantages)[0]
    t1 = clock()

    # 4. The natural-gradient direction s ≈ (F + damping·I)⁻¹ g, F v = ∇²θ KL(π_old‖π_θ) v at
    # θ_old as Jᵀ M J v (M the distribution's Fisher metric).  sync=False: x and xAx stay on the
    # device; the CG's counters are read with the line search's first decision.
    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        # Data-parallel: each F v is the whole batch's, so every rank's CG is the same.
        return distributed.reduce_mean_(fisher_product(policy, lin, old, v))

    cg = conjugate_gradient(fisher_vector_product, g, maxiter=cfg.cg_iters, rtol=0.0, atol=0.0,
                            damping=cfg.cg_damping, sync=False)
    t2 = clock()

    # 5. Step size from the CG's sᵀ(F + damping·I)s: the full step β·s has ½ βsᵀ(F+damping·I)βs = δ.
    full_step, step_ok = _full_step(cg, cfg.max_kl)
    expected_full = torch.dot(g, full_step)

    # 6. Backtracking line search on the flat parameter buffer.
    search = _line_search(policy, obs, actions, logp_old, advantages, old, surrogate_old,
                          full_step, step_ok, cg, cfg)
    cg = search.cg
    t3 = clock()

    # 7. Value-function regression on the returns, minibatched Adam.  With target normalisation
    # the returns' scale σ is updated first (V's outputs preserved), and the network is fitted to
    # returns/σ.
    value_loss = _fit_value_function(value_fn, vf_optimizer, obs, returns, cfg, generator)
    # Data-parallel: the logged entropy of the whole batch (every rank fitted the whole critic).
    entropy = distributed.reduce_scalars([policy.entropy(old)], ("mean",))[0]
    t4 = clock()

    # Expected improvement gᵀ(α·β·s) of the step taken, or of the last one tried if none was.
    return {
        "train/kl": search.kl,
        "train/kl_max_row": search.kl_max_row,
        "train/surrogate_improvement": search.improvement,
        "train/expected_improvement": expected_full * search.alpha if search.trials
        else torch.zeros(()),
        "train/line_search_steps": search.trials,
        "train/line_search_success": search.accepted,
        "train/cg_residual": cg.residual_norm,
        "train/cg_iterations": cg.iterations,
        "train/entropy": entropy,
        # In return units whether or not the targets are normalised: σ² times the normalised loss.
        "train/value_loss": value_loss * value_fn.target_scale() ** 2,
        "time/gradient_s": t1 - t0,
        "time/cg_s": t2 - t1,
        "time/line_search_s": t3 - t2,
        "time/critic_s": t4 - t3,
    }


def _full_step(cg, max_kl: float):
    """``(β·s, ok)``: β = sqrt(2δ / sᵀ(F + damping·I)s) from the CG result, and whether that
    curvature is positive and finite (if not, the step is zero and the update is skipped).
    Device tensors, no host read."""
    sHs = cg.xAx
    ok = torch.isfinite(sHs) & (sHs > 0)
    beta = torch.sqrt(2.0 * max_kl / torch.where(ok, sHs, torch.ones_like(sHs)))
    return cg.x * torch.where(ok, beta, torch.zeros_like(beta)), ok


@dataclass
class _LineSearchResult:
    accepted: bool
    trials: int
    alpha: float
    kl: torch.Tensor
    kl_max_row: torch.Tensor
    improvement: torch.Tensor
    cg: Any


@torch.no_grad()
def _line_search(policy, obs, actions, logp_old, advantages, old, surrogate_old, full_step,
                 step_ok, cg, cfg) -> _LineSearchResult:
    """θ = θ_old + α·β·s for α = backtrack_ratio^k, k = 0, 1, …: the first trial with a
    surrogate improvement > 0 and mean KL ≤ δ is kept; if none is, θ_old is restored bit for bit.
    Each trial is one forward pass and one fused surrogate/KL op, and one host read of its
    decision (the first read also brings the CG's counters, which are returned with ``cg``)."""
    flat = policy.flat
    theta_old = flat.detach().clone()
    zero = torch.zeros((), device=flat.device)
    result = _LineSearchResult(False, 0, 0.0, zero, zero, zero, cg)
    cg_scalars, cg_values = cg.device_scalars(), None
    for k in range(cfg.line_search_steps):
        alpha = cfg.backtrack_ratio ** k
        torch.add(theta_old, full_step, alpha=alpha, out=flat)
        trial = policy.distribution_params(obs)
        surrogate, kl, kl_max_row = policy.surrogate_kl(old, trial, actions, logp_old, advantages)
        improvement = surrogate - surrogate_old
        # Data-parallel: the whole batch's improvement and KL, so every rank decides alike.
        improvement, kl, kl_max_row = distributed.reduce_scalars([improvement, kl, kl_max_row],
                                                                 ("mean", "mean", "max"))
        accept = step_ok & (kl <= cfg.max_kl) & (improvement > 0)
        decision = torch.stack([step_ok, accept]).to(cg_scalars.dtype)
        if cg_values is None:
            values = torch.cat([decision, cg_scalars]).tolist()
            cg_values = values[2:]
        else:
            values = decision.tolist()
        if not values[0]:  # sᵀ(F+damping)s not positive and finite: no update
            break
        result.trials, result.alpha = k + 1, alpha
        if values[1]:
            result.accepted, result.kl, result.kl_max_row = True, kl, kl_max_row
            result.improvement = improvement
            break
    if not result.accepted:
        flat.copy_(theta_old)  # θ_old restored bit for bit
    if cg_values is None:
        cg_values = cg_scalars.tolist()
    result.cg = cg.with_scalars(cg_values)
    return result


def _fit_value_function(value_fn, optimizer, obs, returns, cfg, generator) -> torch.Tensor:
    """``vf_epochs`` passes of minibatched Adam over the batch; returns the mean loss (0-d, on the
    network's scale).  Every epoch's shuffle is drawn up front on the CPU generator; on CUDA it is
    copied in one asynchronous transfer from pinned memory.  Data-parallel: the ranks' rows are
    gathered once and every rank runs this one-process fit of the whole batch, identically — one
    collective per input in place of an all-reduce per minibatch, whose latency outweighs a small
    critic's arithmetic."""
    targets = value_fn.update_target_statistics(returns)
    n_local = returns.shape[0] // cfg.n_steps
    obs = _tree_map(lambda x: distributed.gather_rows(x, n_local), obs)
    targets = distributed.gather_rows(targets, n_local)
    batch_size = targets.shape[0]
    loss_sum = torch.zeros((), device=returns.device)
    n_minibatches = 0
    grad = torch.empty_like(value_fn.flat)
    orders = torch.stack([torch.randperm(batch_size, generator=generator, device="cpu")
                          for _ in range(cfg.vf_epochs)]) if cfg.vf_epochs else \
        torch.empty(0, batch_size, dtype=torch.long)
    if returns.device.type != "cpu":
        orders = orders.pin_memory().to(returns.device, non_blocking=True)
    for order in orders:
        # One gather per epoch; the minibatches are then slices (the same rows as obs[idx]).
        obs_epoch = _tree_map(lambda x: x[order], obs)
        targets_epoch = targets[order]
        for start in range(0, batch_size, cfg.vf_minibatch_size):
            end = min(start + cfg.vf_minibatch_size, batch_size)
            loss_sum += value_fn.regression_gradient(_tree_map(lambda x: x[start:end], obs_epoch),
                                                     targets_epoch[start:end], grad)
            optimizer.step(grad)
            n_minibatches += 1
    return loss_sum / max(n_minibatches, 1)


# --- settings ------------------------------------------------------------------------------------

def _make_config(settings: Dict[str, Any]) -> TRPOConfig:
    valid = [f.name for f in dataclasses.fields(TRPOConfig)]
    unknown = [k for k in settings if k not in valid]
    if unknown:
        raise TypeError(f"train() got unknown setting(s) {unknown}; valid settings: {valid}")
    cfg = TRPOConfig(**settings)
    _validate(cfg)
    return cfg


# torch.set_num_threads of tens of thousands makes the OpenMP runtime fail to create them, and
# the process crash; no machine has more than a few hundred cores.
_MAX_NUM_THREADS = 1024
# Beyond e^±20 the Gaussian's float32 densities under- or overflow and no step is ever accepted.
_MAX_ABS_INIT_LOG_STD = 20


def _validate(cfg: TRPOConfig) -> None:
    _checks.require_int(cfg.n_envs, "n_envs", 1)
    _checks.require_int(cfg.n_steps, "n_steps", 1)
    _checks.require_positive(cfg.max_kl, "max_kl")
    _checks.require_int(cfg.cg_iters, "cg_iters", 1)
    _checks.require_nonnegative(cfg.cg_damping, "cg_damping")
    _checks.require_int(cfg.line_search_steps, "line_search_steps", 1)
    ratio = _checks.require_positive(cfg.backtrack_ratio, "backtrack_ratio")
    if ratio >= 1.0:
        raise ValueError(f"backtrack_ratio must be in (0, 1), got {ratio}")
    _checks.require_unit_interval(cfg.gamma, "gamma")
    _checks.require_unit_interval(cfg.gae_lambda, "gae_lambda")
    hs = cfg.hidden_sizes
    if (not isinstance(hs, (tuple, list)) or not all(
            isinstance(h, numbers.Integral) and not isinstance(h, (bool, np.bool_)) and h > 0
            for h in hs)):
        raise ValueError(f"hidden_sizes must be a sequence of positive ints, got {hs!r}")
    cfg.hidden_sizes = tuple(int(h) for h in hs)
    if cfg.init_log_std is not None:
        if isinstance(cfg.init_log_std, (bool, np.bool_)) or not isinstance(
                cfg.init_log_std, numbers.Real) or not math.isfinite(cfg.init_log_std):
            raise ValueError(f"init_log_std must be a finite number or None, got "
                             f"{cfg.init_log_std!r}")
        cfg.init_log_std = float(cfg.init_log_std)
        if abs(cfg.init_log_std) > _MAX_ABS_INIT_LOG_STD:
            raise ValueError(f"init_log_std must be in [-{_MAX_ABS_INIT_LOG_STD}, "
                             f"{_MAX_ABS_INIT_LOG_STD}] (a standard deviation of e^±"
                             f"{_MAX_ABS_INIT_LOG_STD}), got {cfg.init_log_std}")
    if cfg.env_kwargs is not None:
        if not isinstance(cfg.env_kwargs, dict) or not all(isinstance(k, str)
                                                           for k in cfg.env_kwargs):
            raise TypeError(f"env_kwargs must be a dict of gymnasium.make's keyword arguments "
                            f"(str keys) or None, got {cfg.env_kwargs!r}")
        try:  # config.json and the records hold it
            json.dumps(cfg.env_kwargs)
        except (TypeError, ValueError):
            raise ValueError(f"env_kwargs must hold JSON values (numbers, strings, bools, lists, "
                             f"dicts), got {cfg.env_kwargs!r}") from None
        cfg.env_kwargs = dict(cfg.env_kwargs)
    _checks.require_positive(cfg.vf_lr, "vf_lr")
    _checks.require_int(cfg.vf_epochs, "vf_epochs", 0)
    _checks.require_int(cfg.vf_minibatch_size, "vf_minibatch_size", 1)
    _checks.require_int(cfg.num_threads, "num_threads", 0, _MAX_NUM_THREADS)
    _checks.require_int(cfg.checkpoint_every, "checkpoint_every", 0)
    _checks.require_int(cfg.env_workers, "env_workers", -1)
    if cfg.env_workers != 0:
        # Retired: torchrun's ranks step any environment on more cores (and share the update),
        # EnvPool steps its tasks faster; the workers' batches were those of one process anyway.
        warnings.warn(f"env_workers={cfg.env_workers} is retired and ignored: the environments "
                      f"step in this process, with the same results. For more cores run "
                      f"data-parallel under torchrun (any environment) or use "
                      f"vector_env='envpool' (EnvPool's tasks)", FutureWarning, stacklevel=3)
    if cfg.distributed not in distributed.MODES:
        raise ValueError(f"distributed must be one of {distributed.MODES}, got {cfg.distributed!r}")
    for name in ("async_envs", "normalize_obs", "normalize_advantages", "normalize_rewards",
                 "normalize_value_targets", "progress"):
        value = getattr(cfg, name)
        if isinstance(value, np.bool_):  # a NumPy bool is a bool here
            value = bool(value)
            setattr(cfg, name, value)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {cfg.device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {cfg.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch sees no CUDA device")
    if cfg.log_dir is not None and not isinstance(cfg.log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path or None, got {type(cfg.log_dir).__name__}")
    if cfg.resume is not None:
        if not isinstance(cfg.resume, (str, os.PathLike)):
            raise TypeError(f"resume must be a checkpoint path or None, got "
                            f"{type(cfg.resume).__name__}")
        path = os.fspath(cfg.resume)
        in_run_dir = os.path.join(path, "checkpoints", "last.pt")
        if os.path.isdir(path) and os.path.isfile(in_run_dir):  # a run directory, as the CLI takes
            cfg.resume = in_run_dir
        elif not os.path.isfile(path):
            raise ValueError(f"resume: checkpoint {path!r} does not exist")


def _rng_state(generator: torch.Generator) -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def _restore_rng(state: Dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _float(x) -> Any:
    return float(x) if isinstance(x, torch.Tensor) else x


# --- the driver ----------------------------------------------------------------------------------

def train(env: Union[str, Callable[[], Any], None] = None, total_steps: Optional[int] = None, *,
          seed: Optional[int] = None,
          callback: Optional[Callable[[Dict[str, Any]], Optional[bool]]] = None,
          policy_net: Optional[torch.nn.Module] = None, value_net: Optional[torch.nn.Module] = None,
          **settings: Any) -> TrainResult:
    """Train a TRPO policy on a gymnasium environment.

    Args:
        env: a gymnasium id or a callable returning a gymnasium Env (default ``"CartPole-v1"``, or
            the checkpoint's environment when resuming).  Observations: Box (flat, or a 3-D uint8
            image), Discrete, MultiDiscrete, MultiBinary, or a Dict of those; actions: Box,
            Discrete, MultiDiscrete or MultiBinary.
        policy_net: your own network (any ``nn.Module``, trained in place) from a batch of
            observations to the action distribution's parameters: Box(A) → means ``[B, A]``
            (trpo_ext owns the state-independent log-std, initialised to ``init_log_std``);
            Discrete(n) → logits ``[B, n]``; MultiDiscrete(nvec) → the sub-spaces' logits side by
            side ``[B, sum(nvec)]``; MultiBinary(n) → logits ``[B, n]``.  Observations reach it as
            a float32 tensor ``[B, *shape]`` — flat Box and MultiBinary observations flattened to
            ``[B, D]`` and, with ``normalize_obs``, standardised by running mean and variance and
            clipped to ±10; Discrete ones one-hot ``[B, n]``, MultiDiscrete ones their elements'
            one-hots side by side ``[B, sum(nvec)]`` (both standardised likewise); images (3-D
            uint8 Box) as float32 in [0, 1], channels first ``[B, C, H, W]``, not standardised —
            or, for a Dict space, a dict of such tensors keyed like the space.  None: the built-in
            network (a tanh MLP of ``hidden_sizes``; a Nature-DQN CNN for images, one extractor
            per key for a Dict, each followed by that MLP).  Its g and Fisher-vector products come
            from autograd (the built-in MLP has a closed-form fast path).
        value_net: likewise for the critic: the same inputs → values ``[B]`` or ``[B, 1]``.
            With ``normalize_value_targets`` it is fitted to returns / σ and V = σ·value_net(s);
            its last parameters must then be its output layer's weight and bias, which are
            rescaled whenever σ changes.
        total_steps: environment steps for the whole run (counting a resumed run's earlier steps);
            training stops at the first iteration boundary at or past it.  Default 100,000, or,
            when resuming, the checkpoint's run's own total.
        seed: seeds the built-in networks' initialisation, the sampling and the environments.  The
            same seed on CPU gives the same history.  Your own networks arrive initialised: for a
            reproducible run, seed torch before building them.  Default 0, or, when resuming, the
            checkpoint's.
        callback: called after each iteration with its history entry; returning ``False`` stops.
        **settings: fields of :class:`trpo_ext.config.TRPOConfig` (documented there with their
            defaults; ``trpo-ext train --help`` lists them).

    Returns:
        :class:`TrainResult` with ``policy``, ``value_fn``, ``history`` (one dict per iteration with
        the keys :data:`HISTORY_KEYS`), ``checkpoint_path`` and ``log_dir``.

    Resuming (``resume=path``): parameters, optimiser, normaliser, generators, step counter and
    history come back bit for bit; the checkpoint's run (its total steps, seed and settings)
    continues, and ``total_steps``, ``seed`` and settings passed explicitly override it (except
    ``hidden_sizes``, ``normalize_obs`` and ``normalize_value_targets``, which must match).  A
    checkpoint from before checkpoints recorded the total takes it from its run's ``config.json``
    (with a warning), else asks for ``total_steps``.  The environments' own state is not in a
    checkpoint: they start fresh episodes, seeded from the seed and the iteration, so a resumed run
    matches an uninterrupted one in distribution, not step for step; two resumes of one checkpoint
    give the same run (bit for bit on CPU).  With a ``log_dir``, ``progress.csv`` is rewritten from
    the checkpoint's history, so rows written after the checkpoint by a run that was stopped (even
    mid-row) are dropped and every iteration appears once, in order.

    Invalid settings, an unknown env id or unsupported spaces raise before any training.  torch's
    global settings are left as found (the thread count is set only while training runs, and
    restored).  On CUDA the ``time/*`` split is host time: the update does not synchronise to
    measure it.
    """
    if settings.get("resume") is None:  # torchrun --max-restarts: a restart continues the run
        restart = distributed.restart_checkpoint(settings.get("log_dir"))
        settings = {**settings, "resume": restart} if restart else settings
    cfg = _make_config(settings)
    for name, net in (("policy_net", policy_net), ("value_net", value_net)):
        if net is not None and not isinstance(net, torch.nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module or None, got {type(net).__name__}")
    if total_steps is not None:
        total_steps = _checks.require_int(total_steps, "total_steps", 1)
    if seed is not None:
        seed = _checks.require_seed(seed)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    ckpt = None
    if cfg.resume is not None:
        from .checkpoint import load_checkpoint, reading, run_total_steps

        ckpt = load_checkpoint(cfg.resume)
        with reading(cfg.resume):
            saved = dict(ckpt["config"])
            saved["hidden_sizes"] = tuple(saved["hidden_sizes"])
        # Checkpoints from before the setting existed were trained without target normalisation.
        saved.setdefault("normalize_value_targets", False)
        for name in _STRUCTURAL:
            if name in settings and tuple(np.atleast_1d(settings[name])) != \
                    tuple(np.atleast_1d(saved[name])):
                raise ValueError(f"resume: {name}={settings[name]!r} differs from the checkpoint's "
                                 f"{saved[name]!r}")
        merged = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cfg)}}
        merged.update(settings)
        cfg = _make_config(merged)
        if env is None:
            env = ckpt["env_id"]
            if env is None:
                raise ValueError("resume: the checkpoint was trained on a callable env; pass env=")
        with reading(cfg.resume):
            if seed is None:
                seed = _checks.require_seed(ckpt["seed"])
        if total_steps is None:
            total_steps = run_total_steps(ckpt, cfg.resume)
    env = "CartPole-v1" if env is None else env
    total_steps = DEFAULT_TOTAL_STEPS if total_steps is None else total_steps
    seed = 0 if seed is None else seed
    env_id = check_env_id(env)
    if cfg.env_kwargs:
        env = EnvFactory(env, cfg.env_kwargs)  # refuses a callable env, before any work
    if ckpt is not None and env_id is not None and ckpt["env_id"] not in (None, env_id):
        raise ValueError(f"resume: env {env_id!r} differs from the checkpoint's {ckpt['env_id']!r}")

    # Data-parallel under torchrun: rank 0 alone writes in log_dir.
    with _checks.torch_threads(cfg.num_threads), distributed.running(
            cfg.distributed, torch.device(cfg.device), cfg.n_envs) as (world, device):
        if world.rank == 0:
            _check_log_dir(cfg.log_dir, cfg.resume)
        return _train(cfg, env, env_id, total_steps, seed, callback, ckpt, world, device,
                      policy_net, value_net)


@contextlib.contextmanager
def _closing_on_error(envs):
    """Closes the environments when the block raises."""
    try:
        yield
    except BaseException:
        envs.close()
        raise


def _check_log_dir(log_dir, resume) -> None:
    """Refuse, before any work, a log_dir that could not take the run's files, and, for a new run
    (not a resume), one that holds another run's checkpoints: the new run would overwrite some of
    them and leave the others, two runs mixed."""
    if log_dir is None:
        return
    path = os.fspath(log_dir)
    if not path:
        raise ValueError("log_dir must be a directory path or None, got ''")
    checkpoints = os.path.join(path, "checkpoints")
    for p, what in ((path, "log_dir"), (checkpoints, "its checkpoints/")):
        if os.path.exists(p) and not os.path.isdir(p):
            raise ValueError(f"log_dir: {what} {p!r} exists and is not a directory")
    if resume is None and os.path.isdir(checkpoints):
        existing = sorted(f for f in os.listdir(checkpoints) if f.endswith(".pt"))
        if existing:
            raise ValueError(
                f"log_dir {path!r} holds the checkpoints of another run ({', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}), which a new run there would overwrite: "
                f"continue that run with resume={os.path.join(checkpoints, 'last.pt')!r}, or "
                f"choose another log_dir")
    try:
        os.makedirs(checkpoints, exist_ok=True)
    except OSError as e:
        raise ValueError(f"log_dir {path!r} cannot be created: {e}") from None
    if not os.access(checkpoints, os.W_OK):
        raise ValueError(f"log_dir {path!r} is not writable")


@dataclass
class _Run:
    """What one run carries from iteration to iteration (and what a checkpoint restores)."""
    policy: Policy
    value_fn: ValueFunction
    optimizer: Adam
    generator: torch.Generator       # sampling, on the update's device
    cpu_generator: torch.Generator   # the critic's shuffles (the same as generator on the CPU)
    reward_normalizer: Optional[RewardNormalizer] = None  # with normalize_rewards
    history: List[Dict[str, Any]] = field(default_factory=list)
    steps_done: int = 0
    iteration: int = 0


def _train(cfg: TRPOConfig, env, env_id, total_steps, seed, callback, ckpt, world, device,
           policy_net=None, value_net=None) -> TrainResult:
    shard = distributed.shard(cfg.n_envs)  # data-parallel: this rank's environments
    n_local = shard.stop - shard.start
    engine = "async" if cfg.async_envs and cfg.vector_env == "sync" else cfg.vector_env
    if cfg.async_envs and engine != "async":
        raise ValueError(f"async_envs=True (an alias of vector_env='async') contradicts "
                         f"vector_env={cfg.vector_env!r}: set only vector_env")
    _checks.require_int(cfg.env_threads, "env_threads", 0)
    envs = make_vector_env(env, n_local, engine, cfg.env_threads or None)
    with _closing_on_error(envs):
        spec = space_spec(envs.single_observation_space, envs.single_action_space)
        policy, value_fn = _build_networks(cfg, spec, envs, env_id, seed, ckpt, policy_net,
                                           value_net, device)
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        run = _Run(policy, value_fn,
                   Adam(value_fn.flat, lr=cfg.vf_lr), generator,
                   generator if device.type == "cpu" else torch.Generator().manual_seed(seed + 2),
                   RewardNormalizer(n_local, cfg.gamma).to(device) if cfg.normalize_rewards
                   else None)
        episodes = _restore(run, ckpt, cfg.resume) if ckpt is not None else None
    # Data-parallel: a restart on several machines needs the checkpoint on each.
    distributed.check_same(run.steps_done, "the step to resume from (is log_dir on a file system "
                                           "that every machine shares?)")
    # Environments cannot be restored mid-episode: a resumed run starts fresh episodes, seeded by
    # position.
    collector = RolloutCollector(envs, policy, cfg.n_steps, seed + 7919 * run.iteration, device,
                                 shard)
    if episodes is not None:
        collector.episode_returns.extend(episodes[0])
        collector.episode_lengths.extend(episodes[1])
        collector.episodes = episodes[2]

    logger = None
    if world.rank == 0 and (cfg.log_dir is not None or cfg.progress):
        from .logger import RunLogger  # imported only when asked for: it pulls logging libraries

        # env_id and seed let `trpo-ext plot` group the runs of one task across seeds.
        run_config = {**_config_dict(cfg), "env_id": env_id, "seed": seed, "total_steps": total_steps}
        logger = RunLogger(cfg.log_dir, cfg.progress, total_steps, run_config,
                           start_steps=run.steps_done, resumed=ckpt is not None,
                           history=run.history if ckpt is not None else None)
    checkpoint_path = None
    samples = cfg.n_envs * cfg.n_steps
    local_samples = n_local * cfg.n_steps  # data-parallel: this rank's share
    start_time = time.perf_counter()
    elapsed_before = float(run.history[-1]["time/elapsed_s"]) if run.history else 0.0
    try:
        while run.steps_done < total_steps:
            run.iteration += 1
            t0 = time.perf_counter()
            # 1. Sample with π_θold.
            batch = collector.collect(policy, value_fn, run.generator)
            t1 = time.perf_counter()
            # 2. Advantages by GAE.
            advantages, returns = _advantages(batch, cfg, run.reward_normalizer)
            t2 = time.perf_counter()
            # 3–7. The policy step and the value fit.
            metrics = trpo_update(policy, value_fn, run.optimizer,
                                  flatten_time(batch.obs, local_samples),
                                  flatten_time(batch.actions, local_samples), advantages, returns,
                                  cfg, run.cpu_generator)
            # Then the normaliser takes in this batch; the next rollout sees the new statistics.
            policy.encoder.update(batch.raw_features)
            run.steps_done += samples
            t3 = time.perf_counter()
            metrics.update({"time/fps": samples / max(t3 - t0, 1e-9), "time/sampling_s": t1 - t0,
                            "time/gae_s": t2 - t1,
                            "time/elapsed_s": elapsed_before + time.perf_counter() - start_time})
            entry = _history_entry(run, metrics, returns, batch.values.reshape(-1), collector)
            run.history.append(entry)
            if logger is not None:
                logger.log(entry)
            stop = callback is not None and callback(entry) is False
            if callback is not None:
                stop = distributed.any_rank(stop)  # data-parallel: one rank's stop stops all
            last = stop or run.steps_done >= total_steps
            if cfg.log_dir is not None and (last or (cfg.checkpoint_every and
                                                     run.iteration % cfg.checkpoint_every == 0)):
                # Data-parallel: rank 0 writes, every rank returns the path.
                checkpoint_path = _write_checkpoint(
                    cfg.log_dir, run.steps_done,
                    _checkpoint_state(run, collector, cfg, env_id, seed, spec, total_steps)
                    if world.rank == 0 else None)
            if stop:
                break
    finally:
        collector.close()
        if logger is not None:
            logger.close()
    policy.eval()
    return TrainResult(policy=policy, value_fn=value_fn, history=run.history,
                       checkpoint_path=checkpoint_path,
                       log_dir=os.fspath(cfg.log_dir) if cfg.log_dir is not None else None)


def _build_networks(cfg, spec, envs, env_id, seed, ckpt, policy_net, value_net, device):
    """The policy and the critic (the caller's networks or the built-in ones) on the run's device,
    checked against the environment and, when resuming, against the checkpoint."""
    if ckpt is not None:
        saved = ckpt.get("policy_spec")
        saved = saved if isinstance(saved, dict) else {}
        differ = [f"{k} {spec.get(k)} vs {saved.get(k)}"
                  for k in ("obs_kind", "obs_dim", "obs_nvec", "obs_keys", "action_kind",
                            "action_dim", "action_nvec")
                  if saved.get(k) != spec.get(k)]
        if differ:
            spaces = f"{envs.single_observation_space}, {envs.single_action_space}"
            raise ValueError(f"resume: the environment's spaces ({spaces}) are not those the "
                             f"checkpoint was trained on ({', '.join(differ)})")
        if bool(ckpt.get("custom_networks")) != (policy_net is not None):
            raise ValueError("resume: the checkpoint was trained with your own policy_net and "
                             "value_net; pass them again" if ckpt.get("custom_networks") else
                             "resume: the checkpoint was trained with the built-in networks; "
                             "do not pass policy_net / value_net")
    init_gen = torch.Generator().manual_seed(seed)
    policy = Policy(spec, cfg.hidden_sizes, cfg.init_log_std, cfg.normalize_obs, init_gen,
                    env_id=env_id, net=policy_net, env_kwargs=cfg.env_kwargs).to(device)
    value_fn = ValueFunction(spec, cfg.hidden_sizes, init_gen,
                             normalize_targets=cfg.normalize_value_targets,
                             net=value_net).to(device)
    if {id(p) for p in policy.net.parameters()} & {id(p) for p in value_fn.net.parameters()}:
        raise ValueError("policy_net and value_net share parameters; TRPO updates the policy "
                         "and fits the critic separately: give each its own network")
    _check_network_outputs(policy, value_fn, envs.single_observation_space)
    return policy, value_fn


def _restore(run: _Run, ckpt: Dict[str, Any], path) -> Tuple[List[float], List[int], int]:
    """Loads a checkpoint into ``run`` bit for bit; returns the collector's episode statistics
    (recent returns, recent lengths, episode count)."""
    from .checkpoint import reading, upgrade_state

    with reading(path):
        run.policy.load_state_dict(upgrade_state(ckpt["policy_state"], run.policy))
        run.value_fn.load_state_dict(upgrade_state(ckpt["value_state"], run.value_fn))
        run.optimizer.load_state_dict(ckpt["optimizer_state"])
        _restore_rng(ckpt["rng"], run.cpu_generator)
        if run.generator is not run.cpu_generator and "device_generator" in ckpt["rng"]:
            run.generator.set_state(ckpt["rng"]["device_generator"])
        if run.reward_normalizer is not None and "reward_normalizer" in ckpt:
            run.reward_normalizer.load_state_dict(ckpt["reward_normalizer"])
            run.reward_normalizer.returns.zero_()  # the environments start fresh episodes
        run.history = list(ckpt["history"])
        for entry in run.history:
            float(entry["time/elapsed_s"])  # what the resumed run reads of its history
        run.steps_done = _checks.require_int(ckpt["total_steps_done"], "total_steps_done", 0)
        run.iteration = _checks.require_int(ckpt["iteration"], "iteration", 0)
        return ([float(x) for x in ckpt.get("episode_returns", [])],
                [int(x) for x in ckpt.get("episode_lengths", [])],
                _checks.require_int(ckpt.get("episodes", 0), "episodes", 0))


def _checkpoint_state(run: _Run, collector, cfg, env_id, seed, spec, total_steps
                      ) -> Dict[str, Any]:
    """Everything that defines the run and where it stands, as a checkpoint stores it."""
    rng = _rng_state(run.cpu_generator)
    if run.generator is not run.cpu_generator:
        rng["device_generator"] = run.generator.get_state()
    state = {
        "env_id": env_id, "config": _config_dict(cfg), "seed": seed, "policy_spec": spec,
        "custom_networks": run.policy.custom_net, "total_steps": total_steps,
        "policy_state": {k: v.detach().cpu() for k, v in run.policy.state_dict().items()},
        "value_state": {k: v.detach().cpu() for k, v in run.value_fn.state_dict().items()},
        "optimizer_state": run.optimizer.state_dict(),
        "total_steps_done": run.steps_done, "iteration": run.iteration, "history": run.history,
        "episodes": collector.episodes,
        "episode_returns": list(collector.episode_returns),
        "episode_lengths": list(collector.episode_lengths), "rng": rng,
    }
    if run.reward_normalizer is not None:
        state["reward_normalizer"] = {k: v.detach().cpu()
                                      for k, v in run.reward_normalizer.state_dict().items()}
    return state


def _write_checkpoint(log_dir, steps_done: int, state: Optional[Dict[str, Any]]) -> str:
    """Writes ``state`` (None: nothing, the path only) as the step's and the last checkpoint."""
    from .checkpoint import save_checkpoint

    directory = os.path.join(os.fspath(log_dir), "checkpoints")
    path = os.path.join(directory, f"step_{steps_done:09d}.pt")
    if state is not None:
        save_checkpoint(state, [path, os.path.join(directory, "last.pt")])
    return path


def _advantages(batch, cfg: TRPOConfig, reward_normalizer=None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (standardised with ``normalize_advantages``; a zero spread leaves them
    centred, not NaN) and returns, flattened to ``[T·N]``.  With a reward normaliser the rewards
    are scaled first; the episodes' logged returns stay raw."""
    rewards = batch.rewards
    if reward_normalizer is not None:
        reward_normalizer.update(rewards, batch.done)
        rewards = reward_normalizer.normalize(rewards)
    advantages, returns = gae(rewards, batch.values, batch.next_values, batch.terminated,
                              batch.done, cfg.gamma, cfg.gae_lambda)
    advantages = advantages.reshape(-1)
    if cfg.normalize_advantages:
        # Data-parallel: the whole batch's mean and spread.
        _, mean, var = distributed.moments(advantages)
        std = advantages.std(unbiased=False) if distributed.world().size == 1 else var.sqrt()
        advantages = (advantages - mean) / (std + 1e-8)
    return advantages, returns.reshape(-1)


def _history_entry(run: _Run, metrics: Dict[str, Any], returns: torch.Tensor,
                   values: torch.Tensor, collector) -> Dict[str, Any]:
    """One iteration's history entry (plain Python numbers): the update's metrics read from the
    device in one transfer, the episode statistics, the time split."""
    # Data-parallel: the variances of the whole batch.
    _, _, (var_returns, var_residual) = distributed.moments(torch.stack([returns, returns - values],
                                                                        1))
    explained_variance = torch.where(var_returns > 0, 1 - var_residual / var_returns,
                                     torch.full_like(var_returns, float("nan")))
    names = ("train/kl", "train/kl_max_row", "train/surrogate_improvement",
             "train/expected_improvement", "train/entropy", "train/value_loss")
    scalars = [metrics[k] for k in names] + [explained_variance]
    values_read = torch.stack([x.to(device=returns.device, dtype=torch.float32).reshape(())
                               for x in scalars]).tolist()
    read = dict(zip(names + ("train/explained_variance",), values_read))
    recent_returns, recent_lengths = collector.episode_returns, collector.episode_lengths
    entry = {
        "time/iteration": run.iteration,
        "time/total_steps": run.steps_done,
        "rollout/ep_return_mean": float(np.mean(recent_returns)) if recent_returns
        else float("nan"),
        "rollout/ep_length_mean": float(np.mean(recent_lengths)) if recent_lengths
        else float("nan"),
        "rollout/episodes": collector.episodes,
        **read,
        "train/line_search_steps": int(metrics["train/line_search_steps"]),
        "train/line_search_success": bool(metrics["train/line_search_success"]),
        "train/cg_residual": float(_float(metrics["train/cg_residual"])),
        "train/cg_iterations": int(_float(metrics["train/cg_iterations"])),
    }
    entry.update({k: metrics[k] for k in HISTORY_KEYS if k.startswith("time/") and k in metrics})
    return {k: entry[k] for k in HISTORY_KEYS}


def _check_network_outputs(policy: Policy, value_fn: ValueFunction, observation_space) -> None:
    """Runs both networks on two sample observations and refuses wrong output shapes, before any
    training, with the shape that was expected."""
    obs = [observation_space.sample() for _ in range(2)]
    obs = ({k: np.stack([o[k] for o in obs]) for k in obs[0]} if isinstance(obs[0], dict)
           else np.stack(obs))
    with torch.no_grad():
        x = policy.normalize(policy.encode_obs(obs))
        try:
            out = policy.net(x)
            values = value_fn.net(x)
        except Exception as e:  # noqa: BLE001 — a user network can fail in any way
            raise ValueError(f"the networks failed on a batch of 2 observations "
                             f"({_describe(x)}): {type(e).__name__}: {e}") from e
    want = (2, policy.dist.out_dim)
    what = {"box": "the Gaussian's means", "discrete": "the logits",
            "multi_discrete": "the sub-spaces' logits side by side",
            "multi_binary": "the Bernoulli logits"}[policy.spec["action_kind"]]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"policy_net must map a batch of B observations to {what}, shape "
                         f"[B, {want[1]}]; on B = 2 it returned {got}")
    if not isinstance(values, torch.Tensor) or tuple(values.shape) not in ((2,), (2, 1)):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"value_net must map a batch of B observations to values of shape [B] "
                         f"or [B, 1]; on B = 2 it returned {got}")


def _describe(x) -> str:
    if isinstance(x, dict):
        return "a dict: " + ", ".join(f"{k}: {list(v.shape)}" for k, v in x.items())
    return f"a tensor of shape {list(x.shape)}"


def _config_dict(cfg: TRPOConfig) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["hidden_sizes"] = list(cfg.hidden_sizes)
    for k in ("log_dir", "resume"):
        if d[k] is not None:
            d[k] = os.fspath(d[k])
    return d
