"""Benchmark: trpo_ext's KL ops against torch.distributions, at TRPO's batch sizes.

One table, ours vs torch.distributions, at B = 2,048 and B = 50,000 rows (float32, state-independent
log_std ``[A]``), the same work on both sides, each pair checked to agree before it is timed:

* ``kl``: the batch-mean KL(old ‖ new) — ``kl_divergence(old, new).mean()`` of
  ``Independent(Normal)`` / ``Categorical`` objects (``validate_args=False``, the faster setting);
* ``surr+kl``: the line search's pass (surrogate, mean KL, max KL) — the same objects' ``log_prob``
  for the surrogate plus the KL's mean and max;
* ``backward``: the gradient of surrogate + mean KL w.r.t. the new distribution's parameters — our
  backward op (what autograd calls) against torch's backward pass over a recorded graph;
* ``fwd+bwd (autograd)``: forward and that gradient by ``torch.autograd.grad`` on both sides, as a
  caller sees it (our side pays the Python of the ops' autograd registration);
* ``fisher``: the Fisher metric applied to a direction (our ``fisher_metric_*`` op) against the
  Hessian-vector product of torch.distributions' mean KL at new = old (double backward), the same
  numbers;
* ``fvp kl (autograd)``: that Hessian-vector product through our ``mean_kl_*`` op (its second-order
  autograd formula is written in torch operations, not a kernel), for reference.

Timings alternate ours and the baseline and keep each one's best of ``--repeats`` medians, so a
noisy shared machine disturbs both alike.

    PYTHONPATH=. python benchmarks/bench_kl.py [--device cpu|cuda] [--threads N] [--repeats R]
                                                [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
from torch.distributions import Categorical, Independent, Normal, kl_divergence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trpo_ext  # noqa: E402
from benchmarks._common import describe_machine, print_table, timeit  # noqa: E402

BATCHES = [2048, 50_000]
ACTION_DIMS = [1, 6, 17]
CLASSES = [2, 18]


def gaussian_case(B, A, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mo = torch.randn(B, A, generator=g)
    mn = mo + 0.05 * torch.randn(B, A, generator=g)
    lo = -0.5 + 0.1 * torch.randn(A, generator=g)
    ln = lo + 0.02 * torch.randn(A, generator=g)
    act = mo + lo.exp() * torch.randn(B, A, generator=g)
    lp = Independent(Normal(mo.double(), lo.double().exp()), 1).log_prob(act.double())
    adv = torch.randn(B, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (mo, lo, mn, ln, act, lp, adv)]


def categorical_case(B, K, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(B, K, generator=g)
    ln = lo + 0.05 * torch.randn(B, K, generator=g)
    act = torch.multinomial(torch.softmax(lo, -1), 1, generator=g).squeeze(-1)
    lp = torch.log_softmax(lo.double(), -1).gather(-1, act[:, None]).squeeze(-1)
    adv = torch.randn(B, generator=g)
    return [lo.to(device, dtype), ln.to(device, dtype), act.to(device), lp.to(device, dtype),
            adv.to(device, dtype)]


# --- torch.distributions -----------------------------------------------------------------------

def _normal(mean, log_std):
    return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)


def _categorical(logits):
    return Categorical(logits=logits, validate_args=False)


def torch_kl_gaussian(mo, lo, mn, ln):
    return kl_divergence(_normal(mo, lo), _normal(mn, ln)).mean()


def torch_surrogate_gaussian(mo, lo, mn, ln, act, lp, adv):
    old, new = _normal(mo, lo), _normal(mn, ln)
    kl = kl_divergence(old, new)
    return (torch.exp(new.log_prob(act) - lp) * adv).mean(), kl.mean(), kl.max()


def torch_kl_categorical(lo, ln):
    return kl_divergence(_categorical(lo), _categorical(ln)).mean()


def torch_surrogate_categorical(lo, ln, act, lp, adv):
    old, new = _categorical(lo), _categorical(ln)
    kl = kl_divergence(old, new)
    return (torch.exp(new.log_prob(act) - lp) * adv).mean(), kl.mean(), kl.max()


# --- the cases: (name, width, ours, baseline) ----------------------------------------------------

def grad_fn(surrogate_fn, const, params):
    """surrogate + mean KL, differentiated w.r.t. the new distribution's parameters."""
    def f():
        xs = [p.clone().requires_grad_() for p in params]
        s, k, _ = surrogate_fn(*const(xs))
        return torch.autograd.grad(s + k, xs)
    return f


def backward_fn(surrogate_fn, const, params):
    """torch's backward pass alone, over a graph recorded once."""
    xs = [p.clone().requires_grad_() for p in params]
    s, k, _ = surrogate_fn(*const(xs))
    out = s + k
    return lambda: torch.autograd.grad(out, xs, retain_graph=True)


