"""KL(π_old ‖ π_new) and the TRPO surrogate for diagonal-Gaussian and categorical policies.

Each function is one fused pass over the batch (ops ``torch.ops.trpo_ext.kl_*``): on CUDA one pass
over the rows plus a one-block launch that adds the blocks' partial sums, with no host
synchronisation.

Conventions shared by every function here:

* KL direction KL(π_old ‖ π_new), summed over action dimensions, averaged over the batch (the
  trust region of TRPO; its Hessian at θ = θ_old is the Fisher matrix).
* Differentiable with respect to the **new** distribution's parameters only (``mean_new``,
  ``log_std_new``, ``logits_new``).  The old parameters, ``actions``, ``logp_old`` and ``advantages``
  are constants of the update: passing one that requires grad while grad mode is on raises a
  ``ValueError`` (``.detach()`` it).  The mean KL is differentiable to any order (its backward is a
  fused op whose own backward is written with differentiable torch operations), so
  ``torch.autograd.grad(..., create_graph=True)`` twice gives exact Hessian-vector products — the
  Fisher-vector product of TRPO.  The surrogate is differentiable to first order (the policy
  gradient g); differentiating it twice raises ``NotImplementedError``.  ``max_kl`` is a
  diagnostic and carries no gradient.
* float32 or float64, all floating inputs of one dtype and one device.  Per-element math runs in
  the input dtype (float64 for float64), batch sums accumulate in float64 for both dtypes.
* A batch of B = 0 rows raises ``ValueError`` (the mean of nothing is undefined), as do zero action
  dimensions or classes.  Non-contiguous inputs are accepted (copied once).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _build  # noqa: F401  (loads the op registrations)
from ._checks import fake_same_device, refuse_grad

__all__ = ["kl_diag_gaussian", "kl_categorical", "kl_surrogate_diag_gaussian",
           "kl_surrogate_categorical", "kl_metric_diag_gaussian", "kl_metric_categorical",
           # earlier names, aliases for one more release
           "mean_kl_diag_gaussian", "mean_kl_categorical", "surrogate_kl_diag_gaussian",
           "surrogate_kl_categorical", "fisher_metric_diag_gaussian", "fisher_metric_categorical"]

_ops = torch.ops.trpo_ext


def _require_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def kl_diag_gaussian(mean_old: torch.Tensor, log_std_old: torch.Tensor,
                          mean_new: torch.Tensor, log_std_new: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(N(μ_old, σ_old²) ‖ N(μ_new, σ_new²)), summed over action dimensions.

    Per dimension, with ℓ = log σ: ``ℓ_new − ℓ_old + (σ_old² + (μ_old − μ_new)²) / (2σ_new²) − ½``.

    Args:
        mean_old, mean_new: ``[B, A]``.
        log_std_old, log_std_new: each ``[A]`` (state-independent, the usual TRPO policy) or
            ``[B, A]``.
    Returns:
        0-d tensor of the inputs' dtype and device; differentiable to any order in ``mean_new``
        and ``log_std_new``.
    """
    _require_tensors(mean_old=mean_old, log_std_old=log_std_old, mean_new=mean_new,
                     log_std_new=log_std_new)
    return _ops.kl_diag_gaussian(mean_old, log_std_old, mean_new, log_std_new)


