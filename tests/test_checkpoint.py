"""Checkpoint / resume: interrupt at ~60% of the panels, resume, compare bitwise with an uninterrupted
numpy factorization (and with LAPACK); refuse checkpoints of another input or config."""

import json

import numpy as np
import pytest
import scipy.linalg

from kernelfit.errors import InputError
from kernelfit.linalg.checkpoint import Checkpointer, input_hash
from kernelfit.linalg.factor import factor
from kernelfit.linalg.tiled import SymmetricPanels, cholesky_inplace


def spd(n, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n + 4))
    return (A @ A.T / n + np.eye(n)).astype(dtype)


class Crash(Exception):
    pass


def crash_after(fraction, panels):
    stop_at = int(fraction * panels)

    def hook(j):
        if j + 1 >= stop_at:
            raise Crash(j)

    return hook


def uninterrupted(A, block):
    G = SymmetricPanels.from_dense(A, block)
    cholesky_inplace(G)
    return G


@pytest.mark.parametrize("strategy,every", [("recompute", 1), ("recompute", 3), ("trailing", 1), ("trailing", 2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_in_core_interrupt_at_60_percent_and_resume_is_bitwise_equal(tmp_path, strategy, every, dtype):
    n, block = 203, 16            # 13 panels, odd last panel
    A = spd(n, seed=1, dtype=dtype)
    ref = uninterrupted(A, block)
    G = SymmetricPanels.from_dense(A, block)
    with pytest.raises(Crash):
        factor(G, checkpoint_dir=tmp_path, checkpoint_every=every, checkpoint_strategy=strategy,
               on_panel_done=crash_after(0.6, len(G.panels)))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert 0 <= m["last_finished_panel"] < 8 and not m["complete"]
    assert not list(tmp_path.glob("*.tmp"))
    G2 = SymmetricPanels.from_dense(A, block)     # the caller rebuilds the input (a crash lost memory)
    info = factor(G2, checkpoint_dir=tmp_path, resume=True, checkpoint_every=every, checkpoint_strategy=strategy)
    assert info.resumed_from_panel == m["last_finished_panel"] + 1 > 0
    for P, R in zip(G2.panels, ref.panels):
        np.testing.assert_array_equal(P, R)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(G2.to_dense(False), scipy.linalg.cholesky(A.astype(np.float64), lower=True),
                               atol=tol)
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"]


def test_out_of_core_interrupt_and_resume_bitwise_equal(tmp_path):
    n, block = 150, 10
    A = spd(n, seed=2)
    budget = 4 * n * block * 8
    ref = SymmetricPanels.from_dense(A, block)
    factor(ref, out_of_core=True, device_memory_budget=budget)
    G = SymmetricPanels.from_dense(A, block)
    with pytest.raises(Crash):
        factor(G, out_of_core=True, device_memory_budget=budget, checkpoint_dir=tmp_path,
               on_panel_done=crash_after(0.6, len(G.panels)))
    G2 = SymmetricPanels.from_dense(A, block)
    info = factor(G2, out_of_core=True, device_memory_budget=budget, checkpoint_dir=tmp_path, resume=True)
    assert info.path == "out-of-core" and info.resumed_from_panel > 0
    assert info.checkpoint["algorithm"] == "left-looking"
    for P, R in zip(G2.panels, ref.panels):
        np.testing.assert_array_equal(P, R)
    np.testing.assert_allclose(G2.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)


def test_resume_refuses_other_input_and_other_block(tmp_path):
    A = spd(60, seed=3)
    G = SymmetricPanels.from_dense(A, 8)
    with pytest.raises(Crash):
        factor(G, checkpoint_dir=tmp_path, on_panel_done=crash_after(0.5, len(G.panels)))
    B = A.copy()
    B[5, 5] += 1e-9
    with pytest.raises(InputError, match="different factorization.*input_sha256"):
        factor(SymmetricPanels.from_dense(B, 8), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(InputError, match="block: checkpoint has 8, this run has 12"):
        factor(SymmetricPanels.from_dense(A, 12), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(InputError, match="different factorization"):   # jitter is part of the config
        factor(SymmetricPanels.from_dense(A, 8), checkpoint_dir=tmp_path, resume=True, jitter=1e-6)
    with pytest.raises(InputError, match="already holds a checkpoint; pass resume=True"):
        factor(SymmetricPanels.from_dense(A, 8), checkpoint_dir=tmp_path)


def test_resume_of_complete_checkpoint_does_no_work(tmp_path):
    A = spd(40, seed=4)
    G = SymmetricPanels.from_dense(A, 8)
    factor(G, checkpoint_dir=tmp_path)
    G2 = SymmetricPanels.from_dense(A, 8)
    info = factor(G2, checkpoint_dir=tmp_path, resume=True)
    assert "nothing to factor" in " ".join(info.notes)
    np.testing.assert_array_equal(G2.to_dense(False), G.to_dense(False))


def test_checkpoint_every_bounds_saves_and_bytes(tmp_path):
    A = spd(100, seed=5)
    G = SymmetricPanels.from_dense(A, 10)      # 10 panels
    info = factor(G, checkpoint_dir=tmp_path / "r", checkpoint_every=3)
    assert info.checkpoint["saves"] == 4        # after panels 2, 5, 8 and the last
    assert info.checkpoint["bytes_written"] == G.nbytes   # each finished panel written exactly once
    G = SymmetricPanels.from_dense(A, 10)
    info = factor(G, checkpoint_dir=tmp_path / "t", checkpoint_every=3, checkpoint_strategy="trailing")
    assert info.checkpoint["bytes_written"] > G.nbytes    # trailing state costs extra writes
    assert len(list((tmp_path / "t").glob("T*.npy"))) == 0  # completed: no stale trailing files


def test_input_hash_sensitive_to_config_and_data():
    G = SymmetricPanels.from_dense(spd(20), 8)
    h = input_hash(G, {"jitter": 0.0})
    assert h == input_hash(SymmetricPanels.from_dense(spd(20), 8), {"jitter": 0.0})
    assert h != input_hash(G, {"jitter": 1.0})
    G.panels[1][3, 0] += 1e-12
    assert h != input_hash(G, {"jitter": 0.0})


def test_bad_options():
    with pytest.raises(InputError, match="strategy"):
        Checkpointer("x", strategy="sometimes")
    with pytest.raises(InputError, match="every must be >= 1"):
        Checkpointer("x", every=0)


def test_deferred_updates_resume_on_torch_panels(tmp_path):
    # the GPU resume path (load on host, re-apply the trailing updates on the device), run on CPU tensors
    torch = pytest.importorskip("torch")
    from kernelfit.linalg.backend_torch import panels_to_numpy, panels_to_torch
    from kernelfit.linalg.checkpoint import apply_finished_updates

    A = spd(90, seed=6)
    G = SymmetricPanels.from_dense(A, 8)
    with pytest.raises(Crash):
        factor(G, checkpoint_dir=tmp_path, checkpoint_every=1, on_panel_done=crash_after(0.6, len(G.panels)))
    G2 = SymmetricPanels.from_dense(A, 8)
    ck = Checkpointer(tmp_path, config={"jitter": 0.0})
    start = ck.resume(G2, apply_updates=False)
    assert start > 0 and ck.pending_updates
    D = panels_to_torch(G2, "cpu")
    apply_finished_updates(D, start - 1, "torch")
    cholesky_inplace(D, backend="torch", start_panel=start)
    np.testing.assert_allclose(panels_to_numpy(D).to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)
    assert isinstance(D.panels[0], torch.Tensor)


def test_trailing_strategy_refused_for_panels_on_a_gpu(tmp_path, monkeypatch):
    import kernelfit.linalg.factor as fmod

    # pretend a CUDA torch device resolved: the refusal happens before anything runs on it
    monkeypatch.setattr(fmod, "_resolve_backend", lambda G, b, d: ("torch", "cuda:0"))
    monkeypatch.setattr(fmod, "free_device_bytes", lambda device: 10**10)
    monkeypatch.setattr("kernelfit.linalg.outofcore.make_device",
                        lambda d: type("NoDevice", (), {"workspace_bytes": lambda self, *a: 0})())
    G = SymmetricPanels.from_dense(spd(30), 8)
    with pytest.raises(InputError, match="checkpoint_strategy='trailing' would save stale host copies"):
        factor(G, device="cuda", checkpoint_dir=tmp_path, checkpoint_strategy="trailing")
