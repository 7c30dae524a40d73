"""Loads the compiled extension and says what it was built with."""
from __future__ import annotations

import torch

_torch_mm = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])

try:
    from . import _C  # noqa: F401  (importing runs the op registrations)
except ImportError as exc:  # an undefined symbol means a build for another torch
    raise ImportError(
        f"trpo_ext's compiled extension could not be loaded with torch {torch.__version__}: {exc}. "
        "It was probably built against another torch; rebuild it with "
        "`pip install --no-build-isolation .` (or `-e .`) in the trpo_ext source tree."
    ) from exc

if (_C.torch_version_major, _C.torch_version_minor) != _torch_mm:
    raise ImportError(
        f"trpo_ext was built against torch {_C.torch_version_major}.{_C.torch_version_minor} but "
        f"torch {torch.__version__} is installed; rebuild it with "
        "`pip install --no-build-isolation .` (or `-e .`) in the trpo_ext source tree."
    )


def build_info() -> dict:
    """What the compiled extension contains.

    Returns a dict with ``cuda`` (bool: CUDA kernels compiled in), ``cuda_version`` (toolkit
    version string or None), ``cuda_archs`` (the ``TORCH_CUDA_ARCH_LIST`` used, or None),
    ``torch`` (the torch version it was built against, major.minor), ``cuda_available``
    (whether a GPU can be used now: compiled in and ``torch.cuda.is_available()``), ``cpu_isa``
    (the instruction set the CPU kernels of the KL ops and the networks run with: "baseline",
    "avx2" or "avx512"; the best this CPU offers unless the environment variable
    ``TRPO_EXT_CPU_ISA`` named a lower one when the extension was loaded) and
    ``cpu_isa_supported`` (the best this CPU offers).
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
