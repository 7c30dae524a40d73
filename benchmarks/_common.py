"""Shared benchmark helpers: timing, the machine's measured memory bandwidth, table printing."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import statistics
import time
from typing import Callable, List, Sequence

import torch


def _steady_allocator() -> str:
    """Keeps glibc from handing large freed blocks back to the OS between timed calls.

    By default glibc serves a multi-MiB tensor from fresh mmap'd pages, or trims the heap when it is
    freed, so each call of an op that returns such tensors pays first-touch page faults (several ms
    per 8 MiB on the project's VM, whichever kernel writes the pages), and the timing measures the
    hypervisor rather than the kernel.  Raising the mmap threshold to its maximum (32 MiB) and the
    trim threshold to 1 GiB makes same-size allocations reuse memory, as a caching allocator or a
    long training loop does.  It applies to ours, the baselines and the copy yardstick alike.
    ``TRPO_EXT_BENCH_FRESH_PAGES=1`` leaves glibc's defaults.  Returns what was done, for the header.
    """
    if os.environ.get("TRPO_EXT_BENCH_FRESH_PAGES") == "1":
        return "glibc defaults (fresh pages)"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return "allocator defaults (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 32 * 2**20) == 1 and mallopt(m_trim_threshold, 2**30) == 1
    return "glibc: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "mallopt refused"


ALLOCATOR = _steady_allocator()


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


def cuda_graph_time(fn: Callable[[], object], *, calls=20, replays=7, warmup=3) -> float:
    """Median seconds per call of ``fn``'s GPU work without the host: ``calls`` calls captured in one
    CUDA graph (after ``warmup`` calls on a side stream, as torch.cuda.graph's documentation asks),
    each of ``replays`` replays timed with CUDA events and divided by ``calls``.  Raises whatever
    the capture raises (an op that synchronises, for one)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay also uploads the graph
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / calls)
    del graph
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
            f"(torch {torch.__version__}; allocator: {ALLOCATOR})")


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


def sb3_returns(model, env_id: str, reset_seeds: Sequence[int]) -> List[float]:
    """An sb3 model's deterministic episode returns on ``env_id``, one episode per reset seed."""
    import gymnasium as gym

    returns = []
    env = gym.make(env_id)
    try:
        for seed in reset_seeds:
            obs, _ = env.reset(seed=seed)
            total, done = 0.0, False
            while not done:
                action, _ = model.predict(obs, deterministic=True)
                obs, r, terminated, truncated, _ = env.step(action)
                total += float(r)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns
