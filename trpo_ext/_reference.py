"""Pure-PyTorch reference implementations of every trpo_ext op.

Tests compare the ops with these, and benchmarks time them as the baseline.  They follow the
textbook formulas directly, favouring clarity over speed.
"""
from __future__ import annotations

from typing import Tuple

import torch


def gae_reference(rewards, values, next_values, terminated, done, gamma, lam
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE as RL libraries write it: a reversed Python loop over vectorised ``[N]`` rows.

    Computes in float64 and returns float64; the formulas are those of :func:`trpo_ext.gae`.
    """
    r = rewards.double()
    v = values.double()
    nv = next_values.double()
    not_term = 1.0 - terminated.double()
    not_done = 1.0 - done.double()
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[0]) if r.shape[0] else None
    for t in reversed(range(r.shape[0])):
        # where() rather than multiplication, so a non-finite next value at a terminal step is ignored
        boot = torch.where(not_term[t] > 0, gamma * nv[t], torch.zeros_like(nv[t]))
        delta = r[t] + boot - v[t]
        last = delta + gamma * lam * not_done[t] * last
        adv[t] = last
    return adv, adv + v


def gae_baseline(rewards, values, next_values, terminated, done, gamma, lam
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same loop in the inputs' own dtype and device: the baseline the benchmarks time."""
    not_term = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - done.to(rewards.dtype)
    adv = torch.empty_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * not_term[t] - values[t]
        last = delta + gamma * lam * not_done[t] * last
        adv[t] = last
    return adv, adv + values


# --- conjugate gradient -------------------------------------------------------------------------

def conjugate_gradient_reference(matvec, b, x0=None, *, maxiter=10, rtol=1e-10, atol=0.0,
                                 damping=0.0):
    """Textbook CG for (A + damping·I) x = b, the loop TRPO libraries write (Python-side scalars).

    Stops after ``maxiter`` iterations or when ‖r‖ ≤ max(rtol·‖b‖, atol), on pᵀAp ≤ 0, or on a
    non-finite value (keeping the last good x).  Returns ``(x, iterations, residual_norm, status,
    xAx)`` with status one of "converged", "maxiter", "nonpositive_curvature", "nonfinite" and
    xAx = xᵀ(A + damping·I)x computed as xᵀ(b − r).
    """
    def op(v):
        out = matvec(v)
        return out + damping * v if damping else out

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - op(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = torch.dot(r, r)
    tol = max(rtol * float(torch.linalg.vector_norm(b)), atol)
    status = "maxiter"
    it = 0
    if float(rr) ** 0.5 <= tol:
        status = "converged"
    else:
        for it in range(1, maxiter + 1):
            Ap = op(p)
            pAp = torch.dot(p, Ap)
            if not torch.isfinite(pAp):
                status, it = "nonfinite", it - 1
                break
            if pAp <= 0:
                status, it = "nonpositive_curvature", it - 1
                break
            alpha = rr / pAp
            x = x + alpha * p
            r = r - alpha * Ap
            rr_new = torch.dot(r, r)
            if float(rr_new) ** 0.5 <= tol:
                rr = rr_new
                status = "converged"
                break
            p = r + (rr_new / rr) * p
            rr = rr_new
    xAx = torch.dot(x, b - r)
    return x, it, float(rr) ** 0.5, status, xAx


def conjugate_gradient_baseline(f_Ax, b, cg_iters=10, residual_tol=1e-10):
    """CG as TRPO libraries write it (e.g. the PyTorch ports of the original TRPO code): tensor
    scalars on b's device, the loop in Python, and one host read per iteration (the comparison of
    rᵀr with ``residual_tol``).  ``f_Ax`` includes any damping.  The baseline the benchmarks time."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = torch.dot(r, r)
    for _ in range(cg_iters):
        Ap = f_Ax(p)
        alpha = rdotr / torch.dot(p, Ap)
        x += alpha * p
        r -= alpha * Ap
        new_rdotr = torch.dot(r, r)
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
        if rdotr < residual_tol:
            break
    return x


# --- KL divergence and surrogate ----------------------------------------------------------------

_LOG_2PI = 1.8378770664093453


def _expand_log_std(log_std, mean):
    return log_std.expand_as(mean) if log_std.dim() == 1 else log_std


def mean_kl_diag_gaussian_reference(mean_old, log_std_old, mean_new, log_std_new):
    """Batch mean of KL(N(μ_old, σ_old²) ‖ N(μ_new, σ_new²)), summed over action dimensions."""
    lo = _expand_log_std(log_std_old, mean_old)
    ln = _expand_log_std(log_std_new, mean_new)
    var_ratio = torch.exp(2 * (lo - ln))
    kl = ln - lo + 0.5 * (var_ratio + (mean_old - mean_new) ** 2 * torch.exp(-2 * ln)) - 0.5
    return kl.sum(-1).mean()


def log_prob_diag_gaussian_reference(mean, log_std, actions):
    ls = _expand_log_std(log_std, mean)
    z = (actions - mean) * torch.exp(-ls)
    return (-0.5 * z * z - ls - 0.5 * _LOG_2PI).sum(-1)


def mean_kl_categorical_reference(logits_old, logits_new):
    """Batch mean of KL(Cat(softmax(logits_old)) ‖ Cat(softmax(logits_new)))."""
    lp_old = torch.log_softmax(logits_old, -1)
    lp_new = torch.log_softmax(logits_new, -1)
    return (lp_old.exp() * (lp_old - lp_new)).sum(-1).mean()


def surrogate_kl_diag_gaussian_reference(mean_old, log_std_old, mean_new, log_std_new, actions,
                                         logp_old, advantages):
    """(surrogate, mean_kl, max_kl) with surrogate = mean(exp(logπ_new(a) − logp_old) · A)."""
    lo = _expand_log_std(log_std_old, mean_old)
    ln = _expand_log_std(log_std_new, mean_new)
    kl = (ln - lo + 0.5 * (torch.exp(2 * (lo - ln)) + (mean_old - mean_new) ** 2 * torch.exp(-2 * ln))
          - 0.5).sum(-1)
    logp = log_prob_diag_gaussian_reference(mean_new, log_std_new, actions)
    surr = (torch.exp(logp - logp_old) * advantages).mean()
    return surr, kl.mean(), kl.max()


def surrogate_kl_categorical_reference(logits_old, logits_new, actions, logp_old, advantages):
    lp_old = torch.log_softmax(logits_old, -1)
    lp_new = torch.log_softmax(logits_new, -1)
    kl = (lp_old.exp() * (lp_old - lp_new)).sum(-1)
    logp = lp_new.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    surr = (torch.exp(logp - logp_old) * advantages).mean()
    return surr, kl.mean(), kl.max()


# --- networks as functions of θ (autograd references for the update's Jacobian products) ----------

def _functional(module, theta, x):
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    chunks = theta.split([p.numel() for p in module.parameters()])
    params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
    return torch.func.functional_call(module, params, (x,))


def reference_distribution(policy, theta, x):
    """A policy's distribution parameters for network input ``x`` as a function of a flat θ (its
    network's parameters in order, then the log-std), by autograd through the network."""
    n = policy.n_net_params
    out = _functional(policy.net, theta[:n], x)
    return (out, theta[n:]) if policy.gaussian else (out,)


def reference_values(value_fn, theta, x):
    """The critic's network output ``[B]`` (before the target scale σ) as a function of θ."""
    out = _functional(value_fn.net, theta, x)
    return out.squeeze(-1) if out.dim() == 2 else out
