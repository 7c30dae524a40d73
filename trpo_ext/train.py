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
import math
import numbers
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from . import _checks
from .cg import conjugate_gradient
from .config import TRPOConfig
from .gae import gae
from .policies import Adam, Policy, RunningMeanStd, ValueFunction, space_spec
from .rollout import RolloutCollector, check_env_id, env_factory, make_vector_env
from .vecenv import choose_workers

__all__ = ["train", "TrainResult", "trpo_update", "HISTORY_KEYS", "RewardNormalizer"]

HISTORY_KEYS = (
    "time/iteration", "time/total_steps", "rollout/ep_return_mean", "rollout/ep_length_mean",
    "rollout/episodes", "train/kl", "train/max_kl", "train/surrogate_improvement",
    "train/expected_improvement", "train/line_search_steps", "train/line_search_success",
    "train/cg_residual", "train/cg_iterations", "train/entropy", "train/value_loss",
    "train/explained_variance", "time/fps", "time/elapsed_s", "time/sampling_s", "time/gae_s",
    "time/gradient_s", "time/cg_s", "time/line_search_s", "time/critic_s",
)

# Settings that fix the shapes of what a checkpoint stores: a resumed run cannot change them.
_STRUCTURAL = ("hidden_sizes", "normalize_obs", "normalize_value_targets")


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
                obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
                returns: torch.Tensor, cfg: TRPOConfig, generator: Optional[torch.Generator]
                ) -> Dict[str, Any]:
    """One TRPO policy step and one value-function fit on a flattened batch.

    ``obs [B, obs_dim]`` (normalised), ``actions [B, A]`` or ``[B]``, ``advantages [B]``
    (standardised), ``returns [B]``.  Returns the iteration's ``train/*`` metrics as 0-d tensors or
    Python numbers, and the time split.  The only host synchronisations are the line-search
    decisions (one per trial).
    """
    clock = time.perf_counter
    t0 = clock()
    flat = policy.flat

    # 3. The policy gradient g of the surrogate at θ_old.  The network is linearised there once:
    # its layer inputs serve g (one backward pass, Jᵀ) and every Fisher-vector product below.
    old, lin = policy.linearize(obs)
    with torch.no_grad():
        logp_old = policy.log_prob(old, actions)
        g = policy.surrogate_gradient(lin, old, actions, logp_old, advantages)
    # The surrogate at θ_old (the line search's reference); nothing here requires grad.
    surrogate_old, _, _ = policy.surrogate_kl(old, old, actions, logp_old, advantages)
    t1 = clock()

    # 4. The natural-gradient direction s ≈ (F + damping·I)⁻¹ g.  F v = ∇²θ KL(π_old‖π_θ) v at θ_old
    # in closed form, Jᵀ M J v: J v by one forward-mode pass through the linearised network, M the
    # distribution's Fisher metric (a fused op), Jᵀ by one backward pass; no autograd graph.
    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return policy.fisher_vector_product(lin, old, v)

    # sync=False: x and xAx stay on the device; the CG's counters are read after the line search,
    # whose decisions are the update's only host synchronisations.
    cg = conjugate_gradient(fisher_vector_product, g, maxiter=cfg.cg_iters, rtol=0.0, atol=0.0,
                            damping=cfg.cg_damping, sync=False)
    s = cg.x
    del lin  # its activations are not needed past the solve
    t2 = clock()

    # 5. Step size from the CG's sᵀ(F + damping·I)s: the full step β·s has ½ βsᵀ(F+damping·I)βs = δ.
    sHs = cg.xAx
    step_ok = torch.isfinite(sHs) & (sHs > 0)
    beta = torch.sqrt(2.0 * cfg.max_kl / torch.where(step_ok, sHs, torch.ones_like(sHs)))
    full_step = s * torch.where(step_ok, beta, torch.zeros_like(beta))
    expected_full = torch.dot(g, full_step)

    # 6. Backtracking line search, written straight into the flat parameter buffer.
    theta_old = flat.detach().clone()
    accepted, trials, alpha = False, 0, 0.0
    kl_after = kl_max_after = improvement = torch.zeros((), device=flat.device)
    cg_scalars, cg_values = cg.device_scalars(), None
    with torch.no_grad():
        for k in range(cfg.line_search_steps):
            alpha = cfg.backtrack_ratio ** k
            torch.add(theta_old, full_step, alpha=alpha, out=flat)
            trial = policy.distribution_params(obs)
            surrogate, kl, kl_max = policy.surrogate_kl(old, trial, actions, logp_old, advantages)
            improve = surrogate - surrogate_old
            accept = step_ok & (kl <= cfg.max_kl) & (improve > 0)
            # The decision: one host read per trial; the first also brings the CG's counters.
            decision = torch.stack([step_ok, accept]).to(cg_scalars.dtype)
            if cg_values is None:
                values = torch.cat([decision, cg_scalars]).tolist()
                cg_values = values[2:]
            else:
                values = decision.tolist()
            ok_step, ok = bool(values[0]), bool(values[1])
            if not ok_step:  # sᵀ(F+damping)s not positive and finite: skip the update
                break
            trials = k + 1
            if ok:
                accepted, kl_after, kl_max_after, improvement = True, kl, kl_max, improve
                break
        if not accepted:
            flat.copy_(theta_old)  # θ_old restored bit for bit
    cg = cg.with_scalars(cg_values)
    t3 = clock()

    # 7. Value-function regression on the returns, minibatched Adam; each minibatch's gradient by
    # one forward and one backward pass of the critic (no autograd graph).  With target
    # normalisation the returns' scale σ is updated first (V's outputs preserved), and the network
    # is fitted to returns/σ.  (Data-parallel: the batch's mean squared return inside
    # update_target_statistics is one more sum for the ranks to all-reduce.)
    targets = value_fn.update_target_statistics(returns)
    batch_size = obs.shape[0]
    value_loss_sum = torch.zeros((), device=obs.device)
    n_minibatches = 0
    vf_grad = torch.empty_like(value_fn.flat, requires_grad=False)
    # Every epoch's shuffle drawn up front on the CPU generator (the same draws, in the same order,
    # as one per epoch), and on CUDA copied in one asynchronous transfer from pinned memory: a
    # pageable copy would make the host wait for the queued update.
    orders = torch.stack([torch.randperm(batch_size, generator=generator, device="cpu")
                          for _ in range(cfg.vf_epochs)]) if cfg.vf_epochs else \
        torch.empty(0, batch_size, dtype=torch.long)
    if obs.device.type != "cpu":
        orders = orders.pin_memory().to(obs.device, non_blocking=True)
    for order in orders:
        # One gather per epoch; the minibatches are then slices (the same rows as obs[idx]).
        obs_epoch, targets_epoch = obs[order], targets[order]
        for start in range(0, batch_size, cfg.vf_minibatch_size):
            end = start + cfg.vf_minibatch_size
            loss = value_fn.regression_gradient(obs_epoch[start:end], targets_epoch[start:end],
                                                vf_grad)
            vf_optimizer.step(vf_grad)
            value_loss_sum += loss
            n_minibatches += 1
    t4 = clock()

    # Expected improvement gᵀ(α·β·s) of the step taken, or of the last one tried if none was.
    return {
        "train/kl": kl_after,
        "train/max_kl": kl_max_after,
        "train/surrogate_improvement": improvement,
        "train/expected_improvement": expected_full * alpha if trials else torch.zeros(()),
        "train/line_search_steps": trials,
        "train/line_search_success": accepted,
        "train/cg_residual": cg.residual_norm,
        "train/cg_iterations": cg.iterations,
        "train/entropy": policy.entropy(old),
        # In return units whether or not the targets are normalised: σ² times the normalised loss.
        "train/value_loss": value_loss_sum / max(n_minibatches, 1) * value_fn.target_scale() ** 2,
        "time/gradient_s": t1 - t0,
        "time/cg_s": t2 - t1,
        "time/line_search_s": t3 - t2,
        "time/critic_s": t4 - t3,
    }


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
    if isinstance(cfg.init_log_std, (bool, np.bool_)) or \
            not isinstance(cfg.init_log_std, numbers.Real) or not math.isfinite(cfg.init_log_std):
        raise ValueError(f"init_log_std must be a finite number, got {cfg.init_log_std!r}")
    cfg.init_log_std = float(cfg.init_log_std)
    if abs(cfg.init_log_std) > _MAX_ABS_INIT_LOG_STD:
        raise ValueError(f"init_log_std must be in [-{_MAX_ABS_INIT_LOG_STD}, "
                         f"{_MAX_ABS_INIT_LOG_STD}] (a standard deviation of e^±"
                         f"{_MAX_ABS_INIT_LOG_STD}), got {cfg.init_log_std}")
    _checks.require_positive(cfg.vf_lr, "vf_lr")
    _checks.require_int(cfg.vf_epochs, "vf_epochs", 0)
    _checks.require_int(cfg.vf_minibatch_size, "vf_minibatch_size", 1)
    _checks.require_int(cfg.num_threads, "num_threads", 0, _MAX_NUM_THREADS)
    _checks.require_int(cfg.checkpoint_every, "checkpoint_every", 0)
    _checks.require_int(cfg.env_workers, "env_workers", -1)
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


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside, restored on exit (0: untouched)."""
    previous = torch.get_num_threads()
    if n and n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


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

def train(env: Union[str, Callable[[], Any], None] = None, total_steps: int = 100_000, *,
          seed: int = 0, callback: Optional[Callable[[Dict[str, Any]], Optional[bool]]] = None,
          **settings: Any) -> TrainResult:
    """Train a TRPO policy on a gymnasium environment.

    Args:
        env: a gymnasium id or a callable returning a gymnasium Env (default ``"CartPole-v1"``, or
            the checkpoint's environment when resuming).  Box or Discrete observations and actions.
        total_steps: environment steps for the whole run (counting a resumed run's earlier steps);
            training stops at the first iteration boundary at or past it.
        seed: seeds the networks' initialisation, the sampling and the environments.  The same seed
            on CPU gives the same history.
        callback: called after each iteration with its history entry; returning ``False`` stops.
        **settings: fields of :class:`trpo_ext.config.TRPOConfig` (documented there with their
            defaults; ``trpo-ext train --help`` lists them).

    Returns:
        :class:`TrainResult` with ``policy``, ``value_fn``, ``history`` (one dict per iteration with
        the keys :data:`HISTORY_KEYS`), ``checkpoint_path`` and ``log_dir``.

    Resuming (``resume=path``): parameters, optimiser, normaliser, generators, step counter and
    history come back bit for bit; the checkpoint's seed and settings are used, and settings passed
    explicitly override them (except ``hidden_sizes``, ``normalize_obs`` and
    ``normalize_value_targets``, which must match).
    Environments start fresh episodes, seeded from the seed and the iteration.

    Invalid settings, an unknown env id or unsupported spaces raise before any training.  torch's
    global settings are left as found (the thread count is set only while training runs, and
    restored).  On CUDA the ``time/*`` split is host time: the update does not synchronise to
    measure it.
    """
    cfg = _make_config(settings)
    total_steps = _checks.require_int(total_steps, "total_steps", 1)
    seed = _checks.require_seed(seed)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    ckpt = None
    if cfg.resume is not None:
        from .checkpoint import load_checkpoint, reading

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
            seed = _checks.require_seed(ckpt["seed"])
    env = "CartPole-v1" if env is None else env
    env_id = check_env_id(env)
    if ckpt is not None and env_id is not None and ckpt["env_id"] not in (None, env_id):
        raise ValueError(f"resume: env {env_id!r} differs from the checkpoint's {ckpt['env_id']!r}")

    _check_log_dir(cfg.log_dir, cfg.resume)

    with _torch_threads(cfg.num_threads):
        return _train(cfg, env, env_id, total_steps, seed, callback, ckpt)


@contextlib.contextmanager
def _closing_on_error(envs):
    """Closes the environments (and any worker processes) when the block raises."""
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


def _train(cfg: TRPOConfig, env, env_id, total_steps, seed, callback, ckpt) -> TrainResult:
    device = torch.device(cfg.device)
    workers = 0 if cfg.async_envs else choose_workers(env, env_factory(env), cfg.n_envs,
                                                      cfg.env_workers)
    envs = make_vector_env(env, cfg.n_envs, cfg.async_envs, workers)
    with _closing_on_error(envs):
        spec = space_spec(envs.single_observation_space, envs.single_action_space)
        if ckpt is not None:
            saved = ckpt.get("policy_spec")
            saved = saved if isinstance(saved, dict) else {}
            differ = [f"{k} {spec[k]} vs {saved.get(k)}"
                      for k in ("obs_kind", "obs_dim", "action_kind", "action_dim")
                      if saved.get(k) != spec[k]]
            if differ:
                spaces = f"{envs.single_observation_space}, {envs.single_action_space}"
                raise ValueError(f"resume: the environment's spaces ({spaces}) are not those the "
                                 f"checkpoint was trained on ({', '.join(differ)})")

    init_gen = torch.Generator().manual_seed(seed)
    policy = Policy(spec, cfg.hidden_sizes, cfg.init_log_std, cfg.normalize_obs, init_gen,
                    env_id=env_id).to(device)
    value_fn = ValueFunction(spec["obs_dim"], cfg.hidden_sizes, init_gen,
                             normalize_targets=cfg.normalize_value_targets).to(device)
    vf_optimizer = Adam(value_fn.flat, lr=cfg.vf_lr)
    reward_normalizer = RewardNormalizer(cfg.n_envs, cfg.gamma).to(device) \
        if cfg.normalize_rewards else None
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    cpu_generator = generator if device.type == "cpu" else torch.Generator().manual_seed(seed + 2)
    history: List[Dict[str, Any]] = []
    steps_done, iteration = 0, 0
    env_seed = seed
    if ckpt is not None:
        from .checkpoint import reading

        with _closing_on_error(envs), reading(cfg.resume):
            policy.load_state_dict(ckpt["policy_state"])
            value_fn.load_state_dict(ckpt["value_state"])
            vf_optimizer.load_state_dict(ckpt["optimizer_state"])
            _restore_rng(ckpt["rng"], generator if device.type == "cpu" else cpu_generator)
            if device.type != "cpu" and "device_generator" in ckpt["rng"]:
                generator.set_state(ckpt["rng"]["device_generator"])
            history = list(ckpt["history"])
            for entry in history:
                float(entry["time/elapsed_s"])  # what the resumed run reads of its history
            if reward_normalizer is not None and "reward_normalizer" in ckpt:
                reward_normalizer.load_state_dict(ckpt["reward_normalizer"])
                reward_normalizer.returns.zero_()  # the environments start fresh episodes
            steps_done = _checks.require_int(ckpt["total_steps_done"], "total_steps_done", 0)
            iteration = _checks.require_int(ckpt["iteration"], "iteration", 0)
            episode_returns = [float(x) for x in ckpt.get("episode_returns", [])]
            episode_lengths = [int(x) for x in ckpt.get("episode_lengths", [])]
            episodes = _checks.require_int(ckpt.get("episodes", 0), "episodes", 0)
        # Environments cannot be restored mid-episode: start fresh episodes, seeded by position.
        env_seed = seed + 7919 * iteration

    collector = RolloutCollector(envs, policy, cfg.n_steps, env_seed, device)
    if ckpt is not None:
        collector.episode_returns.extend(episode_returns)
        collector.episode_lengths.extend(episode_lengths)
        collector.episodes = episodes

    logger = None
    if cfg.log_dir is not None or cfg.progress:
        from .logger import RunLogger  # imported only when asked for: it pulls logging libraries

        # env_id and seed let `trpo-ext plot` group the runs of one task across seeds.
        run_config = {**_config_dict(cfg), "env_id": env_id, "seed": seed, "total_steps": total_steps}
        logger = RunLogger(cfg.log_dir, cfg.progress, total_steps, run_config,
                           start_steps=steps_done, resumed=ckpt is not None)
    checkpoint_path = None
    samples_per_update = cfg.n_envs * cfg.n_steps
    start_time = time.perf_counter()
    elapsed_before = float(history[-1]["time/elapsed_s"]) if history else 0.0

    def write_checkpoint() -> str:
        from .checkpoint import save_checkpoint

        rng = _rng_state(generator if device.type == "cpu" else cpu_generator)
        if device.type != "cpu":
            rng["device_generator"] = generator.get_state()
        state = {
            "env_id": env_id, "config": _config_dict(cfg), "seed": seed, "policy_spec": spec,
            "policy_state": {k: v.detach().cpu() for k, v in policy.state_dict().items()},
            "value_state": {k: v.detach().cpu() for k, v in value_fn.state_dict().items()},
            "optimizer_state": vf_optimizer.state_dict(),
            "total_steps_done": steps_done, "iteration": iteration, "history": history,
            "episodes": collector.episodes,
            "episode_returns": list(collector.episode_returns),
            "episode_lengths": list(collector.episode_lengths), "rng": rng,
        }
        if reward_normalizer is not None:
            state["reward_normalizer"] = {k: v.detach().cpu()
                                          for k, v in reward_normalizer.state_dict().items()}
        directory = os.path.join(os.fspath(cfg.log_dir), "checkpoints")
        path = os.path.join(directory, f"step_{steps_done:09d}.pt")
        save_checkpoint(state, [path, os.path.join(directory, "last.pt")])
        return path

    try:
        while steps_done < total_steps:
            iteration += 1
            t0 = time.perf_counter()
            # 1. Sample with π_θold.
            batch = collector.collect(policy, value_fn, generator)
            t1 = time.perf_counter()

            # 2. Advantages by GAE, standardised (a zero spread leaves them centred, not NaN).
            # Rewards scaled first when asked; the episodes' logged returns stay raw.
            rewards = batch.rewards
            if reward_normalizer is not None:
                reward_normalizer.update(rewards, batch.done)
                rewards = reward_normalizer.normalize(rewards)
            advantages, returns = gae(rewards, batch.values, batch.next_values,
                                      batch.terminated, batch.done, cfg.gamma, cfg.gae_lambda)
            advantages = advantages.reshape(-1)
            if cfg.normalize_advantages:
                advantages = (advantages - advantages.mean()) / (
                    advantages.std(unbiased=False) + 1e-8)
            returns = returns.reshape(-1)
            values = batch.values.reshape(-1)
            t2 = time.perf_counter()

            # 3–7. The policy step and the value fit.
            obs = batch.obs.reshape(samples_per_update, -1)
            actions = batch.actions.reshape(samples_per_update, *batch.actions.shape[2:])
            metrics = trpo_update(policy, value_fn, vf_optimizer, obs, actions, advantages,
                                  returns, cfg, cpu_generator if device.type != "cpu" else generator)
            # Then the normaliser takes in this batch; the next rollout sees the new statistics.
            if policy.obs_rms is not None:
                policy.obs_rms.update(batch.raw_features.reshape(samples_per_update, -1))
            steps_done += samples_per_update
            t3 = time.perf_counter()

            var_returns = returns.var(unbiased=False)
            explained_variance = torch.where(
                var_returns > 0, 1 - (returns - values).var(unbiased=False) / var_returns,
                torch.full_like(var_returns, float("nan")))
            scalars = [metrics["train/kl"], metrics["train/max_kl"],
                       metrics["train/surrogate_improvement"],
                       metrics["train/expected_improvement"], metrics["train/entropy"],
                       metrics["train/value_loss"], explained_variance]
            kl, kl_max, surr_imp, exp_imp, entropy, value_loss, ev = torch.stack(
                [x.to(device=obs.device, dtype=torch.float32).reshape(()) for x in scalars]).tolist()
            returns_recent = collector.episode_returns
            entry = {
                "time/iteration": iteration,
                "time/total_steps": steps_done,
                "rollout/ep_return_mean": float(np.mean(returns_recent)) if returns_recent
                else float("nan"),
                "rollout/ep_length_mean": float(np.mean(collector.episode_lengths))
                if collector.episode_lengths else float("nan"),
                "rollout/episodes": collector.episodes,
                "train/kl": kl,
                "train/max_kl": kl_max,
                "train/surrogate_improvement": surr_imp,
                "train/expected_improvement": exp_imp,
                "train/line_search_steps": int(metrics["train/line_search_steps"]),
                "train/line_search_success": bool(metrics["train/line_search_success"]),
                "train/cg_residual": float(_float(metrics["train/cg_residual"])),
                "train/cg_iterations": int(_float(metrics["train/cg_iterations"])),
                "train/entropy": entropy,
                "train/value_loss": value_loss,
                "train/explained_variance": ev,
                "time/fps": samples_per_update / max(t3 - t0, 1e-9),
                "time/elapsed_s": elapsed_before + time.perf_counter() - start_time,
                "time/sampling_s": t1 - t0,
                "time/gae_s": t2 - t1,
                "time/gradient_s": metrics["time/gradient_s"],
                "time/cg_s": metrics["time/cg_s"],
                "time/line_search_s": metrics["time/line_search_s"],
                "time/critic_s": metrics["time/critic_s"],
            }
            history.append(entry)
            if logger is not None:
                logger.log(entry)
            stop = callback is not None and callback(entry) is False
            last = stop or steps_done >= total_steps
            if cfg.log_dir is not None and (last or (cfg.checkpoint_every and
                                                     iteration % cfg.checkpoint_every == 0)):
                checkpoint_path = write_checkpoint()
            if stop:
                break
    finally:
        collector.close()
        if logger is not None:
            logger.close()
    policy.eval()
    return TrainResult(policy=policy, value_fn=value_fn, history=history,
                       checkpoint_path=checkpoint_path,
                       log_dir=os.fspath(cfg.log_dir) if cfg.log_dir is not None else None)


def _config_dict(cfg: TRPOConfig) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["hidden_sizes"] = list(cfg.hidden_sizes)
    for k in ("log_dir", "resume"):
        if d[k] is not None:
            d[k] = os.fspath(d[k])
    return d
