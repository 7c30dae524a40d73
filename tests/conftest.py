import pytest
import torch

import trpo_ext

CUDA = trpo_ext.build_info()["cuda_available"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a GPU and a CUDA build of trpo_ext"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
