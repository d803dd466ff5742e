"""cupy backend: the three in-place tile kernels of ``tiled.py`` on cupy arrays (CUDA only).

cupy is not installed on the development or CI machines. The module imports without cupy (so
``get_backend("cupy")`` can be looked up) and every entry point calls ``require_cupy()``, which
raises a clean ``InputError`` naming the fix. Two properties of the real cupy matter here, and the
tests' fake cupy (numpy underneath, tests/test_backend_torch.py) reproduces both:

* under cupy's default error state, ``cupy.linalg.cholesky`` does not check cuSOLVER's info and can
  return a *partial* factor (finite, positive diagonal) of a matrix that is not positive definite;
  the factorization therefore runs inside ``cupyx.errstate(linalg="raise")``;
* ``import cupy`` does not load the ``cupy.cublas`` submodule; it is imported explicitly, so the
  trailing update is one in-place cuBLAS GEMM instead of a temporary per update.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

TRSM_CHUNK_ELEMENTS = 1 << 24


def require_cupy():
    """Import cupy (+ cupyx.scipy.linalg) or raise a clean error saying how to get it."""
    try:
        import cupy
        import cupyx.scipy.linalg  # noqa: F401
    except ImportError:
        raise InputError("backend='cupy' needs CuPy, which is not installed here. Install the wheel for your "
                         "CUDA version (pip install cupy-cuda12x, or kernelfit[gpu]) or use backend='torch' "
                         "or backend='numpy'.") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken
        raise InputError(f"backend='cupy': CuPy is installed but found no usable CUDA device ({exc}). "
                         f"Use backend='numpy' on this machine.") from None
    if count < 1:
        raise InputError("backend='cupy': CuPy found 0 CUDA devices. Use backend='numpy' on this machine.")
    return cupy


def cupy_available() -> bool:
    try:
        require_cupy()
    except InputError:
        return False
    return True


def _xp_linalg():
    import cupy
    import cupy.cublas  # noqa: F401 - a submodule that `import cupy` does not load
    import cupyx
    import cupyx.scipy.linalg

    return cupy, cupyx.scipy.linalg


def _errstate_raise():
    import cupyx

    return cupyx.errstate(linalg="raise")


def _potrf_info_on_host(T_host: np.ndarray) -> int:
    """LAPACK info (1-based failing minor) from a host copy of the original tile."""
    import scipy.linalg.lapack as lapack

    _, info = lapack.get_lapack_funcs("potrf", (T_host,))(np.array(T_host, order="F"), lower=1)
    return int(info)


class CupyBackend:
    name = "cupy"

    @staticmethod
    def potrf(T) -> int:
        cp, _ = _xp_linalg()
        # cupy.linalg.cholesky does not return LAPACK's info; with linalg="raise" a failure raises
        # numpy's LinAlgError (cupy reuses the class). Only then is the exact minor taken from a host
        # LAPACK call on the small diagonal tile. NaN input passes cuSOLVER: check finiteness too.
        try:
            with _errstate_raise():
                L = cp.linalg.cholesky(cp.tril(T) + cp.tril(T, -1).T)
            failed = not bool(cp.isfinite(cp.diagonal(L)).all())
        except np.linalg.LinAlgError:
            failed = True
        if failed:
            info = _potrf_info_on_host(cp.asnumpy(T))   # T is still the input here
            return info if info else T.shape[0]
        T[...] = L
        return 0

    @staticmethod
    def trsm(P, L) -> None:
        # P <- P L^{-T}  <=>  P^T <- L^{-1} P^T; solved on row chunks of P to bound the temporary.
        _, cla = _xp_linalg()
        rows = max(1, TRSM_CHUNK_ELEMENTS // max(1, P.shape[1]))
        for a in range(0, P.shape[0], rows):
            chunk = P[a : a + rows]
            chunk[...] = cla.solve_triangular(L, chunk.T, lower=True).T

    @staticmethod
    def syrk_update(C, A, B) -> None:
        cp, _ = _xp_linalg()
        cp.cublas.gemm("N", "T", A, B, out=C, alpha=-1.0, beta=1.0)   # in place on C-contiguous C, no temporary

    @staticmethod
    def empty(shape, dtype):
        cp, _ = _xp_linalg()
        return cp.empty(tuple(shape), dtype=dtype)
