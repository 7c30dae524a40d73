"""GAE: trpo_ext.gae against the loop RL libraries write (a reversed Python loop over [N] rows).

    python benchmarks/bench_gae.py [--device cpu|cuda] [--dtype float32|float64] [--quick]

Checks agreement first, then prints time, speedup and achieved bandwidth.  The bytes floor counts the
five inputs read once and the two outputs written once (masks as bool, 1 byte each); "% of copy" is the
floor's GB/s over a large device copy's, measured in the same run.  On CUDA, "graph us" is the op's
GPU time alone (20 calls captured in a CUDA graph, replays timed with events): a loop of calls from
Python measures the host's ~20 µs per call at the small shapes.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trpo_ext  # noqa: E402
from trpo_ext._reference import gae_baseline  # noqa: E402

from _common import (cuda_graph_time, describe_machine, measure_copy_bandwidth,  # noqa: E402
                     print_table, timeit)

SHAPES = [(2048, 1), (2048, 16), (1024, 1024)]
# On a GPU also a batch large enough (370 MB of traffic) that one call's host cost is small beside
# the kernel: the "(1024, 1024) and larger".
GPU_SHAPES = SHAPES + [(4096, 4096)]


def make_inputs(T, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (T, N)
    r = torch.randn(shape, generator=g, dtype=dtype)
    v = torch.randn(shape, generator=g, dtype=dtype)
    nv = torch.randn(shape, generator=g, dtype=dtype)
    term = torch.rand(shape, generator=g) < 0.01
    done = term | (torch.rand(shape, generator=g) < 0.01)
    return [t.to(device) for t in (r, v, nv, term, done)]


def floor_bytes(T, N, dtype):
    item = torch.finfo(dtype).bits // 8
    return T * N * (3 * item + 2 * 1 + 2 * item)


def run(device="cpu", dtype=torch.float32, shapes=SHAPES, baseline_max_t=None):
    bw = measure_copy_bandwidth(device)
    on_gpu = torch.device(device).type == "cuda"
    print(f"GAE benchmark on {describe_machine(device)}, {dtype}; copy bandwidth {bw / 1e9:.1f} GB/s")
    rows = []
    for T, N in shapes:
        args = make_inputs(T, N, dtype, device)
        ours = trpo_ext.gae(*args, 0.99, 0.95)
        time_baseline = baseline_max_t is None or T <= baseline_max_t
        if time_baseline:
            ref = gae_baseline(*args, 0.99, 0.95)
        else:  # the loop would take minutes here: check against our CPU op (tested against it)
            ref = [x.to(ours[0].device) for x in trpo_ext.gae(*[a.cpu() for a in args], 0.99, 0.95)]
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, **tol)
        t_ours = timeit(lambda: trpo_ext.gae(*args, 0.99, 0.95), device)
        if time_baseline:
            t_base = timeit(lambda: gae_baseline(*args, 0.99, 0.95), device, min_time=0.3,
                            warmup=1 if T * N > 100_000 else 2)
            speedup = t_base / t_ours
        else:
            t_base, speedup = float("nan"), float("nan")
        gbs = floor_bytes(T, N, dtype) / t_ours
        row = [f"({T}, {N})", t_base * 1e3, t_ours * 1e3, speedup, gbs / 1e9, 100 * gbs / bw]
        if on_gpu:  # the kernel's own time, without the host's per-call cost
            try:
                t_graph = cuda_graph_time(lambda: trpo_ext.gae(*args, 0.99, 0.95))
                row += [t_graph * 1e6, 100 * floor_bytes(T, N, dtype) / t_graph / bw]
            except Exception as e:  # noqa: BLE001  the table says what went wrong, the run goes on
                row += [f"capture failed: {type(e).__name__}", ""]
        rows.append(row)
    headers = ["T, N", "baseline ms", "trpo_ext ms", "speedup", "floor GB/s", "% of copy"]
    if on_gpu:
        headers += ["graph us", "% of copy (graph)"]
    print_table(headers, rows)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    p.add_argument("--baseline-max-t", type=int, default=None,
                   help="time the baseline only where T is at most this (default: always on the CPU, "
                        "T <= 100000 on CUDA, where the loop launches ~8 kernels per step)")
    a = p.parse_args()
    on_gpu = torch.device(a.device).type == "cuda"
    shapes = [(2048, 1), (2048, 16)] if a.quick else (GPU_SHAPES if on_gpu else SHAPES)
    max_t = a.baseline_max_t
    if max_t is None and on_gpu:
        max_t = 100_000
    run(a.device, getattr(torch, a.dtype), shapes, max_t)


if __name__ == "__main__":
    main()
