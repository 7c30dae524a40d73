"""``tanh_and_derivative``: (tanh(x), 1 − tanh(x)²) in one fused pass (CPU and CUDA op).

The linearised networks of :mod:`trpo_ext.policies` need both for every hidden layer: the
critic's gradient for every minibatch, the Fisher-vector products and the policy gradient;
``torch.tanh`` followed by ``1 − y²`` costs three passes and two allocations, the op two passes
(ATen's vectorised tanh on the CPU, tanhf on CUDA).  Not differentiable (it serves code that runs without autograd).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _build  # noqa: F401  (loads the compiled ops)

_ops = torch.ops.trpo_ext


def tanh_and_derivative(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tanh(x), 1 − tanh(x)²)``, each shaped like ``x`` (float32 or float64, CPU or CUDA)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    return _ops.tanh_and_derivative(x)


@torch.library.register_fake("trpo_ext::tanh_and_derivative")
def _tanh_and_derivative_fake(x):
    torch._check(x.dtype in (torch.float32, torch.float64),
                 lambda: f"x must be float32 or float64, got {x.dtype}")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))
