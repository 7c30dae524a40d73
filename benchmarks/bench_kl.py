"""Benchmark: trpo_ext's fused KL / surrogate ops against the pure-PyTorch way.

Baseline: torch.distributions objects built from the network's outputs (Independent(Normal) for
Gaussian policies, Categorical for discrete ones; ``validate_args=False``, which is the faster
setting) and ``kl_divergence(old, new).mean()``; the line search's pass is the same objects'
``log_prob`` for the surrogate plus the KL mean and max.  Inputs float32, state-independent
log_std ``[A]``.

Bytes floor: every input read once (means/actions/logits ``[B, ·]``, logp_old and advantages
``[B]``, int64 actions ``[B]``).  "% bw" compares that floor's rate with the device's measured copy
bandwidth (``benchmarks/_common.measure_copy_bandwidth``, read + write counted).

On CUDA, "graph us" is our op's GPU time alone: 20 calls captured in one CUDA graph, the median
replay time divided by 20 (``benchmarks/_common.cuda_graph_time``); "ours us" loops calls from
Python without synchronising, so below ~20 us it measures the host's dispatch and launch, not the
kernel. "% bw (graph)" is the bytes floor's rate at the graph time. Batches that fit the L2 cache
(B ≤ 65536) stay there across replays, so their graph rate can exceed the memory bandwidth. Rows of
at most 32 elements run the tiled CUDA kernels unless ``TRPO_EXT_KL_CUDA_TILES=0`` (G-lane
kernels): run the benchmark once each way to compare them.

Math floor: the exponentials and logarithms an op cannot avoid (categorical: one exp per logit of
each distribution and one log per row of each, plus the surrogate's exp per row — for K = 2, whose
closed form needs exp(−|ℓ₁ − ℓ₀|) of each distribution and one log, two exps and one log per row,
plus one of each for the surrogate; Gaussian: the surrogate's exp per row), each costed at torch's own vectorised ``exp`` / ``log`` rate per element,
measured at start-up on 10⁶ float32 elements.  Where it exceeds the bytes floor the op is bound by
arithmetic rather than memory; "% floor" is max(bytes floor time, math floor) over our time.  CPU
only: on a GPU torch's exp over 10⁶ elements is a launch and a pass over memory, not a rate of the
special-function units, so the GPU table has the graph columns instead.

    PYTHONPATH=. python benchmarks/bench_kl.py [--device cpu|cuda] [--quick]
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
from benchmarks._common import (  # noqa: E402
    cuda_graph_time, describe_machine, measure_copy_bandwidth, print_table, timeit)

BATCHES = [2048, 65536, 1_000_000]
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


# --- the pure-PyTorch way ------------------------------------------------------------------------

def _normal(mean, log_std):
    return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)


def baseline_kl_gaussian(mo, lo, mn, ln):
    return kl_divergence(_normal(mo, lo), _normal(mn, ln)).mean()


def baseline_surrogate_gaussian(mo, lo, mn, ln, act, lp, adv):
    old, new = _normal(mo, lo), _normal(mn, ln)
    kl = kl_divergence(old, new)
    surrogate = (torch.exp(new.log_prob(act) - lp) * adv).mean()
    return surrogate, kl.mean(), kl.max()


def baseline_kl_categorical(lo, ln):
    return kl_divergence(Categorical(logits=lo, validate_args=False),
                         Categorical(logits=ln, validate_args=False)).mean()


def baseline_surrogate_categorical(lo, ln, act, lp, adv):
    old = Categorical(logits=lo, validate_args=False)
    new = Categorical(logits=ln, validate_args=False)
    kl = kl_divergence(old, new)
    surrogate = (torch.exp(new.log_prob(act) - lp) * adv).mean()
    return surrogate, kl.mean(), kl.max()


def check(ours, ref, what):
    ours = ours if isinstance(ours, tuple) else (ours,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r.double(), rtol=2e-4, atol=1e-5,
                                   msg=lambda m: f"{what}: {m}")


def measure_math_rates(device: str, n: int = 1_000_000):
    """Seconds per element of torch's float32 ``exp`` and ``log`` on ``device`` (outputs preallocated)."""
    x = torch.empty(n, device=device).uniform_(-10.0, 0.0)
    y = torch.empty_like(x)
    pos = x.neg().add_(1.0)
    t_exp = timeit(lambda: torch.exp(x, out=y), device)
    t_log = timeit(lambda: torch.log(pos, out=y), device)
    return t_exp / n, t_log / n


