"""GPU-only checks (CUDA). Marked @pytest.mark.gpu: deselected by default (pyproject addopts) and
skipped when torch sees no CUDA device. Run on a GPU machine with:  pytest -m gpu tests/test_gpu.py
NOTE: written without access to a GPU; these tests have not been run yet."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]

from kernelfit.linalg import backend_torch as bt  # noqa: E402
from kernelfit.linalg.factor import factor  # noqa: E402
from kernelfit.linalg.mixed import solve_refined  # noqa: E402
from kernelfit.linalg.outofcore import build_gram_panels_device, cholesky_out_of_core  # noqa: E402
from kernelfit.linalg.tiled import SymmetricPanels, cholesky_inplace  # noqa: E402


def spd(n, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n + 7))
    return (A @ A.T / n + np.eye(n)).astype(dtype)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 1e-4)])
def test_in_core_cuda_matches_lapack(dtype, tol):
    A = spd(1000, dtype=dtype)
    G = SymmetricPanels.from_dense(A, 128)
    info = factor(G, device="cuda", out_of_core=False)
    assert info.backend == "torch" and info.device.startswith("cuda") and info.path == "in-core"
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A.astype(np.float64), lower=True), atol=tol)


def test_tiled_on_device_tensors_in_place():
    A = spd(700)
    G = bt.panels_to_torch(SymmetricPanels.from_dense(A, 96), "cuda")
    ptrs = [P.data_ptr() for P in G.panels]
    cholesky_inplace(G, backend="torch")
    assert [P.data_ptr() for P in G.panels] == ptrs
    np.testing.assert_allclose(bt.panels_to_numpy(G).to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-11)


def test_out_of_core_cuda_budget_streams_pins_and_matches_lapack():
    n, block = 3000, 256
    A = spd(n, seed=1, dtype=np.float32)
    G = SymmetricPanels.from_dense(A, block)
    budget = 4 * n * block * 4 + (1 << 26)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = {}
    cholesky_out_of_core(G, device="cuda", budget_bytes=budget, stats_out=stats)
    peak = torch.cuda.max_memory_allocated() - base
    assert stats["slabs"] > 1 and stats["pinned"]
    assert 0 < stats["timings_s"]["gpu_busy_fraction"] <= 1.0   # CUDA-event spans of the compute stream
    assert stats["peak_device_bytes"] <= budget
    assert peak <= budget * 1.1          # the allocator's view agrees with our accounting
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A.astype(np.float64), lower=True), atol=2e-4)


def test_gram_on_gpu_has_tf32_off():
    with bt.tf32_enabled():     # the trap: TF32 left on globally by user code
        rng = np.random.default_rng(2)
        X = rng.random((2000, 784)).astype(np.float32)
        G = build_gram_panels_device(X, "gaussian", 5.0, 512, np.float32, "cuda")
        ref = np.exp(-cdist(X.astype(np.float64), X.astype(np.float64), "sqeuclidean") / 50.0)
        assert np.max(np.abs(G.to_dense() - ref)) < 1e-5   # TF32 (10-bit mantissa) gives ~1e-3 here
        assert bt.tf32_matmul_enabled()                     # the caller's setting is restored


def test_mixed_with_tf32_factor_refines_to_float64():
    from kernelfit.gram import KernelOperator, build_gram_panels

    rng = np.random.default_rng(3)
    X = rng.random((1500, 20))
    Y = rng.standard_normal((1500, 2))
    op = KernelOperator(X, "gaussian", 0.3, np.float64)
    Xs, _, info, factors = solve_refined(lambda dt: build_gram_panels(X, "gaussian", 0.3, 256, dt),
                                         lambda G: factor(G, device="cuda", tf32=True).to_dict(),
                                         op.symmetric_matmul, Y, dtype=np.float32, scale_diagonal=True,
                                         fallback=lambda: None)
    assert factors[0]["tf32"] is True
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * 0.09))
    assert np.abs(K @ Xs - Y).max() < 1e-9 or info["fallback"]


def test_forced_in_core_too_big_for_gpu_names_both_numbers():
    free = torch.cuda.mem_get_info()[0]
    from kernelfit.errors import MemoryPlanError

    G = SymmetricPanels.from_dense(spd(100), 32)
    with pytest.raises(MemoryPlanError, match="does not fit on cuda"):
        factor(G, device="cuda", out_of_core=False, device_memory_budget=1000)
    assert free > 0


def test_cupy_backend_on_gpu():
    cupy = pytest.importorskip("cupy")
    A = spd(500, seed=4)
    G = SymmetricPanels.from_dense(A, 64)
    info = factor(G, backend="cupy", out_of_core=False)
    assert info.backend == "cupy"
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-10)
    assert cupy.cuda.runtime.getDeviceCount() >= 1


def test_benchmark_smoke_on_gpu(tmp_path, shared_data_dir):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "b.jsonl"
    subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_cholesky.py"), "--device", "cuda", "--n", "3000",
                    "--n-test", "500", "--ooc-n", "4000", "--ooc-budget-mib", "64", "--data", str(shared_data_dir),
                    "--out", str(out)], check=True, timeout=600)
    lines = out.read_text().splitlines()
    assert len(lines) == 5


def test_checkpoint_resume_on_gpu(tmp_path):
    A = spd(900, seed=5)
    G = SymmetricPanels.from_dense(A, 64)

    class Crash(Exception):
        pass

    def crash(j):
        if j >= 8:
            raise Crash

    with pytest.raises(Crash):
        factor(G, device="cuda", out_of_core=False, checkpoint_dir=tmp_path, checkpoint_every=2, on_panel_done=crash)
    G2 = SymmetricPanels.from_dense(A, 64)
    info = factor(G2, device="cuda", out_of_core=False, checkpoint_dir=tmp_path, resume=True, checkpoint_every=2)
    assert info.resumed_from_panel > 0
    np.testing.assert_allclose(G2.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-11)
