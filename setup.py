"""Build script for trpo_ext: one torch extension module, ``trpo_ext._C``.

CUDA is compiled when torch is a CUDA build and a CUDA toolkit is found; ``TRPO_EXT_CUDA=0`` forces a
CPU-only build and ``TRPO_EXT_CUDA=1`` makes a missing toolkit an error.  The decision never looks at
``torch.cuda.is_available()``: the machines that build this project have no GPU.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _fix_cuda_home():
    # torch.utils.cpp_extension finds the toolkit from CUDA_HOME, else from the first `nvcc` on PATH.
    # Where that nvcc is a wrapper script outside the toolkit (/usr/local/bin/nvcc here), torch would
    # take /usr/local as the toolkit and linking could not find cudart.  Point it at a real toolkit
    # before cpp_extension is imported, since it reads the variable at import time.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A shell wrapper (`exec /path/to/nvcc "$@"`): follow the path it execs.
        try:
            with open(nvcc, "r", errors="ignore") as f:
                head = f.read(4096)
            for token in head.split():
                if token.endswith("/bin/nvcc") and os.path.isfile(token):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and (
            glob.glob(os.path.join(root, "lib64", "libcudart*"))
            or glob.glob(os.path.join(root, "targets", "*", "lib", "libcudart*"))
        ):
            os.environ["CUDA_HOME"] = root
            return


_fix_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    mode = os.environ.get("TRPO_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"TRPO_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not have:
        raise SystemExit(
            "TRPO_EXT_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
        )
    return have


def _nvcc_version():
    import re
    import subprocess

    out = subprocess.run(
        [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself
    # is compiled with OpenMP (the runtime is torch's own libgomp, already loaded).
    # -fno-trapping-math: lets the vectoriser evaluate both arms of a select (GAE's bootstrap); it
    # changes no result, unlike fast math, which stays off.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp", "-fno-trapping-math"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("TRPO_EXT_WITH_CUDA", "1"))
        # sm_80 and sm_90 plus PTX for newer cards, unless the user chose.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        define_macros.append(("TRPO_EXT_CUDA_ARCHS", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"'))
        define_macros.append(("TRPO_EXT_CUDA_VERSION", '"' + _nvcc_version() + '"'))
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="trpo_ext._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc"), os.path.join(HERE, "include")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


VERSION = "0.1.0"

# The C++ embedding shipped inside the Python package (trpo_ext/share/, `trpo_ext.cmake_prefix_path`):
# a CMake package config that builds the solver from these sources in the consumer's project.
_SHIPPED_SOURCES = ["include/trpo_ext/cg.h", "csrc/common.h", "csrc/cg.h", "csrc/cg_solver.cpp",
                    "csrc/cpu/cg_cpu.cpp", "csrc/cuda/cg_cuda.cu",
                    "csrc/cuda/cuda_utils.cuh"]


def _ship_cmake_package(package_dir):
    share = os.path.join(package_dir, "share")
    cmake_dir = os.path.join(share, "cmake", "trpo_ext")
    os.makedirs(cmake_dir, exist_ok=True)
    shutil.copyfile(os.path.join(HERE, "cmake", "python", "trpo_extConfig.cmake"),
                    os.path.join(cmake_dir, "trpo_extConfig.cmake"))
    with open(os.path.join(HERE, "cmake", "python", "trpo_extConfigVersion.cmake")) as f:
        version_file = f.read().replace("@TRPO_EXT_VERSION@", VERSION)
    with open(os.path.join(cmake_dir, "trpo_extConfigVersion.cmake"), "w") as f:
        f.write(version_file)
    for rel in _SHIPPED_SOURCES:
        # include/... keeps its path; csrc/... goes to src/...
        dest_rel = rel if rel.startswith("include/") else "src/" + rel[len("csrc/"):]
        dest = os.path.join(share, "trpo_ext", dest_rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(HERE, rel), dest)


class _BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        super().finalize_options()
        # Object files in one folder of the source tree whoever builds (`setup.py build_ext`, pip's
        # editable or regular install, which would otherwise use a fresh temporary folder): ninja
        # then recompiles only what changed, and an unchanged extension in seconds.
        self.build_temp = os.path.join(
            HERE, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    def run(self):
        super().run()
        _ship_cmake_package(os.path.join(self.build_lib, "trpo_ext"))
        if self.inplace or getattr(self, "editable_mode", False):
            _ship_cmake_package(os.path.join(HERE, "trpo_ext"))


setup(
    name="trpo_ext",
    version=VERSION,
    description="Trust Region Policy Optimization with fused C++/CUDA kernels for PyTorch",
    packages=find_packages(include=["trpo_ext", "trpo_ext.*"]),
    package_data={"trpo_ext": ["py.typed"]},
    python_requires=">=3.10",  # torch 2.14 wheels exist for Python 3.10 and newer
    install_requires=["torch>=2.11", "numpy", "gymnasium>=1.0"],
    extras_require={
        "mujoco": ["gymnasium[mujoco]>=1.0"],
        "log": ["tensorboard", "matplotlib", "tqdm"],
        # vector_env="envpool": 1.2.5 is the newest EnvPool for Python <= 3.11 (tested with
        # trpo_ext); later releases need Python >= 3.12.
        "envpool": ["envpool==1.2.5; python_version < '3.12'",
                    "envpool>=1.2.5; python_version >= '3.12'"],
        "test": ["pytest", "hypothesis", "scipy", "pytest-benchmark", "gymnasium[mujoco]>=1.0"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
    entry_points={"console_scripts": ["trpo-ext=trpo_ext.cli:main"]},
    zip_safe=False,
)