def run(device: str, quick: bool) -> None:
    batches = BATCHES[:2] if quick else BATCHES
    on_gpu = torch.device(device).type == "cuda"
    bw = measure_copy_bandwidth(device)
    print(f"# bench_kl on {device}: {describe_machine(device)}")
    if on_gpu:
        # No math floor on a GPU: torch's exp over 10⁶ elements there measures a launch and a pass
        # over memory, not the special-function units (seen on an H200: a "floor" 2× our time).
        t_exp = t_log = 0.0
        print(f"# measured copy bandwidth {bw / 1e9:.1f} GB/s; "
              f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    else:
        t_exp, t_log = measure_math_rates(device)
        print(f"# measured copy bandwidth {bw / 1e9:.1f} GB/s; torch exp {t_exp * 1e9:.2f} ns and "
              f"log {t_log * 1e9:.2f} ns per float32 element; "
              f"{datetime.datetime.now():%Y-%m-%d %H:%M}")
    if on_gpu:
        tiles = os.environ.get("TRPO_EXT_KL_CUDA_TILES", "1") != "0"
        print(f"# forward kernels for rows of <= 32 elements: "
              f"{'tiled' if tiles else 'G-lane (TRPO_EXT_KL_CUDA_TILES=0)'}")
    headers = ["op", "B", "A/K", "ours us", "baseline us", "speedup", "floor MB", "ours GB/s",
               "% bw"] + (["graph us", "% bw (graph)"] if on_gpu else ["math floor us", "% floor"])
    rows = []

    def graph_cells(ours_fn, nbytes):
        try:
            t = cuda_graph_time(ours_fn)
        except Exception as e:  # noqa: BLE001  the table says what went wrong, the run goes on
            first_line = (str(e).strip().splitlines() or [""])[0]
            return [f"capture failed: {type(e).__name__}: {first_line[:100]}", ""]
        return [t * 1e6, 100 * nbytes / t / bw]

    def add(op, B, width, nbytes, ours_fn, base_fn, n_exp=0, n_log=0):
        check(ours_fn(), base_fn(), f"{op} B={B} {width}")
        t_ours = timeit(ours_fn, device)
        t_base = timeit(base_fn, device)
        rate = nbytes / t_ours
        math_floor = n_exp * t_exp + n_log * t_log
        floor = max(nbytes / bw, math_floor)
        rows.append([op, B, width, t_ours * 1e6, t_base * 1e6, t_base / t_ours, nbytes / 1e6,
                     rate / 1e9, 100 * rate / bw]
                    + (graph_cells(ours_fn, nbytes) if on_gpu
                       else [math_floor * 1e6, 100 * floor / t_ours]))

    el = 4  # float32
    for B in batches:
        for A in ACTION_DIMS:
            mo, lo, mn, ln, act, lp, adv = gaussian_case(B, A, device)
            kl_bytes = 2 * B * A * el + 2 * A * el
            add("kl gauss", B, A, kl_bytes, lambda: trpo_ext.mean_kl_diag_gaussian(mo, lo, mn, ln),
                lambda: baseline_kl_gaussian(mo, lo, mn, ln))
            add("surr+kl gauss", B, A, kl_bytes + B * A * el + 2 * B * el,
                lambda: trpo_ext.surrogate_kl_diag_gaussian(mo, lo, mn, ln, act, lp, adv),
                lambda: baseline_surrogate_gaussian(mo, lo, mn, ln, act, lp, adv), n_exp=B)
        for K in CLASSES:
            lo, ln, act, lp, adv = categorical_case(B, K, device)
            kl_bytes = 2 * B * K * el
            n_exp, n_log = (2 * B, B) if K == 2 else (2 * B * K, 2 * B)
            add("kl cat", B, K, kl_bytes, lambda: trpo_ext.mean_kl_categorical(lo, ln),
                lambda: baseline_kl_categorical(lo, ln), n_exp=n_exp, n_log=n_log)
            add("surr+kl cat", B, K, kl_bytes + B * 8 + 2 * B * el,
                lambda: trpo_ext.surrogate_kl_categorical(lo, ln, act, lp, adv),
                lambda: baseline_surrogate_categorical(lo, ln, act, lp, adv),
                n_exp=n_exp + B, n_log=n_log + (B if K == 2 else 0))
    print_table(headers, rows)

    # The update's other two uses: the policy gradient (backward of the surrogate) and one
    # Fisher-vector product (double backward of the mean KL at θ_old), w.r.t. the distribution
    # parameters directly (a network would add its own backward to both sides).
    print(f"\n# gradient and FVP w.r.t. the distribution parameters ({device})")
    grows = []
    for B in batches[:2]:
        mo, lo, mn, ln, act, lp, adv = gaussian_case(B, 6, device)
        mn_, ln_ = mn.clone().requires_grad_(), ln.clone().requires_grad_()
        v = (torch.randn_like(mn), torch.randn_like(ln))

        def grad_ours():
            return torch.autograd.grad(trpo_ext.surrogate_kl_diag_gaussian(
                mo, lo, mn_, ln_, act, lp, adv)[0], (mn_, ln_))

        def grad_base():
            return torch.autograd.grad(baseline_surrogate_gaussian(
                mo, lo, mn_, ln_, act, lp, adv)[0], (mn_, ln_))

        def fvp(kl_fn):
            def f():
                a, b = mo.clone().requires_grad_(), lo.clone().requires_grad_()
                ga, gb = torch.autograd.grad(kl_fn(mo, lo, a, b), (a, b), create_graph=True)
                return torch.autograd.grad((ga * v[0]).sum() + (gb * v[1]).sum(), (a, b))
            return f

        for name, o, b in (("grad surr gauss", grad_ours, grad_base),
                           ("fvp kl gauss", fvp(trpo_ext.mean_kl_diag_gaussian),
                            fvp(baseline_kl_gaussian))):
            check(tuple(o()), tuple(b()), name)
            t_o, t_b = timeit(o, device), timeit(b, device)
            grows.append([name, B, 6, t_o * 1e6, t_b * 1e6, t_b / t_o])
        lo_c, ln_c, act_c, lp_c, adv_c = categorical_case(B, 18, device)
        x = ln_c.clone().requires_grad_()
        vc = torch.randn_like(x)

        def grad_cat(fn):
            return lambda: torch.autograd.grad(fn(lo_c, x, act_c, lp_c, adv_c)[0], (x,))

        def fvp_cat(kl_fn):
            def f():
                a = lo_c.clone().requires_grad_()
                (ga,) = torch.autograd.grad(kl_fn(lo_c, a), (a,), create_graph=True)
                return torch.autograd.grad((ga * vc).sum(), (a,))
            return f

        for name, o, b in (("grad surr cat", grad_cat(trpo_ext.surrogate_kl_categorical),
                            grad_cat(baseline_surrogate_categorical)),
                           ("fvp kl cat", fvp_cat(trpo_ext.mean_kl_categorical),
                            fvp_cat(baseline_kl_categorical))):
            check(tuple(o()), tuple(b()), name)
            t_o, t_b = timeit(o, device), timeit(b, device)
            grows.append([name, B, 18, t_o * 1e6, t_b * 1e6, t_b / t_o])
    print_table(["op", "B", "A/K", "ours us", "baseline us", "speedup"], grows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both if available)")
    parser.add_argument("--quick", action="store_true", help="skip B = 1e6")
    args = parser.parse_args()
    devices = [args.device] if args.device else (
        ["cpu"] + (["cuda"] if trpo_ext.build_info()["cuda_available"] else []))
    for d in devices:
        run(d, args.quick)


if __name__ == "__main__":
    main()
