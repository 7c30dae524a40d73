import pytest
import torch

import trpo_ext

CUDA = trpo_ext.build_info()["cuda_available"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a GPU and a CUDA build of trpo_ext"))]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: learning tests that train for a while")
    config.addinivalue_line("markers", "benchmark_suite: benchmarks (not part of the default run)")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
