"""Conjugate gradient for (A + damping·I) x = b with fused vector steps (ops ``torch.ops.trpo_ext.cg_*``).

TRPO's natural-gradient step solves F s = g with F·v a Fisher-vector product; this is that solver.
The operator is a callback, so any product works (autograd FVP, dense or sparse matrix).
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional, Union

import torch

from . import _build  # noqa: F401  (loads the op registrations)
from ._checks import require_int, require_nonnegative, require_tensor

__all__ = ["CGResult", "CGGraph", "conjugate_gradient", "cmake_prefix_path"]

#: Folder to put on ``CMAKE_PREFIX_PATH`` so that a C++ project can ``find_package(trpo_ext)``
#: (it also needs torch's: ``torch.utils.cmake_prefix_path``).
cmake_prefix_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")

# Slots of the solver's float64 state tensor (csrc/cg.h).
_RR, _STATUS, _ITERS = 0, 5, 6
_NUM_SCALARS = 16
_STATE_SIZE = 16 + 2 * 1024
_STATUS_NAMES = ("maxiter", "converged", "nonpositive_curvature", "nonfinite")

Operator = Union[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]


class CGResult(NamedTuple):
    """What :func:`conjugate_gradient` returns.

    Fields:
        x: the solution, a new contiguous tensor with b's shape, dtype and device.
        iterations: iterations committed (int); None when solved with ``sync=False``.
        residual_norm: ‖r‖ = ‖b − (A + damping·I)x‖ as tracked by the CG recurrence (float); None
            with ``sync=False``.
        status: ``"converged"``, ``"maxiter"``, ``"nonpositive_curvature"`` (pᵀ(A + damping·I)p ≤ 0)
            or ``"nonfinite"`` (a NaN or inf appeared); None with ``sync=False``.  On the last two,
            ``x`` is the last iterate before the breakdown.
        xAx: xᵀ(A + damping·I)x as a 0-d tensor of b's dtype on b's device, computed as xᵀ(b − r)
            without another product (TRPO's step size needs it).
        state: the solver's raw float64 state on b's device (for :meth:`synced`).
    """

    x: torch.Tensor
    iterations: Optional[int]
    residual_norm: Optional[float]
    status: Optional[str]
    xAx: torch.Tensor
    state: torch.Tensor

    def synced(self) -> "CGResult":
        """This result with ``iterations``, ``residual_norm`` and ``status`` read from the device
        (one small copy; a no-op when they are already filled)."""
        if self.status is not None:
            return self
        return self.with_scalars(self.device_scalars().tolist())

    def device_scalars(self) -> torch.Tensor:
        """rᵀr, the status code and the iteration count as a float64 ``[3]`` tensor on b's device,
        for a caller that copies them to the host together with values of its own (one host read
        instead of two); :meth:`with_scalars` then takes the three numbers."""
        return torch.stack([self.state[_RR], self.state[_STATUS], self.state[_ITERS]])

    def with_scalars(self, values) -> "CGResult":
        """This result with ``iterations``, ``residual_norm`` and ``status`` from the three numbers
        of :meth:`device_scalars`, read by the caller."""
        rr, status, iters = (float(v) for v in values)
        return self._replace(iterations=int(iters), residual_norm=rr ** 0.5,
                             status=_STATUS_NAMES[int(status)])


def _as_operator(matvec: Operator, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(matvec, torch.Tensor):
        A = matvec
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"matvec given as a tensor must be a square matrix, got shape "
                             f"{list(A.shape)}")
        if A.shape[0] != b.shape[0]:
            raise ValueError(f"matvec is a {A.shape[0]}x{A.shape[1]} matrix but b has "
                             f"{b.shape[0]} entries")
        if A.dtype != b.dtype:
            raise TypeError(f"matvec (a matrix) must have the dtype of b ({b.dtype}), got {A.dtype}")
        if A.device != b.device:
            raise ValueError(f"matvec (a matrix) must be on the device of b ({b.device}), got "
                             f"{A.device}")
        return lambda v: torch.mv(A, v) if A.layout == torch.strided else A @ v
    if not callable(matvec):
        raise TypeError(f"matvec must be a callable or a square tensor, got {type(matvec).__name__}")
    return matvec


def _apply(op, v: torch.Tensor, what: str) -> torch.Tensor:
    out = op(v)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must return a torch.Tensor, got {type(out).__name__}")
    return out.detach() if out.requires_grad else out


def _solve(op, b, x0, maxiter, rtol, atol, damping, check_every, poll):
    """The CG loop shared by conjugate_gradient and CGGraph.  ``poll``: read the status from the host
    every ``check_every`` iterations (False: never, all ``maxiter`` iterations are queued)."""
    init, step, finish = (torch.ops.trpo_ext.cg_init.default, torch.ops.trpo_ext.cg_step.default,
                          torch.ops.trpo_ext.cg_finish.default)
    b = b.detach().contiguous()  # once, rather than in every op that reads it
    if x0 is None:
        x = torch.zeros(b.shape, dtype=b.dtype, device=b.device)
        r, p, state = init(b, None, None, damping, rtol, atol)
    else:
        x = x0.detach().clone(memory_format=torch.contiguous_format)
        r, p, state = init(b, x, _apply(op, x, "matvec"), damping, rtol, atol)
    if b.device.type == "cpu":
        # The state shares memory with this array: reading a status costs no dispatch.
        flags = state.numpy()
        for _ in range(maxiter):
            if flags[_STATUS] != 0:
                break
            step(x, r, p, _apply(op, p, "matvec"), state, damping)
    else:
        for k in range(maxiter):
            if poll and k % check_every == 0 and state[_STATUS].item() != 0:
                break
            step(x, r, p, _apply(op, p, "matvec"), state, damping)
    return x, finish(b, x, r, state), state


def conjugate_gradient(
    matvec: Operator,
    b: torch.Tensor,
    x0: Optional[torch.Tensor] = None,
    *,
    maxiter: int = 10,
    rtol: float = 1e-10,
    atol: float = 0.0,
    damping: float = 0.0,
    check_every: Optional[int] = None,
    sync: bool = True,
) -> CGResult:
    """Solve (A + damping·I) x = b by conjugate gradient, A symmetric positive definite.

    Stopping rule: the solve stops after ``maxiter`` iterations, or as soon as
    ``‖r‖ ≤ max(rtol·‖b‖, atol)`` with r the CG residual (b − (A + damping·I)x), or when the
    curvature pᵀ(A + damping·I)p ≤ 0 (A is not positive definite along p), or when a value is not
    finite.  On the last two, x is the last iterate before the breakdown (zero, or x0, if it happens
    at the first iteration), so a finite b never yields NaN.  ``rtol = atol = 0`` runs exactly
    ``maxiter`` iterations (unless the residual becomes exactly zero or a breakdown occurs).

    Args:
        matvec: the operator A: a callable ``v -> A v`` taking and returning a 1-D tensor of b's
            shape, dtype and device (it must not modify its argument), or a square tensor (dense or
            sparse).  It is called exactly once per iteration (once more at the start when ``x0`` is
            given); an exception it raises reaches the caller unchanged.
        b: right-hand side, 1-D float32 or float64, CPU or CUDA (may be non-contiguous).
        x0: start (default zero), b's shape, dtype and device.
        maxiter: iterations at most (≥ 0).
        rtol, atol: tolerances (≥ 0) of the stopping rule above.
        damping: added to the diagonal (≥ 0), folded into the fused steps.
        check_every: with a tolerance on CUDA, how often the host reads the status (a device
            synchronisation): every ``check_every`` iterations, default 5.  The iterations queued
            after convergence or breakdown change nothing on the device, so the result equals an
            exact stop; only the number of matvec calls can exceed ``iterations`` (by less than
            ``check_every``).  On the CPU the status is read after every iteration for free and the
            solve stops exactly, whatever ``check_every`` says.  Without a tolerance the host never
            reads the device inside the loop.
        sync: read ``iterations``, ``residual_norm`` and ``status`` from the device at the end (one
            small copy after the loop).  ``sync=False`` skips it, leaving those fields None until
            :meth:`CGResult.synced`; ``x`` and ``xAx`` are usable either way.

    Returns:
        :class:`CGResult` ``(x, iterations, residual_norm, status, xAx, state)``.  Dot products
        accumulate in float32 for float32 inputs and float64 for float64; the scalars are kept in
        float64.  On the CPU the sums run in a fixed order (fixed chunks of the vectors, fixed SIMD
        lanes), so a solve gives the same bits whatever the number of threads.
    """
    require_tensor(b, "b")
    # The op checks b too; checking here first gives the same messages before matvec is looked at.
    if b.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"b must be float32 or float64, got {b.dtype}")
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D tensor, got shape {list(b.shape)}")
    op = _as_operator(matvec, b)
    if x0 is not None:
        require_tensor(x0, "x0")
        # Checked before matvec(x0) is called; the op checks the same again.
        if x0.dtype != b.dtype:
            raise TypeError(f"x0 must have the dtype of b ({b.dtype}), got {x0.dtype}")
        if x0.device != b.device:
            raise ValueError(f"x0 must be on the device of b ({b.device}), got {x0.device}")
        if x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b {list(b.shape)}, got {list(x0.shape)}")
    maxiter = require_int(maxiter, "maxiter", 0)
    rtol = require_nonnegative(rtol, "rtol")
    atol = require_nonnegative(atol, "atol")
    damping = require_nonnegative(damping, "damping")
    check_every = 5 if check_every is None else require_int(check_every, "check_every", 1)
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
    x, xAx, state = _solve(op, b, x0, maxiter, rtol, atol, damping, check_every,
                           poll=rtol > 0 or atol > 0)
    result = CGResult(x, None, None, None, xAx, state)
    return result.synced() if sync else result


class CGGraph:
    """A whole CG solve, matvec included, captured once as a CUDA graph and replayed.

    For a capturable matvec (static shapes, no host synchronisation, no CPU-side control flow that
    depends on values).  The solve always queues ``maxiter`` iterations; with a tolerance, the
    iterations after convergence change nothing (see :func:`conjugate_gradient`), so a replay gives
    the result of an exact stop.  Replays reuse the same output buffers: ``replay()``'s ``x`` and
    ``xAx`` are overwritten by the next replay (clone them to keep them).

    Example::

        solver = trpo_ext.CGGraph(fvp, g, maxiter=10, damping=0.1)
        result = solver.replay(g_new)     # copies g_new into the captured b, replays the graph

    Args:
        matvec: as in :func:`conjugate_gradient`; called (warm-up and capture) while constructing.
        b: 1-D float32/float64 CUDA tensor; its values are the first right-hand side, its shape,
            dtype and device are those of every replay.
        maxiter, rtol, atol, damping: as in :func:`conjugate_gradient`.
    """

    def __init__(self, matvec: Operator, b: torch.Tensor, *, maxiter: int = 10,
                 rtol: float = 0.0, atol: float = 0.0, damping: float = 0.0) -> None:
        require_tensor(b, "b")
        if b.device.type != "cuda":
            raise ValueError(f"CGGraph needs b on a CUDA device, got {b.device}")
        self._op = _as_operator(matvec, b)
        self._args = (require_int(maxiter, "maxiter", 0), require_nonnegative(rtol, "rtol"),
                      require_nonnegative(atol, "atol"), require_nonnegative(damping, "damping"))
        self.b = b.detach().clone()
        # Warm up on a side stream so that lazy initialisation inside matvec (handles, caches)
        # happens before capture, as torch.cuda.graph requires.
        side = torch.cuda.Stream(device=b.device)
        side.wait_stream(torch.cuda.current_stream(b.device))
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream(b.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._x, self._xAx, self._state = self._run()

    def _run(self):
        maxiter, rtol, atol, damping = self._args
        return _solve(self._op, self.b, None, maxiter, rtol, atol, damping, 1, poll=False)

    def replay(self, b: Optional[torch.Tensor] = None, *, sync: bool = True) -> CGResult:
        """Solve again: copy ``b`` (if given) into the captured right-hand side and replay."""
        if b is not None:
            require_tensor(b, "b")
            if b.shape != self.b.shape or b.dtype != self.b.dtype or b.device != self.b.device:
                raise ValueError(f"b must match the captured b ({list(self.b.shape)}, "
                                 f"{self.b.dtype}, {self.b.device}), got ({list(b.shape)}, "
                                 f"{b.dtype}, {b.device})")
            self.b.copy_(b)
        self.graph.replay()
        result = CGResult(self._x, None, None, None, self._xAx, self._state)
        return result.synced() if sync else result


# --- fake (meta) implementations: shapes only ------------------------------------------------------

@torch.library.register_fake("trpo_ext::cg_init")
def _cg_init_fake(b, x0, Ax0, damping, rtol, atol):
    torch._check(b.dim() == 1, lambda: "b must be a 1-D tensor")
    r = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    p = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    state = torch.empty((_STATE_SIZE,), dtype=torch.float64, device=b.device)
    return r, p, state


@torch.library.register_fake("trpo_ext::cg_step")
def _cg_step_fake(x, r, p, Ap, state, damping):
    # The same refusals as the kernels' checks (cg.h): a meta or fake matvec result lands here.
    if Ap.dtype != r.dtype:
        raise TypeError(f"matvec(p) must have the dtype of b ({r.dtype}), got {Ap.dtype}")
    if Ap.device != r.device:
        raise ValueError(f"matvec(p) must be on the device of b ({r.device}), got {Ap.device}")
    if Ap.shape != r.shape:
        raise ValueError(f"matvec(p) must have the shape of b {list(r.shape)}, got {list(Ap.shape)}")
    return None


@torch.library.register_fake("trpo_ext::cg_finish")
def _cg_finish_fake(b, x, r, state):
    return torch.empty((), dtype=b.dtype, device=b.device)
