"""Shared benchmark helpers: timing, the machine's measured memory bandwidth, table printing."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, List, Sequence

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device="cpu", *, min_time=0.2, batches=5, max_reps=10_000,
           warmup=2) -> float:
    """Median seconds per call of ``fn`` over ``batches`` timed batches (after ``warmup`` calls);
    each batch repeats ``fn`` enough times to last about ``min_time / 5``."""
    for _ in range(warmup):
        fn()
    sync(device)
    # Calibrate a batch size that takes ~min_time / 5, then take the median of several batches.
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_time / 5 or n >= max_reps:
            break
        n = min(max_reps, n * 2 if dt == 0 else max(n + 1, int(n * (min_time / 5) / dt)))
    if dt >= 10 * min_time:  # a single call already takes long: that measurement will do
        return dt / n
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def measure_copy_bandwidth(device="cpu", nbytes=256 * 2**20) -> float:
    """Bytes/s moved by a large device-local copy (read + write counted), the machine's practical
    memory bandwidth that the benchmarks measure themselves against."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, min_time=0.5)
    return 2 * n * 4 / t


def describe_machine(device="cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
            f"(torch {torch.__version__})")


def print_table(headers: Sequence[str], rows: List[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(x) -> str:
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.1f}"
        return f"{x:.3e}"
    return str(x)
