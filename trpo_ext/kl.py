"""KL and surrogate reductions.  PLACEHOLDER until the fused kl_* ops land (issue 4): delegates to
the pure-PyTorch reference so that the driver can be written against the final API."""
from __future__ import annotations

from ._reference import (
    mean_kl_categorical_reference as mean_kl_categorical,
    mean_kl_diag_gaussian_reference as mean_kl_diag_gaussian,
    surrogate_kl_categorical_reference as surrogate_kl_categorical,
    surrogate_kl_diag_gaussian_reference as surrogate_kl_diag_gaussian,
)

__all__ = ["mean_kl_diag_gaussian", "mean_kl_categorical", "surrogate_kl_diag_gaussian",
           "surrogate_kl_categorical"]