def hvp_fn(kl_fn, old, v):
    """The Hessian-vector product of the mean KL at new = old (double backward)."""
    def f():
        xs = [p.clone().requires_grad_() for p in old]
        gs = torch.autograd.grad(kl_fn(*old, *xs), xs, create_graph=True)
        return torch.autograd.grad(sum((g * u).sum() for g, u in zip(gs, v)), xs)
    return f


def cases(B, device):
    for A in ACTION_DIMS:
        mo, lo, mn, ln, act, lp, adv = gaussian_case(B, A, device)
        v = (torch.randn_like(mo), torch.randn_like(lo))
        yield ("kl gauss", A, lambda: trpo_ext.mean_kl_diag_gaussian(mo, lo, mn, ln),
               lambda: torch_kl_gaussian(mo, lo, mn, ln))
        yield ("surr+kl gauss", A,
               lambda: trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv),
               lambda: torch_surrogate_gaussian(mo, lo, mn, ln, act, lp, adv))
        const = lambda xs: (mo, lo, xs[0], xs[1], act, lp, adv)  # noqa: E731
        one = torch.ones((), device=device)
        yield ("backward gauss", A,
               lambda: torch.ops.trpo_ext.kl_diag_gaussian_backward(one, one, mo, lo, mn, ln, act,
                                                                    lp, adv),
               backward_fn(torch_surrogate_gaussian, const, (mn, ln)))
        yield ("fwd+bwd gauss (autograd)", A,
               grad_fn(trpo_ext.surrogate_kl_diag_gaussian, const, (mn, ln)),
               grad_fn(torch_surrogate_gaussian, const, (mn, ln)))
        yield ("fisher gauss", A, lambda: trpo_ext.fisher_metric_diag_gaussian(lo, *v),
               hvp_fn(torch_kl_gaussian, (mo, lo), v))
        yield ("fvp kl gauss (autograd)", A, hvp_fn(trpo_ext.mean_kl_diag_gaussian, (mo, lo), v),
               hvp_fn(torch_kl_gaussian, (mo, lo), v))
    for K in CLASSES:
        lo, ln, act, lp, adv = categorical_case(B, K, device)
        u = torch.randn_like(lo)
        yield ("kl cat", K, lambda: trpo_ext.mean_kl_categorical(lo, ln),
               lambda: torch_kl_categorical(lo, ln))
        yield ("surr+kl cat", K, lambda: trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv),
               lambda: torch_surrogate_categorical(lo, ln, act, lp, adv))
        const = lambda xs: (lo, xs[0], act, lp, adv)  # noqa: E731
        one = torch.ones((), device=device)
        yield ("backward cat", K,
               lambda: torch.ops.trpo_ext.kl_categorical_backward(one, one, lo, ln, act, lp, adv),
               backward_fn(torch_surrogate_categorical, const, (ln,)))
        yield ("fwd+bwd cat (autograd)", K,
               grad_fn(trpo_ext.surrogate_kl_categorical, const, (ln,)),
               grad_fn(torch_surrogate_categorical, const, (ln,)))
        yield ("fisher cat", K, lambda: trpo_ext.fisher_metric_categorical(lo, u),
               hvp_fn(torch_kl_categorical, (lo,), (u,)))
        yield ("fvp kl cat (autograd)", K, hvp_fn(trpo_ext.mean_kl_categorical, (lo,), (u,)),
               hvp_fn(torch_kl_categorical, (lo,), (u,)))


def check(ours, ref, what):
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    assert len(ours) == len(ref), what
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r.double(), rtol=2e-4, atol=1e-5,
                                   msg=lambda m: f"{what}: {m}")


def run(device: str, repeats: int, batches=BATCHES) -> list:
    print(f"# bench_kl on {device}: {describe_machine(device)}; "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    rows = []
    for B in batches:
        for name, width, ours, base in cases(B, device):
            check(ours(), base(), f"{name} B={B} {width}")
            t_ours = t_base = float("inf")
            for _ in range(repeats):
                t_ours = min(t_ours, timeit(ours, device))
                t_base = min(t_base, timeit(base, device))
            rows.append([name, B, width, t_ours * 1e6, t_base * 1e6, t_base / t_ours])
    print_table(["op", "B", "A/K", "ours us", "torch.distributions us", "ratio"], rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating timings of each pair; the best of each is kept")
    parser.add_argument("--quick", action="store_true",
                        help="B = 2,048 only, one timing per pair (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else (
        ["cpu"] + (["cuda"] if trpo_ext.build_info()["cuda_available"] else []))
    for d in devices:
        run(d, 1 if args.quick else args.repeats, BATCHES[:1] if args.quick else BATCHES)


if __name__ == "__main__":
    main()
