"""Every setting of :func:`trpo_ext.train`, with its default and one line of documentation.

The command line (``trpo-ext train --help``) is generated from these fields, so a new setting needs
only a field here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TRPOConfig:
    # sampling
    n_envs: int = _f(8, "parallel environments in the vector env")
    n_steps: int = _f(256, "steps per environment per update (n_envs * n_steps samples per update)")
    vector_env: str = _f("sync", "what steps the environments: sync (in this process, gymnasium "
                                 "semantics), async (gymnasium AsyncVectorEnv, a process per env) "
                                 "or envpool (EnvPool's C++ envs on a thread pool; its tasks only)")
    env_threads: int = _f(0, "EnvPool pool threads (vector_env='envpool'); 0: one per usable core")
    async_envs: bool = _f(False, "alias of vector_env='async' (kept for old scripts)")
    env_workers: int = _f(0, "retired, ignored with a warning (kept for old scripts): for more "
                             "cores run under torchrun or use vector_env='envpool'")
    env_kwargs: Optional[Dict[str, Any]] = _f(None, "keyword arguments of gymnasium.make(env) "
                                                    "when env is an id, e.g. "
                                                    "{\"max_episode_steps\": 500}; kept with the "
                                                    "policy for evaluation")
    normalize_obs: bool = _f(True, "normalise observations with running mean/std")
    # the TRPO step
    max_kl: float = _f(0.04, "trust-region radius δ on the mean KL(π_old ‖ π_new)")
    cg_iters: int = _f(10, "conjugate-gradient iterations for F s = g")
    cg_damping: float = _f(0.1, "damping added to the Fisher matrix: (F + damping·I)")
    line_search_steps: int = _f(10, "backtracking line-search trials")
    backtrack_ratio: float = _f(0.8, "step shrink factor per line-search trial")
    normalize_advantages: bool = _f(True, "standardise advantages per batch")
    normalize_rewards: bool = _f(False, "divide rewards by the running std of the discounted "
                                        "return, clipped to ±10 (VecNormalize's rule); logged "
                                        "returns stay raw")
    # returns
    gamma: float = _f(0.99, "discount factor γ")
    gae_lambda: float = _f(0.95, "GAE λ")
    # networks
    hidden_sizes: Tuple[int, ...] = _f((64, 64), "hidden layer sizes of policy and value nets (tanh)")
    init_log_std: Optional[float] = _f(None, "initial log standard deviation of Gaussian policies, "
                                             "in the action's units; none: the std starts at e^-1 "
                                             "times half of each action's range (e^-1 where it is "
                                             "unbounded)")
    # value function
    vf_lr: float = _f(1e-3, "Adam learning rate of the value function")
    vf_epochs: int = _f(5, "passes over the batch per value-function fit")
    vf_minibatch_size: int = _f(256, "minibatch size of the value-function fit")
    normalize_value_targets: bool = _f(True, "fit the value net to returns / σ, V = σ·net, σ the "
                                             "running RMS of the returns (output layer rescaled "
                                             "when σ changes, as in PopArt)")
    # run
    device: str = _f("cpu", "where the networks and the update run: cpu or cuda")
    num_threads: int = _f(1, "torch CPU threads while train() runs (restored on return); 0: leave as set")
    log_dir: Optional[str] = _f(None, "directory for CSV/TensorBoard logs, plot and checkpoints")
    progress: bool = _f(False, "show a progress bar (only when attached to a terminal)")
    checkpoint_every: int = _f(10, "write a checkpoint every K iterations (and at the end); 0: end only")
    distributed: str = _f("auto", "data-parallel over torchrun's ranks: auto (when started by "
                                  "torchrun), on (required), off; n_envs and steps count all ranks")
    resume: Optional[str] = _f(None, "checkpoint to continue from (or a run directory: its "
                                     "checkpoints/last.pt)")


def config_fields():
    """(name, type, default, help) for each setting, in declaration order."""
    out = []
    for f in fields(TRPOConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore
        out.append((f.name, f.type, default, f.metadata.get("help", "")))
    return out
