"""The C++ embedding: build the CMake project against the pip torch, run its ctest (the example
program solves SPD systems; the installed package is found by a separate project), and — marked
slow — build the same example against the CMake package shipped inside the Python package."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import trpo_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


def run(cmd, cwd=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def jobs():
    return str(max(1, min(2, os.cpu_count() or 1)))


def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"])
    run(["cmake", "--build", str(build), "-j", jobs()])
    out = run(["ctest", "--output-on-failure"], cwd=build)
    assert "100% tests passed" in out and "solve_spd" in out and "package_find_and_run" in out


@pytest.mark.slow
def test_python_package_find_package(tmp_path):
    config = os.path.join(trpo_ext.cmake_prefix_path, "trpo_ext", "trpo_extConfig.cmake")
    if not os.path.isfile(config):
        pytest.skip("trpo_ext/share/ is written by setup.py's build_ext; build the extension first")
    build = tmp_path / "example"
    prefix = f"{trpo_ext.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    cuda = [f"-DCUDA_TOOLKIT_ROOT_DIR={d}" for d in [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
            if d and os.path.isfile(os.path.join(d, "bin", "nvcc"))][:1]
    if cuda:
        cuda += [f"-DCMAKE_CUDA_COMPILER={cuda[0].split('=', 1)[1]}/bin/nvcc"]
    run(["cmake", "-S", os.path.join(ROOT, "examples", "cpp"), "-B", str(build),
         "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_CUDA_STANDARD=17",
         "-DTORCH_CUDA_ARCH_LIST=8.0;9.0", *cuda])
    run(["cmake", "--build", str(build), "-j", jobs()])
    out = run([str(build / "trpo_ext_solve_spd")])
    assert "all checks passed" in out
