"""The disk factorization with a device as the fast memory (disk -> host -> device): torch 'cpu' as a
separate device on any machine, and the same tests on CUDA (``pytest -m gpu tests/test_disk_device.py``).
Checked against scipy's Cholesky of the same matrix, a resume after an interrupted run, the slab plan
under a device budget, and the CLI against the host disk run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from kernelfit.cli import main
from kernelfit.errors import MemoryPlanError
from kernelfit.linalg.diskstore import DiskPanels
from kernelfit.linalg.panels import SymmetricPanels

torch = pytest.importorskip("torch")

N, BLOCK, JITTER, SIGMA = 3000, 128, 1e-3, 2.0
ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]


def gram_tile(X):
    sq = (X * X).sum(1)

    def tile(rows, cols):
        d = sq[rows][:, None] + sq[cols][None, :] - 2.0 * X[rows] @ X[cols].T
        return np.exp(-np.maximum(d, 0.0) / (2 * SIGMA**2))

    return tile


def budget_for(kind):
    """As tests/test_disk_outofcore.py: 'wide' a quarter of the Gram (slabs of several panels), 'narrow' 1.6
    first panels (one-panel slabs first)."""
    gram = SymmetricPanels.nbytes_for(N, BLOCK, np.float64)
    return gram // 4 if kind == "wide" else int(1.6 * N * BLOCK * 8)


@pytest.fixture(scope="module")
def points():
    return np.random.default_rng(0).standard_normal((N, 5))


@pytest.fixture(scope="module")
def scipy_factor(points):
    K = gram_tile(points)(slice(None), slice(None))
    K = (K + K.T) / 2
    K[np.diag_indices_from(K)] += JITTER
    return scipy.linalg.cholesky(K, lower=True)


def new_store(path, X, budget, **kw):
    st = DiskPanels.open(path, N, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget, block=BLOCK,
                         dtype=np.float64, **kw)
    st.fill(gram_tile(X), jitter=JITTER)
    return st


def dense_lower(st):
    L = np.zeros((st.n, st.n))
    for s, P in st.iter_factor():
        L[s:, s : s + P.shape[1]] = P
    return np.tril(L)


def panels(st):
    return [P.copy() for _, P in st.iter_factor()]


def assert_matches_scipy(st, L):
    assert np.abs(dense_lower(st) - L).max() <= 1e-10 * np.abs(L).max()


@pytest.mark.parametrize("kind", ["narrow", "wide"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_factor_matches_scipy_and_records_the_device(tmp_path, points, scipy_factor, device, kind):
    budget = budget_for(kind)
    st = new_store(tmp_path / "s", points, budget)
    stats = st.factor(budget, device=device)
    rec = stats.device
    assert stats.slabs >= 4
    assert rec["device"].startswith(device) and rec["compute"] == "torch" and rec["device_budget_bytes"] > 0
    gram = SymmetricPanels.nbytes_for(N, BLOCK, np.float64)
    # every panel goes up once as input and comes down once as factor; streamed pieces go up besides
    assert rec["bytes_downloaded"] == gram and rec["bytes_uploaded"] > gram
    assert stats.timings_s["upload"] > 0 and stats.timings_s["download"] > 0
    assert_matches_scipy(st, scipy_factor)
    st.close()


def test_host_factor_records_the_host(tmp_path, points):
    budget = budget_for("wide")
    st = new_store(tmp_path / "s", points, budget)
    assert st.factor(budget).device == {"device": "cpu", "compute": "numpy"}
    st.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_budget_below_the_host_budget_plans_more_slabs(tmp_path, points, scipy_factor, device):
    budget = budget_for("wide")
    host = new_store(tmp_path / "h", points, budget)
    host_slabs = host.factor(budget, device=device).slabs        # device budget: its free memory, far above
    host.close()
    workspace = (BLOCK * BLOCK + N * BLOCK) * 8                    # the torch factor's potrf tile and trsm chunk
    st = new_store(tmp_path / "d", points, budget)
    stats = st.factor(budget, device=device, device_memory_budget=budget // 2 + workspace)
    assert stats.device["device_budget_bytes"] == budget // 2 + workspace
    assert stats.slabs > host_slabs
    assert_matches_scipy(st, scipy_factor)
    st.close()
    st = new_store(tmp_path / "tiny", points, budget)
    with pytest.raises(MemoryPlanError, match=f"device {device}.* allows .*device_memory_budget"):
        st.factor(budget, device=device, device_memory_budget=workspace)
    st.close()


@pytest.mark.parametrize("kind", ["narrow", "wide"])
@pytest.mark.parametrize("device", DEVICES)
def test_interrupted_device_factor_resumes_on_the_device(tmp_path, points, scipy_factor, device, kind,
                                                         interrupt_at_commit):
    budget = budget_for(kind)
    st = new_store(tmp_path / "s", points, budget)
    interrupt_at_commit(st, 3)        # the third slab's commit fails: two slabs stay on disk
    with pytest.raises(RuntimeError, match="interrupted"):
        st.factor(budget, device=device)
    st.close()
    st = DiskPanels.open(tmp_path / "s", N, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget,
                         block=BLOCK, dtype=np.float64, resume=True)
    assert 0 < st.finished < len(st.starts)
    stats = st.factor(budget, device=device)
    assert stats.first_panel > 0
    assert stats.device["device"].startswith(device)
    assert_matches_scipy(st, scipy_factor)
    if device == "cpu":        # the same slabs, pieces and GEMMs as an uninterrupted run: the same bits
        ref = new_store(tmp_path / "ref", points, budget)
        ref.factor(budget, device=device)
        assert all(np.array_equal(a, b) for a, b in zip(panels(st), panels(ref)))
        ref.close()
    st.close()


# ------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    d = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(0)
    np.save(d / "X.npy", rng.random((1500, 20)))
    np.save(d / "y.npy", rng.integers(0, 3, 1500))
    return d


@pytest.mark.parametrize("device", DEVICES)
def test_cli_disk_solve_on_a_device_equals_the_host_disk_solve(arrays, tmp_path, device):
    from kernelfit.model import load_model

    def run(name, extra):
        assert main(["solve", "--x-train", str(arrays / "X.npy"), "--y-train", str(arrays / "y.npy"), "--n-test", "0",
                     "--bandwidth", "1.0", "--mode", "float64", "--no-progress", "--out-of-core", "disk",
                     "--scratch-dir", str(tmp_path / name), "--memory-budget", "0.002", *extra,
                     "--save-model", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / f"{name}.json")]) == 0
        stats = json.loads((tmp_path / f"{name}.json").read_text())["stats"]
        return load_model(tmp_path / f"{name}.safetensors").interpolant.alpha, stats

    host, hst = run("host", [])
    dev, dst = run("dev", ["--device", device])
    assert hst["factorization"]["device"] == "cpu" and hst["factorization"]["compute"] == "numpy"
    assert dst["factorization"]["device"].startswith(device) and dst["factorization"]["compute"] == "torch"
    assert dst["factorization"]["bytes_uploaded"] > 0 and dst["slabs"] >= 4
    assert np.abs(dev - host).max() <= 1e-10 * np.abs(host).max()


# ------------------------------------------------------------------------------ the device check script
def _mnist_dir():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_cholesky import find_data_dir

        return find_data_dir()
    except SystemExit:
        return None
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
@pytest.mark.data
def test_device_check_script_dry_run_on_the_cpu(tmp_path):
    """benchmarks/device_check_disk.py end to end on the CPU at n = 2,000 of MNIST, with dask /
    pywavelets / zarr imports blocked as on the device machine."""
    if _mnist_dir() is None:
        pytest.skip("mnist.npz not found (KERNELFIT_DATA, runs/data, ../shared/data)")
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('dask', 'pywt', 'zarr'):\n"
        "            raise ImportError(f'{name} is blocked (not on the device machine)')\n"
        "sys.meta_path.insert(0, _Block())\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)])}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check_disk.py"), "--device", "cpu",
                        "--n", "2000", "--timeout", "300"], capture_output=True, text=True, env=env, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((out / "environment.json").read_text())["device"] == "cpu"
    lines = [json.loads(x) for x in (out / "disk_gpu.jsonl").read_text().splitlines()]
    bench = [x for x in lines if x.get("part") == "benchmark"][-1]
    assert bench["ok"] and bench["slabs"] >= 2 and bench["factor_s_disk"] > 0 and bench["factor_s_in_core"] > 0
    assert bench["residual_rel"] < 1e-8
    assert (out / "summary.md").is_file() and (out / "pytest_disk_gpu.log").is_file()
