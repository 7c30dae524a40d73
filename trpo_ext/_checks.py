"""Argument checks shared by the Python wrappers: each error names the argument and what it got."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch


def require_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def require_unit_interval(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(x).__name__}")
    x = float(x)
    if not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def require_nonnegative(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(x).__name__}")
    x = float(x)
    if not (x >= 0.0) or math.isinf(x):
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return x


def require_positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number > 0, got {type(x).__name__}")
    x = float(x)
    if not (x > 0.0) or math.isinf(x):
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return x


def require_int(x, name: str, minimum: int = 0, maximum=None) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(x).__name__}")
    x = int(x)
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    if maximum is not None and x > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {x}")
    return x


# Seeds: torch's generators take 64-bit seeds, and a run derives seeds seed + i from its own (one
# per environment, one per evaluation episode).
MAX_SEED = 2**63 - 2**32


def require_seed(x, name: str = "seed") -> int:
    return require_int(x, name, 0, MAX_SEED)


def refuse_grad(op: str, **tensors) -> None:
    """For ops without a backward: an input that requires grad (while grad mode is on) would give
    outputs whose gradient silently never reaches it, so it is refused."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{op} is not differentiable, but {name} requires grad: pass "
                             f"{name}.detach() (or call it under torch.no_grad())")


def fake_same_device(**tensors) -> None:
    """For fake (meta) kernels: every tensor argument on one device.  Without it, a call that mixes
    meta and real tensors is routed to the fake kernel, which would hand back uninitialised real
    tensors."""
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        torch._check(t.device == ref.device,
                     lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}: all "
                             f"tensor arguments must be on one device")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside, restored on exit (0: untouched)."""
    previous = torch.get_num_threads()
    if n and n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
