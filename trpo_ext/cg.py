"""Conjugate gradient.  PLACEHOLDER until the fused cg_* ops land (issue 3): delegates to the
pure-PyTorch reference so that the driver can be written against the final API."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._reference import conjugate_gradient_reference

__all__ = ["CGResult", "conjugate_gradient"]


class CGResult(NamedTuple):
    x: torch.Tensor
    iterations: int
    residual_norm: float
    status: str
    xAx: torch.Tensor


def conjugate_gradient(matvec, b, x0=None, *, maxiter=10, rtol=1e-10, atol=0.0, damping=0.0):
    return CGResult(*conjugate_gradient_reference(matvec, b, x0, maxiter=maxiter, rtol=rtol,
                                                  atol=atol, damping=damping))
