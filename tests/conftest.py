import os
import subprocess
import sys

import pytest
import torch

import trpo_ext

CUDA = trpo_ext.build_info()["cuda_available"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a GPU and a CUDA build of trpo_ext"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


TESTS = os.path.dirname(os.path.abspath(__file__))


def run_with_env(variables: dict, script: str, timeout: float = 600) -> None:
    """Runs ``script`` (Python source) in a fresh interpreter with the environment variables
    ``variables`` added (trpo_ext reads its switches once per process), the repository and
    ``tests/`` importable.  The script hands its results back through a file."""
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(TESTS), TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=timeout)
