"""torch backend (run on CPU tensors) and the cupy shim's math (run against numpy standing in for cupy).
References: scipy/LAPACK Cholesky and scipy's cdist, never the code's own earlier output."""

import sys
import types

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

torch = pytest.importorskip("torch")

from kernelfit import gram_device as gd  # noqa: E402
from kernelfit.errors import InputError, NotPositiveDefiniteError  # noqa: E402
from kernelfit.linalg import backend_torch as bt  # noqa: E402
from kernelfit.linalg.backend import get_backend  # noqa: E402
from kernelfit.linalg.panels import SymmetricPanels  # noqa: E402
from kernelfit.linalg.tiled import cho_solve, cholesky_inplace  # noqa: E402


def spd(n, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n + 5))
    return (A @ A.T / n + np.eye(n)).astype(dtype)


def test_registry_is_lazy_and_named():
    assert get_backend("torch") is bt.TorchBackend
    with pytest.raises(InputError, match="available here:.*cupy.*numpy.*torch"):
        get_backend("jax")


@pytest.mark.parametrize("n,block", [(1, 1), (7, 3), (50, 16), (97, 32), (64, 64)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tiled_cholesky_on_cpu_tensors_matches_lapack(n, block, dtype):
    A = spd(n, seed=n, dtype=dtype)
    G = bt.panels_to_torch(SymmetricPanels.from_dense(A, block), "cpu")
    ptrs = [P.data_ptr() for P in G.panels]
    cholesky_inplace(G, backend="torch")
    assert [P.data_ptr() for P in G.panels] == ptrs          # in place: same storage
    L = bt.panels_to_numpy(G).to_dense(symmetric=False)
    ref = scipy.linalg.cholesky(A.astype(np.float64), lower=True)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(L, ref, atol=tol * 10, rtol=tol)


def test_tile_kernels_individually():
    rng = np.random.default_rng(1)
    L = np.tril(rng.standard_normal((6, 6))) + 6 * np.eye(6)
    P = rng.standard_normal((20, 6))
    Pt = torch.from_numpy(P.copy())
    bt.TorchBackend.trsm(Pt, torch.from_numpy(L))
    np.testing.assert_allclose(Pt.numpy(), scipy.linalg.solve_triangular(L, P.T, lower=True).T, rtol=1e-12)
    C, A, B = rng.standard_normal((20, 6)), rng.standard_normal((20, 4)), rng.standard_normal((6, 4))
    Ct = torch.from_numpy(C.copy())
    ptr = Ct.data_ptr()
    bt.TorchBackend.syrk_update(Ct, torch.from_numpy(A), torch.from_numpy(B))
    assert Ct.data_ptr() == ptr
    np.testing.assert_allclose(Ct.numpy(), C - A @ B.T, rtol=1e-12)


def test_trsm_chunking_gives_same_answer(monkeypatch):
    monkeypatch.setattr(bt, "TRSM_CHUNK_ELEMENTS", 12)   # 2 rows per chunk for width 6
    rng = np.random.default_rng(2)
    L = np.tril(rng.standard_normal((6, 6))) + 6 * np.eye(6)
    P = rng.standard_normal((13, 6))
    Pt = torch.from_numpy(P.copy())
    bt.TorchBackend.trsm(Pt, torch.from_numpy(L))
    np.testing.assert_allclose(Pt.numpy(), scipy.linalg.solve_triangular(L, P.T, lower=True).T, rtol=1e-12)


def test_not_positive_definite_reports_lapack_minor():
    A = spd(40, seed=3)
    A[25, 25] = -5.0
    G = bt.panels_to_torch(SymmetricPanels.from_dense(A, 8), "cpu")
    with pytest.raises(NotPositiveDefiniteError) as exc:
        cholesky_inplace(G, backend="torch")
    _, info = scipy.linalg.lapack.dpotrf(A, lower=1)
    assert exc.value.minor == info == 26


def test_cho_solve_torch_matches_scipy():
    A = spd(45, seed=4)
    B = np.random.default_rng(4).standard_normal((45, 3))
    G = bt.panels_to_torch(SymmetricPanels.from_dense(A, 10), "cpu")
    cholesky_inplace(G, backend="torch")
    X = bt.cho_solve_torch(G, torch.from_numpy(B)).numpy()
    np.testing.assert_allclose(X, scipy.linalg.solve(A, B, assume_a="pos"), rtol=1e-10)
    x1 = bt.cho_solve_torch(G, torch.from_numpy(B[:, 0])).numpy()
    np.testing.assert_allclose(x1, X[:, 0], rtol=1e-12)


def test_gram_tile_matches_cdist_and_tf32_restored():
    rng = np.random.default_rng(5)
    X, Z = rng.random((30, 12)), rng.random((17, 12))
    out = torch.empty(30, 17, dtype=torch.float64)
    Xt, Zt = torch.from_numpy(X), torch.from_numpy(Z)
    before = bt.tf32_matmul_enabled()
    gd.gram_tile_into(out, Xt, Zt, (Xt * Xt).sum(1), (Zt * Zt).sum(1), "gaussian", 0.7)
    assert bt.tf32_matmul_enabled() == before
    np.testing.assert_allclose(out.numpy(), np.exp(-cdist(X, Z, "sqeuclidean") / (2 * 0.49)), rtol=1e-12)
    gd.gram_tile_into(out, Xt, Zt, (Xt * Xt).sum(1), (Zt * Zt).sum(1), "laplacian", 0.7)
    np.testing.assert_allclose(out.numpy(), np.exp(-cdist(X, Z) / 0.7), rtol=1e-10, atol=1e-12)


def test_tf32_context_sets_and_restores():
    with bt.tf32_enabled():
        assert bt.tf32_matmul_enabled() is True
        with bt.tf32_disabled():
            assert bt.tf32_matmul_enabled() is False
        assert bt.tf32_matmul_enabled() is True
    assert bt.tf32_matmul_enabled() is False
    # reading torch's own settings afterwards must not raise (no mix of legacy and new APIs)
    if bt._new_precision_api(torch):
        assert torch.backends.cuda.matmul.fp32_precision in ("none", "ieee")
    else:
        assert torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.skipif(bt.cuda_available(), reason="checks the no-GPU message")
def test_cuda_request_without_gpu_is_a_clear_error():
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        bt.resolve_device("cuda")


# --- cupy shim ---------------------------------------------------------------------------------

def test_cupy_missing_is_a_clean_error():
    from kernelfit.linalg import backend_cupy

    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed here")
    except ImportError:
        pass
    with pytest.raises(InputError, match="needs CuPy.*pip install cupy-cuda12x"):
        backend_cupy.require_cupy()
    assert backend_cupy.cupy_available() is False


class FakeCupy:
    """numpy + scipy.linalg registered as ``cupy`` / ``cupyx`` with the two behaviours of the real
    cupy that the backend must handle:

    * ``cupy.linalg.cholesky`` checks cuSOLVER's info only inside ``cupyx.errstate(linalg="raise")``
      (then it raises numpy's LinAlgError); otherwise it returns the lower triangle of what potrf
      left, a partial factor: columns before the failing minor factored, the rest untouched input
      (finite, positive diagonal, so a finiteness / sign check cannot see the failure);
    * ``cupy.cublas`` exists only after ``import cupy.cublas``; its ``gemm`` works in place on a
      C- or F-contiguous ``out`` (and is recorded here)."""

    def __init__(self):
        self.linalg_mode = "ignore"
        self.gemm_calls = 0
        self.temporaries = 0

    def cholesky(self, a):
        L, info = scipy.linalg.lapack.dpotrf(np.array(a, dtype=np.float64), lower=1, clean=1)
        if info > 0:
            if self.linalg_mode == "raise":
                raise np.linalg.LinAlgError("Error reported by potrf in cuSOLVER: the leading minor of order "
                                            f"{info} is not positive definite")
            L[:, info - 1:] = np.tril(a)[:, info - 1:]      # unspecified by cuSOLVER: the input stays
        return np.tril(L).astype(a.dtype)

    def errstate(self, linalg=None):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            saved = self.linalg_mode
            self.linalg_mode = linalg or saved
            try:
                yield
            finally:
                self.linalg_mode = saved
        return ctx()

    def gemm(self, transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        assert out is not None and (out.flags.c_contiguous or out.flags.f_contiguous)
        assert a.flags.c_contiguous and b.flags.c_contiguous
        opa = a if transa == "N" else a.T
        opb = b if transb == "N" else b.T
        self.gemm_calls += 1
        out[...] = alpha * (opa @ opb) + beta * out
        return out


@pytest.fixture
def fake_cupy(monkeypatch):
    import importlib.abc
    import importlib.util

    state = FakeCupy()
    cupy = types.ModuleType("cupy")
    cupy.__dict__.update({k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    cupy.__path__ = []                                  # a package: `import cupy.cublas` looks for a submodule
    cupy.asnumpy = np.asarray
    cupy.linalg = types.SimpleNamespace(cholesky=state.cholesky)
    real_matmul = np.matmul

    def matmul(*args, **kw):
        state.temporaries += 1
        return real_matmul(*args, **kw)

    cupy.matmul = matmul

    class CublasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "cupy.cublas" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            module.gemm = state.gemm

    cupyx = types.ModuleType("cupyx")
    cupyx.errstate = state.errstate
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx_scipy.linalg = scipy.linalg
    cupyx.scipy = cupyx_scipy
    monkeypatch.delitem(sys.modules, "cupy.cublas", raising=False)
    for name, mod in {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy,
                      "cupyx.scipy.linalg": scipy.linalg}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(sys, "meta_path", [CublasFinder(), *sys.meta_path])
    return state


def test_fake_cupy_behaves_like_cupy(fake_cupy):
    import cupy

    assert not hasattr(cupy, "cublas")          # as with the real cupy: the submodule needs its own import
    import cupy.cublas  # noqa: F401

    assert hasattr(cupy, "cublas")
    bad = spd(6, seed=9)
    bad[2, 3] = bad[3, 2] = 3.0 * np.sqrt(bad[2, 2] * bad[3, 3])   # not positive definite, positive diagonal
    L = cupy.linalg.cholesky(bad)                                    # default errstate: no error ...
    assert np.isfinite(L).all() and (np.diagonal(L) > 0).all()      # ... and nothing in L shows it
    import cupyx

    with cupyx.errstate(linalg="raise"), pytest.raises(np.linalg.LinAlgError):
        cupy.linalg.cholesky(bad)


def test_cupy_kernels_math_against_lapack(fake_cupy):
    from kernelfit.linalg.backend_cupy import CupyBackend

    A = spd(37, seed=6)
    G = SymmetricPanels.from_dense(A, 10)
    # drive the tiled algorithm with the cupy kernels (numpy arrays stand in for device arrays)
    from kernelfit.linalg import backend as be_mod

    monkey = dict(be_mod.BACKENDS)
    be_mod.BACKENDS["cupy-test"] = CupyBackend
    try:
        cholesky_inplace(G, backend="cupy-test")
    finally:
        be_mod.BACKENDS.clear()
        be_mod.BACKENDS.update(monkey)
    np.testing.assert_allclose(G.to_dense(symmetric=False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)
    x = cho_solve(G, np.ones(37))
    np.testing.assert_allclose(A @ x, np.ones(37), atol=1e-10)


@pytest.mark.parametrize("make_bad", ["negative diagonal", "positive diagonal"])
def test_cupy_potrf_failure_returns_lapack_minor(fake_cupy, make_bad):
    from kernelfit.linalg.backend_cupy import CupyBackend

    A = spd(9, seed=7)
    if make_bad == "negative diagonal":
        A[4, 4] = -1.0
    else:   # cupy's default errstate returns a finite partial factor here: only errstate "raise" sees it
        A[4, 5] = A[5, 4] = 3.0 * np.sqrt(A[4, 4] * A[5, 5])
    T = A.copy()
    assert CupyBackend.potrf(T) == scipy.linalg.lapack.dpotrf(A, lower=1)[1] > 0
    np.testing.assert_array_equal(T, A)   # failed tile left as it was


def test_cupy_update_is_one_in_place_cublas_gemm(fake_cupy):
    from kernelfit.linalg.backend_cupy import CupyBackend

    rng = np.random.default_rng(10)
    C, A, B = rng.standard_normal((20, 6)), rng.standard_normal((20, 4)), rng.standard_normal((6, 4))
    Cd = C.copy()
    ptr = Cd.ctypes.data
    CupyBackend.syrk_update(Cd, A, B)
    assert fake_cupy.gemm_calls == 1 and fake_cupy.temporaries == 0 and Cd.ctypes.data == ptr
    np.testing.assert_allclose(Cd, C - A @ B.T, rtol=1e-12)


def test_kernel_matmul_torch_matches_kernel_operator():
    from kernelfit.gram import KernelOperator

    rng = np.random.default_rng(8)
    X, Z, V = rng.random((37, 5)), rng.random((11, 5)), rng.standard_normal((37, 2))
    op = KernelOperator(X, "gaussian", 0.9, np.float64, rows=8)
    Xt = torch.from_numpy(X)
    got = gd.kernel_matmul_torch(Xt, Xt, torch.from_numpy(V), "gaussian", 0.9, rows=8, exact_diagonal=True)
    np.testing.assert_allclose(got.numpy(), op.symmetric_matmul(V), rtol=1e-12)
    got = gd.kernel_matmul_torch(torch.from_numpy(Z), Xt, torch.from_numpy(V), "gaussian", 0.9, rows=4)
    np.testing.assert_allclose(got.numpy(), np.exp(-cdist(Z, X, "sqeuclidean") / (2 * 0.81)) @ V, rtol=1e-12)


def test_tf32_disabled_covers_cudnn_convolutions():
    # cuDNN convolutions default to TF32 in torch >= 2.9; the random-conv features run inside tf32_disabled
    conv = getattr(getattr(torch.backends, "cudnn", None), "conv", None)
    if not bt._new_precision_api(torch) or not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has no per-op fp32_precision for cuDNN convolutions")
    before = conv.fp32_precision
    with bt.tf32_disabled():
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
