"""Generalized advantage estimation over time-major rollouts (op ``torch.ops.trpo_ext.gae``)."""
from __future__ import annotations

from typing import Tuple

import torch

from . import _build  # noqa: F401  (loads the op registrations)
from ._checks import fake_same_device, refuse_grad, require_tensor, require_unit_interval

__all__ = ["gae"]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE(γ, λ), for rollouts of shape ``[T]`` or ``[T, N]`` (time-major).

    Convention (t = 0 … T-1, each environment independently)::

        δ_t = r_t + γ (1 − terminated_t) next_values_t − values_t
        A_t = δ_t + γ λ (1 − done_t) A_{t+1},     A_T = 0
        returns_t = A_t + values_t

    ``terminated`` marks a true end (no bootstrap); ``done = terminated | truncated`` stops the
    recursion.  A truncated step therefore bootstraps from ``next_values_t`` (the value of its final
    observation) while nothing flows back across it.  ``next_values_t`` is never read where
    ``terminated_t`` is set.

    Args:
        rewards, values, next_values: float32 or float64, one dtype, one shape ``[T]`` or ``[T, N]``.
        terminated, done: same shape; bool, or 0/1 values of an integer or floating dtype
            (nonzero counts as set).
        gamma, lam: discount and GAE λ, each in [0, 1].

    Returns:
        ``(advantages, returns)``, each with the dtype, device and shape of ``rewards``.
        Accumulation is in float32 for float32 inputs and float64 for float64 inputs.  CPU and CUDA
        tensors are supported; inputs may be non-contiguous.
    """
    for name, t in (("rewards", rewards), ("values", values), ("next_values", next_values),
                    ("terminated", terminated), ("done", done)):
        require_tensor(t, name)
    refuse_grad("gae", rewards=rewards, values=values, next_values=next_values)
    gamma = require_unit_interval(gamma, "gamma")
    lam = require_unit_interval(lam, "lam")
    return torch.ops.trpo_ext.gae(rewards, values, next_values, terminated, done, gamma, lam)


@torch.library.register_fake("trpo_ext::gae")
def _gae_fake(rewards, values, next_values, terminated, done, gamma, lam):
    fake_same_device(rewards=rewards, values=values, next_values=next_values,
                     terminated=terminated, done=done)
    torch._check(rewards.dim() in (1, 2), lambda: "rewards must be [T] or [T, N]")
    for t in (values, next_values, terminated, done):
        torch._check(t.shape == rewards.shape, lambda: "all GAE inputs must share one shape")
    torch._check(values.dtype == rewards.dtype and next_values.dtype == rewards.dtype,
                 lambda: "rewards, values and next_values must share one dtype")
    return (torch.empty_like(rewards, memory_format=torch.contiguous_format),
            torch.empty_like(rewards, memory_format=torch.contiguous_format))
