"""trpo_ext: Trust Region Policy Optimization with fused C++/CUDA kernels for PyTorch."""
from ._build import build_info
from .cg import CGGraph, CGResult, cmake_prefix_path, conjugate_gradient
from .gae import gae
from .checkpoint import load
from .evaluate import evaluate, evaluate_returns
from .train import TrainResult, train
from .policies import Policy, ValueFunction, fisher_vector_product
from . import distributions, presets
from .kl import (
    kl_categorical,
    kl_diag_gaussian,
    kl_metric_categorical,
    kl_metric_diag_gaussian,
    kl_surrogate_categorical,
    kl_surrogate_diag_gaussian,
    fisher_metric_categorical,
    fisher_metric_diag_gaussian,
    mean_kl_categorical,
    mean_kl_diag_gaussian,
    surrogate_kl_categorical,
    surrogate_kl_diag_gaussian,
)

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "gae",
    "conjugate_gradient",
    "CGResult",
    "CGGraph",
    "cmake_prefix_path",
    "kl_diag_gaussian",
    "kl_categorical",
    "kl_surrogate_diag_gaussian",
    "kl_surrogate_categorical",
    "kl_metric_diag_gaussian",
    "kl_metric_categorical",
    "mean_kl_diag_gaussian",
    "mean_kl_categorical",
    "surrogate_kl_diag_gaussian",
    "surrogate_kl_categorical",
    "fisher_metric_diag_gaussian",
    "fisher_metric_categorical",
    "train",
    "Policy",
    "ValueFunction",
    "fisher_vector_product",
    "distributions",
    "presets",
    "TrainResult",
    "evaluate",
    "evaluate_returns",
    "load",
    "__version__",
]