def kl_categorical(logits_old: torch.Tensor, logits_new: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(Cat(softmax(logits_old)) ‖ Cat(softmax(logits_new))).

    Logits ``[B, K]`` (unnormalised; a log-softmax is taken inside, stable for large logits).
    Returns a 0-d tensor, differentiable to any order in ``logits_new``.
    """
    _require_tensors(logits_old=logits_old, logits_new=logits_new)
    return _ops.kl_categorical(logits_old, logits_new)


def kl_surrogate_diag_gaussian(mean_old: torch.Tensor, log_std_old: torch.Tensor,
                               mean_new: torch.Tensor, log_std_new: torch.Tensor,
                               actions: torch.Tensor, logp_old: torch.Tensor,
                               advantages: torch.Tensor
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(surrogate, mean_kl, max_kl)`` of a diagonal-Gaussian policy in one pass.

    ``surrogate = mean_b exp(log π_new(a_b) − logp_old_b) · advantages_b`` with
    ``log π_new(a) = Σ_a [−½((a − μ_new)/σ_new)² − log σ_new − ½ log 2π]``; ``mean_kl`` as
    :func:`kl_diag_gaussian`; ``max_kl`` the largest per-row KL.

    Args:
        mean_old, mean_new, actions: ``[B, A]``; log_std_old, log_std_new: ``[A]`` or ``[B, A]``;
        logp_old, advantages: ``[B]``.  ``logp_old`` is log π_old(a) as sampled (it is not
        recomputed from the old parameters, so θ = θ_old gives ratio exp(0) only if they agree).
    Returns:
        Three 0-d tensors.  ``surrogate`` and ``mean_kl`` are differentiable (first order) in
        ``mean_new`` and ``log_std_new``; ``max_kl`` is not.
    """
    _require_tensors(mean_old=mean_old, log_std_old=log_std_old, mean_new=mean_new,
                     log_std_new=log_std_new, actions=actions, logp_old=logp_old,
                     advantages=advantages)
    return _ops.kl_surrogate_diag_gaussian(mean_old, log_std_old, mean_new, log_std_new, actions,
                                           logp_old, advantages)


def kl_surrogate_categorical(logits_old: torch.Tensor, logits_new: torch.Tensor,
                             actions: torch.Tensor, logp_old: torch.Tensor,
                             advantages: torch.Tensor
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(surrogate, mean_kl, max_kl)`` of a categorical policy in one pass.

    Args:
        logits_old, logits_new: ``[B, K]``; actions: ``[B]`` int64 or int32 class indices in
        ``[0, K)``; logp_old, advantages: ``[B]`` of the logits' dtype.
    Out-of-range actions: on the CPU a ``ValueError`` naming the first bad row; on CUDA (where a
    check would need a host synchronisation) that row's log-probability is NaN, so the surrogate
    and its gradient come out NaN — a caller's finiteness check sees it, nothing reads out of
    bounds.
    Returns:
        Three 0-d tensors; ``surrogate`` and ``mean_kl`` differentiable (first order) in
        ``logits_new``, ``max_kl`` not.
    """
    _require_tensors(logits_old=logits_old, logits_new=logits_new, actions=actions,
                     logp_old=logp_old, advantages=advantages)
    return _ops.kl_surrogate_categorical(logits_old, logits_new, actions, logp_old, advantages)


# --- autograd -----------------------------------------------------------------------------------

# --- the Fisher metric of each distribution -------------------------------------------------------

def kl_metric_diag_gaussian(log_std: torch.Tensor, u_mean: torch.Tensor,
                                u_log_std: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Hessian of the batch-mean Gaussian KL at new = old, applied to a direction.

    With the old distribution's ``log_std`` (``[A]`` or ``[B, A]``) and a direction ``(u_mean
    [B, A], u_log_std shaped like log_std)`` in the new distribution's parameters, returns
    ``(u_mean · e^{−2·log_std} / B, 2 · u_log_std)`` (``2 · u_log_std / B`` for a ``[B, A]``
    log_std): the metric M of the closed-form Fisher-vector product F v = Jᵀ M J v, J being the
    Jacobian of the distribution parameters in the network's.  One fused pass, not differentiable.
    """
    _require_tensors(log_std=log_std, u_mean=u_mean, u_log_std=u_log_std)
    refuse_grad("kl_metric_diag_gaussian", log_std=log_std, u_mean=u_mean, u_log_std=u_log_std)
    return _ops.kl_metric_diag_gaussian(log_std, u_mean, u_log_std)


def kl_metric_categorical(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The Hessian of the batch-mean categorical KL at new = old, applied to a direction.

    With the old ``logits [B, K]`` (p = softmax) and a direction ``u [B, K]`` in the new logits,
    returns ``(p ⊙ (u − pᵀu)) / B`` row by row, i.e. ``(diag(p) − p pᵀ) u / B``.  One fused pass,
    not differentiable.
    """
    _require_tensors(logits=logits, u=u)
    refuse_grad("kl_metric_categorical", logits=logits, u=u)
    return _ops.kl_metric_categorical(logits, u)


def _refuse_grad(names, tensors) -> None:
    for name, t in zip(names, tensors):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but trpo_ext's KL/surrogate ops treat it as a constant "
                f"(only the new distribution's parameters are differentiated); pass {name}.detach()")


_GAUSS_CONST = ("mean_old", "log_std_old")
_CAT_CONST = ("logits_old",)
_SURR_CONST = ("actions", "logp_old", "advantages")


def _kl_gauss_setup(ctx, inputs, output):
    mean_old, log_std_old, mean_new, log_std_new = inputs
    _refuse_grad(_GAUSS_CONST, (mean_old, log_std_old))
    ctx.save_for_backward(mean_old, log_std_old, mean_new, log_std_new)


def _kl_gauss_backward(ctx, grad):
    mean_old, log_std_old, mean_new, log_std_new = ctx.saved_tensors
    gm, gl = _ops.kl_diag_gaussian_backward(grad, None, mean_old, log_std_old, mean_new,
                                            log_std_new, None, None, None)
    return None, None, gm, gl


def _surr_gauss_setup(ctx, inputs, output):
    _refuse_grad(_GAUSS_CONST + _SURR_CONST, inputs[:2] + inputs[4:])
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(*inputs)


def _surr_gauss_backward(ctx, grad_surrogate, grad_mean_kl, _grad_max_kl):
    mean_old, log_std_old, mean_new, log_std_new, actions, logp_old, advantages = ctx.saved_tensors
    gm, gl = _ops.kl_diag_gaussian_backward(grad_mean_kl, grad_surrogate, mean_old, log_std_old,
                                            mean_new, log_std_new, actions, logp_old, advantages)
    return None, None, gm, gl, None, None, None


def _kl_cat_setup(ctx, inputs, output):
    _refuse_grad(_CAT_CONST, inputs[:1])
    ctx.save_for_backward(*inputs)


def _kl_cat_backward(ctx, grad):
    logits_old, logits_new = ctx.saved_tensors
    return None, _ops.kl_categorical_backward(grad, None, logits_old, logits_new, None, None, None)


def _surr_cat_setup(ctx, inputs, output):
    _refuse_grad(_CAT_CONST + _SURR_CONST, inputs[:1] + inputs[2:])
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(*inputs)


def _surr_cat_backward(ctx, grad_surrogate, grad_mean_kl, _grad_max_kl):
    logits_old, logits_new, actions, logp_old, advantages = ctx.saved_tensors
    g = _ops.kl_categorical_backward(grad_mean_kl, grad_surrogate, logits_old, logits_new, actions,
                                     logp_old, advantages)
    return None, g, None, None, None


# Second order.  The backward ops compute (up to the 1/B of the mean, s = grad_mean_kl / B),
# Gaussian with w = 1/σ_new², d = μ_new − μ_old, r = σ_old²/σ_new²:
#   g_μ = s d w,    g_ℓ = s (1 − r − d² w)
# whose derivatives are  ∂g_μ/∂μ = s w,  ∂g_μ/∂ℓ = ∂g_ℓ/∂μ = −2 s d w,  ∂g_ℓ/∂ℓ = 2 s (r + d² w);
# categorical  g = s (p_new − p_old)  with  ∂g/∂ℓ_new = s (diag(p_new) − p_new p_newᵀ).
# At θ = θ_old (d = 0, r = 1) these are the Fisher metrics diag(1/σ², 2) and diag(p) − p pᵀ.
# Written with torch operations, so they are differentiable again.

def _bwd_gauss_setup(ctx, inputs, output):
    ctx.surrogate = inputs[1] is not None
    ctx.log_std_new_shape = inputs[5].shape
    ctx.save_for_backward(inputs[0], *inputs[2:6])


def _bwd_gauss_backward(ctx, u_mean, u_log_std):
    if ctx.surrogate:
        raise NotImplementedError(
            "trpo_ext's surrogate is differentiable to first order only; take second derivatives "
            "through mean_kl_diag_gaussian")
    grad_kl, mean_old, log_std_old, mean_new, log_std_new = ctx.saved_tensors
    B = mean_new.shape[0]
    lo = log_std_old.expand_as(mean_new)
    ln = log_std_new.expand_as(mean_new)
    w = torch.exp(-2 * ln)
    d = mean_new - mean_old
    r = torch.exp(2 * (lo - ln))
    u_m = torch.zeros_like(mean_new) if u_mean is None else u_mean
    u_l = torch.zeros_like(mean_new) if u_log_std is None else u_log_std.expand_as(mean_new)
    s = grad_kl / B
    dw = d * w
    grad_mean = s * (u_m * w - 2 * u_l * dw)
    grad_log_std = s * (2 * u_l * (r + d * dw) - 2 * u_m * dw)
    if log_std_new.dim() == 1:
        grad_log_std = grad_log_std.sum(0)
    grad_grad_kl = (u_m * dw + u_l * (-torch.expm1(2 * (lo - ln)) - d * dw)).sum() / B
    return (grad_grad_kl.reshape(grad_kl.shape), None, None, None, grad_mean, grad_log_std, None,
            None, None)


def _bwd_cat_setup(ctx, inputs, output):
    ctx.surrogate = inputs[1] is not None
    ctx.save_for_backward(inputs[0], inputs[2], inputs[3])


def _bwd_cat_backward(ctx, u):
    if ctx.surrogate:
        raise NotImplementedError(
            "trpo_ext's surrogate is differentiable to first order only; take second derivatives "
            "through mean_kl_categorical")
    grad_kl, logits_old, logits_new = ctx.saved_tensors
    B = logits_new.shape[0]
    p_new = torch.softmax(logits_new, -1)
    p_old = torch.softmax(logits_old, -1)
    pu = p_new * u
    grad_logits = (grad_kl / B) * (pu - p_new * pu.sum(-1, keepdim=True))
    grad_grad_kl = (u * (p_new - p_old)).sum() / B
    return grad_grad_kl.reshape(grad_kl.shape), None, None, grad_logits, None, None, None


torch.library.register_autograd("trpo_ext::kl_diag_gaussian", _kl_gauss_backward,
                                setup_context=_kl_gauss_setup)
torch.library.register_autograd("trpo_ext::kl_surrogate_diag_gaussian", _surr_gauss_backward,
                                setup_context=_surr_gauss_setup)
torch.library.register_autograd("trpo_ext::kl_categorical", _kl_cat_backward,
                                setup_context=_kl_cat_setup)
torch.library.register_autograd("trpo_ext::kl_surrogate_categorical", _surr_cat_backward,
                                setup_context=_surr_cat_setup)
torch.library.register_autograd("trpo_ext::kl_diag_gaussian_backward", _bwd_gauss_backward,
                                setup_context=_bwd_gauss_setup)
torch.library.register_autograd("trpo_ext::kl_categorical_backward", _bwd_cat_backward,
                                setup_context=_bwd_cat_setup)


# --- fake (meta) kernels --------------------------------------------------------------------------

def _check_gaussian_meta(mean_old, log_std_old, mean_new, log_std_new) -> None:
    fake_same_device(mean_old=mean_old, log_std_old=log_std_old, mean_new=mean_new,
                     log_std_new=log_std_new)
    torch._check(mean_old.dim() == 2, lambda: "mean_old must be [B, A]")
    torch._check(mean_new.shape == mean_old.shape, lambda: "mean_new must have the shape of mean_old")
    for name, ls in (("log_std_old", log_std_old), ("log_std_new", log_std_new)):
        torch._check(ls.shape == mean_old.shape[1:] or ls.shape == mean_old.shape,
                     lambda: f"{name} must be [A] or [B, A]")
    for t in (log_std_old, mean_new, log_std_new):
        torch._check(t.dtype == mean_old.dtype, lambda: "all inputs must share mean_old's dtype")


def _check_surrogate_meta(ref, actions, logp_old, advantages) -> None:
    fake_same_device(first_input=ref, actions=actions, logp_old=logp_old, advantages=advantages)
    torch._check(logp_old.shape == ref.shape[:1], lambda: "logp_old must be [B]")
    torch._check(advantages.shape == ref.shape[:1], lambda: "advantages must be [B]")


def _scalar(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(())


@torch.library.register_fake("trpo_ext::kl_diag_gaussian")
def _kl_gauss_fake(mean_old, log_std_old, mean_new, log_std_new):
    _check_gaussian_meta(mean_old, log_std_old, mean_new, log_std_new)
    return _scalar(mean_old)


@torch.library.register_fake("trpo_ext::kl_surrogate_diag_gaussian")
def _surr_gauss_fake(mean_old, log_std_old, mean_new, log_std_new, actions, logp_old, advantages):
    _check_gaussian_meta(mean_old, log_std_old, mean_new, log_std_new)
    torch._check(actions.shape == mean_old.shape, lambda: "actions must have the shape of mean_old")
    _check_surrogate_meta(mean_old, actions, logp_old, advantages)
    return _scalar(mean_old), _scalar(mean_old), _scalar(mean_old)


@torch.library.register_fake("trpo_ext::kl_diag_gaussian_backward")
def _bwd_gauss_fake(grad_mean_kl, grad_surrogate, mean_old, log_std_old, mean_new, log_std_new,
                    actions, logp_old, advantages):
    _check_gaussian_meta(mean_old, log_std_old, mean_new, log_std_new)
    fake_same_device(mean_old=mean_old, grad_mean_kl=grad_mean_kl, grad_surrogate=grad_surrogate,
                     actions=actions, logp_old=logp_old, advantages=advantages)
    return (torch.empty_like(mean_new, memory_format=torch.contiguous_format),
            torch.empty_like(log_std_new, memory_format=torch.contiguous_format))


def _check_categorical_meta(logits_old, logits_new) -> None:
    fake_same_device(logits_old=logits_old, logits_new=logits_new)
    torch._check(logits_old.dim() == 2, lambda: "logits_old must be [B, K]")
    torch._check(logits_new.shape == logits_old.shape,
                 lambda: "logits_new must have the shape of logits_old")
    torch._check(logits_new.dtype == logits_old.dtype,
                 lambda: "logits_new must have the dtype of logits_old")


@torch.library.register_fake("trpo_ext::kl_categorical")
def _kl_cat_fake(logits_old, logits_new):
    _check_categorical_meta(logits_old, logits_new)
    return _scalar(logits_old)


@torch.library.register_fake("trpo_ext::kl_surrogate_categorical")
def _surr_cat_fake(logits_old, logits_new, actions, logp_old, advantages):
    _check_categorical_meta(logits_old, logits_new)
    torch._check(actions.shape == logits_old.shape[:1], lambda: "actions must be [B]")
    _check_surrogate_meta(logits_old, actions, logp_old, advantages)
    return _scalar(logits_old), _scalar(logits_old), _scalar(logits_old)


@torch.library.register_fake("trpo_ext::kl_categorical_backward")
def _bwd_cat_fake(grad_mean_kl, grad_surrogate, logits_old, logits_new, actions, logp_old,
                  advantages):
    _check_categorical_meta(logits_old, logits_new)
    fake_same_device(logits_old=logits_old, grad_mean_kl=grad_mean_kl,
                     grad_surrogate=grad_surrogate, actions=actions, logp_old=logp_old,
                     advantages=advantages)
    return torch.empty_like(logits_new, memory_format=torch.contiguous_format)



@torch.library.register_fake("trpo_ext::kl_metric_diag_gaussian")
def _metric_gauss_fake(log_std, u_mean, u_log_std):
    fake_same_device(log_std=log_std, u_mean=u_mean, u_log_std=u_log_std)
    torch._check(u_mean.dim() == 2, lambda: "u_mean must be [B, A]")
    torch._check(u_log_std.shape == log_std.shape, lambda: "u_log_std must have the shape of log_std")
    torch._check(u_mean.dtype == log_std.dtype and u_log_std.dtype == log_std.dtype,
                 lambda: "log_std, u_mean and u_log_std must share a dtype")
    return (torch.empty_like(u_mean, memory_format=torch.contiguous_format),
            torch.empty_like(u_log_std, memory_format=torch.contiguous_format))


@torch.library.register_fake("trpo_ext::kl_metric_categorical")
def _metric_cat_fake(logits, u):
    fake_same_device(logits=logits, u=u)
    torch._check(logits.dim() == 2, lambda: "logits must be [B, K]")
    torch._check(u.shape == logits.shape, lambda: "u must have the shape of logits")
    torch._check(u.dtype == logits.dtype, lambda: "u must have the dtype of logits")
    return torch.empty_like(u, memory_format=torch.contiguous_format)


# The names of earlier releases, kept as aliases for one more.
mean_kl_diag_gaussian = kl_diag_gaussian
mean_kl_categorical = kl_categorical
surrogate_kl_diag_gaussian = kl_surrogate_diag_gaussian
surrogate_kl_categorical = kl_surrogate_categorical
fisher_metric_diag_gaussian = kl_metric_diag_gaussian
fisher_metric_categorical = kl_metric_categorical
