"""GAE as pytest-benchmark tests (not part of the default test run, which collects tests/ only):

    python -m pytest benchmarks/test_bench_gae.py --benchmark-only
"""
import pytest
import torch

import trpo_ext
from trpo_ext._reference import gae_baseline

from bench_gae import make_inputs

CASES = [(2048, 1), (2048, 16), (1024, 1024)]


@pytest.mark.parametrize("T,N", CASES, ids=[f"{t}x{n}" for t, n in CASES])
def test_gae_trpo_ext(benchmark, T, N):
    args = make_inputs(T, N, torch.float32, "cpu")
    adv, _ = benchmark(trpo_ext.gae, *args, 0.99, 0.95)
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("T,N", CASES, ids=[f"{t}x{n}" for t, n in CASES])
def test_gae_baseline_loop(benchmark, T, N):
    args = make_inputs(T, N, torch.float32, "cpu")
    expected = trpo_ext.gae(*args, 0.99, 0.95)
    got = benchmark.pedantic(gae_baseline, args=(*args, 0.99, 0.95), rounds=3, iterations=1)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
