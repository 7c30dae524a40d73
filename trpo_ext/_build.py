"""Loads the compiled extension and says what it was built with."""
from __future__ import annotations

import importlib.machinery
import os

import torch

_torch_mm = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])

_BUILD_HOW = ("run `bash scripts/setup.sh` (or `pip install --no-build-isolation -e .`) in the "
              "trpo_ext source tree")

_HERE = os.path.dirname(os.path.abspath(__file__))
# Look beside this file only: an editable install elsewhere on the machine must not lend this
# source tree its compiled module.
if not any(os.path.isfile(os.path.join(_HERE, "_C" + suffix))
           for suffix in importlib.machinery.EXTENSION_SUFFIXES):
    raise ImportError(f"trpo_ext: the extension is not built here ({_HERE} has no compiled "
                      f"trpo_ext._C); {_BUILD_HOW}.")
try:
    from . import _C  # noqa: F401  (importing runs the op registrations)
except ImportError as exc:
    # The file is there but does not load: an undefined symbol means a build for another torch.
    raise ImportError(
        f"trpo_ext's compiled extension could not be loaded with torch {torch.__version__}: {exc}. "
        f"It was probably built against another torch; rebuild it: {_BUILD_HOW}."
    ) from exc

if (_C.torch_version_major, _C.torch_version_minor) != _torch_mm:
    raise ImportError(
        f"trpo_ext was built against torch {_C.torch_version_major}.{_C.torch_version_minor} but "
        f"torch {torch.__version__} is installed; rebuild it: {_BUILD_HOW}."
    )


def build_info() -> dict:
    """What the compiled extension contains.

    Returns a dict with ``cuda`` (bool: CUDA kernels compiled in), ``cuda_version`` (toolkit
    version string or None), ``cuda_archs`` (the ``TORCH_CUDA_ARCH_LIST`` used, or None),
    ``torch`` (the torch version it was built against, major.minor), ``cuda_available``
    (whether a GPU can be used now: compiled in and ``torch.cuda.is_available()``).

    ``cpu_isa`` and ``cpu_isa_supported`` are deprecated and will be removed in the next release:
    the CPU kernels are compiled once and vectorised by the compiler, with no run-time choice of
    instruction set, so both are always ``"compiler"`` (and ``TRPO_EXT_CPU_ISA`` does nothing).
    """
    with_cuda = bool(_C.with_cuda)
    return {
        "cuda": with_cuda,
        "cuda_version": getattr(_C, "cuda_version", None) or None,
        "cuda_archs": _C.cuda_archs or None,
        "torch": f"{_C.torch_version_major}.{_C.torch_version_minor}",
        "cuda_available": with_cuda and torch.cuda.is_available(),
        "cpu_isa": _C.cpu_isa,
        "cpu_isa_supported": _C.cpu_isa_supported,
    }
