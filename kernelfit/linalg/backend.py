"""The backend shim: the only place that knows which array library executes a tile operation.

The tiled algorithms in ``tiled.py`` call three in-place tile kernels on C-contiguous arrays:

* ``potrf(T)``       T (b x b) <- its lower Cholesky factor L (upper part zeroed); returns LAPACK info.
* ``trsm(P, L)``     P (m x b) <- P L^{-T}            (the panel below a diagonal block)
* ``syrk_update(C, A, B)``  C (m x b) <- C - A B^T    (trailing update of one panel)

numpy runs them through scipy's BLAS/LAPACK wrappers *without copies*: a C-contiguous array is the
Fortran-contiguous array of its transpose, so every call passes ``.T`` views and lets f2py write in
place (``overwrite_*=1``). Calls stay far below 2^31 elements (one panel at a time), which the
GUIDE shows to be where OpenBLAS/LAPACK crash at MNIST scale.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.blas as blas
import scipy.linalg.lapack as lapack

from ..errors import InputError


class NumpyBackend:
    name = "numpy"

    @staticmethod
    def potrf(T: np.ndarray) -> int:
        # T.T is Fortran-contiguous and holds T^T; its upper factor U (T = U^T U) is L^T, which in
        # the C view is L. clean=1 zeroes the strictly upper part of L in the C view.
        potrf = lapack.get_lapack_funcs("potrf", (T,))
        _, info = potrf(T.T, lower=0, clean=1, overwrite_a=1)
        return int(info)

    @staticmethod
    def trsm(P: np.ndarray, L: np.ndarray) -> None:
        # Want X = P L^{-T}, i.e. L X^T = P^T. In Fortran views: P.T is P^T, L.T is U = L^T, so solve
        # U^T Y = P^T (trans_a=1, upper) in place on P.T.
        trsm = blas.get_blas_funcs("trsm", (P,))
        trsm(1.0, L.T, P.T, side=0, lower=0, trans_a=1, diag=0, overwrite_b=1)

    @staticmethod
    def syrk_update(C: np.ndarray, A: np.ndarray, B: np.ndarray) -> None:
        # C - A B^T in Fortran views: C^T <- C^T - B A^T, with B^T = B.T(F) used transposed.
        gemm = blas.get_blas_funcs("gemm", (C,))
        gemm(-1.0, B.T, A.T, beta=1.0, c=C.T, trans_a=1, trans_b=0, overwrite_c=1)

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype=dtype)


BACKENDS = {"numpy": NumpyBackend}
# GPU-capable backends register lazily: their module (and torch / cupy) is imported on first use only.
_LAZY_BACKENDS = {"torch": ("kernelfit.linalg.backend_torch", "TorchBackend"),
                  "cupy": ("kernelfit.linalg.backend_cupy", "CupyBackend")}


def get_backend(name: str = "numpy"):
    """Look up a backend by name. GPU backends (torch/cupy) register here when available."""
    if name in _LAZY_BACKENDS and name not in BACKENDS:
        import importlib

        module, attr = _LAZY_BACKENDS[name]
        BACKENDS[name] = getattr(importlib.import_module(module), attr)
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(
            f"unknown linear-algebra backend {name!r}; available here: {', '.join(sorted(set(BACKENDS) | set(_LAZY_BACKENDS)))}."
        ) from None


def free_device_bytes(device) -> int:
    """Memory the next allocation on ``device`` can get: a torch device spec ('cuda', 'cuda:1', 'cpu')
    or 'cupy' (cupy's current CUDA device); available RAM on the CPU.

    ``cudaMemGetInfo`` counts memory that the caching allocators hold but do not use as taken, so
    this adds torch's reserved-but-unallocated bytes (torch reuses them) for a torch consumer and the
    free bytes of cupy's default pool for a cupy consumer, and hands the *other* library's cached
    blocks back to the driver first, so that they show up as free."""
    import sys

    spec = str(device) if device is not None else "cpu"
    if spec == "cupy":
        import cupy

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        pool = cupy.get_default_memory_pool()
        return int(cupy.cuda.runtime.memGetInfo()[0]) + int(pool.free_bytes())
    if spec.startswith("cuda"):
        import torch

        cupy = sys.modules.get("cupy")
        if cupy is not None:
            cupy.get_default_memory_pool().free_all_blocks()
        dev = torch.device(spec)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(torch.cuda.mem_get_info(dev)[0]) + int(cached)
    if spec == "meta":
        raise InputError("device 'meta' holds no memory to measure; pass device_memory_budget (the bytes the "
                         "target GPU would allow) for a dry run.")
    import psutil

    return int(psutil.virtual_memory().available)
