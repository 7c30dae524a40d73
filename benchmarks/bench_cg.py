"""Fused CG (trpo_ext.conjugate_gradient) against the pure-PyTorch CG loop of TRPO libraries.

Both solve (D + damping·I) x = b with the same cheap matvec (a diagonal D, one elementwise product)
for n = 10⁴ … 10⁷.  Time per iteration excluding the matvec = (T(20 iterations) − T(0 iterations))
/ 20 − T(matvec): the difference removes the start and the end of the solve.  The bytes floor of one
iteration's vector work is 11 n elements (read p, Ap for pᵀAp; read r, Ap, p for r'ᵀr'; write r';
read and write x and p, read r' for the update); our kernels move 12 n (the residual pass does not
store r', the update pass recomputes it, so a breakdown can keep the last good x).

    PYTHONPATH=. python benchmarks/bench_cg.py [--device cpu|cuda] [--sizes 1e4,1e5,1e6,1e7] [--threads N]
"""
from __future__ import annotations

import argparse
import datetime

import torch

import trpo_ext
from trpo_ext._reference import conjugate_gradient_baseline

try:
    from benchmarks._common import describe_machine, measure_copy_bandwidth, print_table, timeit
except ImportError:  # run as a script from benchmarks/
    from _common import describe_machine, measure_copy_bandwidth, print_table, timeit

DAMPING = 0.1


def problem(n, dtype, device):
    g = torch.Generator().manual_seed(0)
    diag = (torch.rand(n, generator=g, dtype=torch.float64) * 9 + 1).to(dtype=dtype, device=device)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return diag, b


def bench_size(n, dtype, device, bandwidth):
    diag, b = problem(n, dtype, device)
    matvec = lambda v: diag * v  # noqa: E731
    baseline_op = lambda v: diag * v + DAMPING * v  # noqa: E731
    esize = torch.finfo(dtype).bits // 8

    # Correctness first: the same 10 iterations give the same x.
    ours = trpo_ext.conjugate_gradient(matvec, b, maxiter=10, rtol=0.0, damping=DAMPING)
    base = conjugate_gradient_baseline(baseline_op, b, 10)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ours.x, base, rtol=tol, atol=tol * base.abs().max().item())

    min_time = 0.3 if n <= 10**6 else 1.0

    # The least of three medians on the CPU, where other processes on a shared machine only ever add
    # time; one median on a GPU, whose timings do not suffer that (and whose lease is short).
    repeats = 1 if torch.device(device).type == "cuda" else 3

    def best(fn):
        return min(timeit(fn, device, min_time=min_time) for _ in range(repeats))

    t_mv = best(lambda: matvec(b))

    def per_iteration(solve):
        t20 = best(lambda: solve(20))
        t0 = best(lambda: solve(0))
        return max((t20 - t0) / 20 - t_mv, 1e-9)

    t_base = per_iteration(lambda k: conjugate_gradient_baseline(baseline_op, b, k))
    t_ours = per_iteration(lambda k: trpo_ext.conjugate_gradient(
        matvec, b, maxiter=k, rtol=0.0, damping=DAMPING, sync=False))
    t_tol = per_iteration(lambda k: trpo_ext.conjugate_gradient(
        matvec, b, maxiter=k, rtol=1e-30, damping=DAMPING))
    floor = 11 * n * esize
    moved = 12 * n * esize
    return [f"{n:.0e}", t_base * 1e6, t_ours * 1e6, t_base / t_ours, t_tol * 1e6, t_base / t_tol,
            floor / t_ours / 1e9, moved / t_ours / 1e9, moved / t_ours / bandwidth]


def bench_graph(device, dtype):
    diag, b = problem(10**4, dtype, device)
    solver = trpo_ext.CGGraph(lambda v: diag * v, b, maxiter=10, damping=DAMPING)
    ref = trpo_ext.conjugate_gradient(lambda v: diag * v, b, maxiter=10, rtol=0.0, damping=DAMPING)
    torch.testing.assert_close(solver.replay(sync=False).x, ref.x)
    t = timeit(lambda: solver.graph.replay(), device, min_time=0.5)
    print(f"\nCUDA graph replay of a whole 10-iteration solve (n = 1e4, diagonal matvec): {t * 1e6:.1f} µs")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both solvers (default: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    bandwidth = measure_copy_bandwidth(device)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}  {describe_machine(device)}  {args.dtype}  "
          f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s  damping {DAMPING}")
    print("µs per iteration, matvec excluded; baseline = Python CG loop of TRPO libraries "
          "(one host read per iteration)")
    rows = [bench_size(n, dtype, device, bandwidth) for n in sizes]
    print_table(["n", "baseline µs", "ours µs (rtol=0)", "speedup", "ours µs (rtol>0)",
                 "speedup", "floor GB/s", "moved GB/s", "moved / copy bw"], rows)
    if torch.device(device).type == "cuda":
        bench_graph(device, dtype)


if __name__ == "__main__":
    main()
