"""Checkpoint / resume: interrupt at ~60% of the panels, resume, compare bitwise with an uninterrupted
numpy factorization (and with LAPACK); refuse checkpoints of another input or config."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from kernelfit.errors import InputError
from kernelfit.linalg.checkpoint import Checkpointer, input_hash
from kernelfit.linalg.factor import factor
from kernelfit.linalg.options import FactorOptions
from kernelfit.linalg.panels import SymmetricPanels
from kernelfit.linalg.tiled import cholesky_inplace


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
        factor(G, FactorOptions(checkpoint_dir=tmp_path),
               checkpoint_every=every, checkpoint_strategy=strategy, on_panel_done=crash_after(0.6, len(G.panels)))
    m = json.loads((tmp_path / "manifest.json").read_text())["stages"][np.dtype(dtype).name]
    assert 0 <= m["last_finished_panel"] < 8 and not m["complete"]
    assert not list(tmp_path.glob("*.tmp"))
    G2 = SymmetricPanels.from_dense(A, block)     # the caller rebuilds the input (a crash lost memory)
    info = factor(G2, FactorOptions(checkpoint_dir=tmp_path, resume=True), checkpoint_every=every, checkpoint_strategy=strategy)
    assert info.resumed_from_panel == m["last_finished_panel"] + 1 > 0
    for P, R in zip(G2.panels, ref.panels):
        np.testing.assert_array_equal(P, R)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(G2.to_dense(False), scipy.linalg.cholesky(A.astype(np.float64), lower=True),
                               atol=tol)
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"][np.dtype(dtype).name]["complete"]


def test_out_of_core_interrupt_and_resume_bitwise_equal(tmp_path):
    n, block = 150, 10
    A = spd(n, seed=2)
    budget = 4 * n * block * 8
    ref = SymmetricPanels.from_dense(A, block)
    factor(ref, FactorOptions(out_of_core=True, device_memory_budget=budget))
    G = SymmetricPanels.from_dense(A, block)
    with pytest.raises(Crash):
        factor(G, FactorOptions(out_of_core=True, device_memory_budget=budget, checkpoint_dir=tmp_path),
               on_panel_done=crash_after(0.6, len(G.panels)))
    G2 = SymmetricPanels.from_dense(A, block)
    info = factor(G2, FactorOptions(out_of_core=True, device_memory_budget=budget, checkpoint_dir=tmp_path, resume=True))
    assert info.path == "out-of-core" and info.resumed_from_panel > 0
    assert info.checkpoint["algorithm"] == "left-looking"
    for P, R in zip(G2.panels, ref.panels):
        np.testing.assert_array_equal(P, R)
    np.testing.assert_allclose(G2.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)


def test_resume_refuses_other_input_and_other_block(tmp_path):
    A = spd(60, seed=3)
    G = SymmetricPanels.from_dense(A, 8)
    with pytest.raises(Crash):
        factor(G, FactorOptions(checkpoint_dir=tmp_path), on_panel_done=crash_after(0.5, len(G.panels)))
    B = A.copy()
    B[5, 5] += 1e-9
    with pytest.raises(InputError, match="different factorization.*input_sha256"):
        factor(SymmetricPanels.from_dense(B, 8), FactorOptions(checkpoint_dir=tmp_path, resume=True))
    with pytest.raises(InputError, match="block: checkpoint has 8, this run has 12"):
        factor(SymmetricPanels.from_dense(A, 12), FactorOptions(checkpoint_dir=tmp_path, resume=True))
    with pytest.raises(InputError, match="different factorization"):   # jitter is part of the config
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path, resume=True), jitter=1e-6)
    with pytest.raises(InputError, match="already holds a checkpoint; pass resume=True"):
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path))


def test_resume_of_complete_checkpoint_does_no_work(tmp_path):
    A = spd(40, seed=4)
    G = SymmetricPanels.from_dense(A, 8)
    factor(G, FactorOptions(checkpoint_dir=tmp_path))
    G2 = SymmetricPanels.from_dense(A, 8)
    info = factor(G2, FactorOptions(checkpoint_dir=tmp_path, resume=True))
    assert "nothing to factor" in " ".join(info.notes)
    np.testing.assert_array_equal(G2.to_dense(False), G.to_dense(False))


def test_checkpoint_every_bounds_saves_and_bytes(tmp_path):
    A = spd(100, seed=5)
    G = SymmetricPanels.from_dense(A, 10)      # 10 panels
    info = factor(G, FactorOptions(checkpoint_dir=tmp_path / "r"), checkpoint_every=3)
    assert info.checkpoint["saves"] == 4        # after panels 2, 5, 8 and the last
    assert info.checkpoint["bytes_written"] == G.nbytes   # each finished panel written exactly once
    G = SymmetricPanels.from_dense(A, 10)
    info = factor(G, FactorOptions(checkpoint_dir=tmp_path / "t"), checkpoint_every=3, checkpoint_strategy="trailing")
    assert info.checkpoint["bytes_written"] > G.nbytes    # trailing state costs extra writes
    assert len(list((tmp_path / "t").glob("*.T*.npy"))) == 0  # completed: no stale trailing files
    assert sorted(p.name for p in (tmp_path / "t").glob("*.npy")) == [f"float64.L_{k:05d}.npy" for k in range(10)]


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
        factor(G, FactorOptions(checkpoint_dir=tmp_path), checkpoint_every=1, on_panel_done=crash_after(0.6, len(G.panels)))
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
        factor(G, FactorOptions(device="cuda", checkpoint_dir=tmp_path), checkpoint_strategy="trailing")


# ------------------------------------------------------------------ ownership, checksums, stages
def _crashed_checkpoint(tmp_path, n=60, block=8, seed=3):
    A = spd(n, seed=seed)
    G = SymmetricPanels.from_dense(A, block)
    with pytest.raises(Crash):
        factor(G, FactorOptions(checkpoint_dir=tmp_path), on_panel_done=crash_after(0.6, len(G.panels)))
    return A


def test_a_panel_that_does_not_match_its_checksum_is_refused_never_mixed(tmp_path):
    from kernelfit.errors import ChecksumError

    A = _crashed_checkpoint(tmp_path)
    # another run's panel of the same name and shape (e.g. two solves sharing the directory)
    other = SymmetricPanels.from_dense(spd(60, seed=9), 8)
    cholesky_inplace(other)
    np.save(tmp_path / "float64.L_00001.npy", other.panels[1])
    with pytest.raises(ChecksumError, match="L_00001.npy does not match the checksum"):
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path, resume=True))
    (tmp_path / "float64.L_00002.npy").unlink()
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["stages"]["float64"]["files"]["float64.L_00001.npy"]["xxh3_128"] = \
        __import__("kernelfit.storage", fromlist=["x"]).file_digest(tmp_path / "float64.L_00001.npy")
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ChecksumError, match="L_00002.npy is missing"):
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path, resume=True))


@pytest.mark.parametrize("text,needle", [("{not json", "not a readable kernelfit checkpoint manifest"),
                                         ("[1, 2]", "expected a JSON object"),
                                         ('{"format": "kernelfit.cholesky-checkpoint/1"}', "format"),
                                         (None, "lacks or mistypes last_finished_panel")])
def test_corrupt_manifest_is_a_clear_error_and_nothing_is_touched(tmp_path, text, needle):
    from kernelfit.storage import StorageError

    A = _crashed_checkpoint(tmp_path)
    if text is None:
        m = json.loads((tmp_path / "manifest.json").read_text())
        m["stages"]["float64"]["last_finished_panel"] = "3"
        text = json.dumps(m)
    (tmp_path / "manifest.json").write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StorageError, match=needle) as ei:
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path, resume=True))
    assert "[Errno" not in str(ei.value) and "delete the directory" in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_enospc_while_saving_a_panel_keeps_the_finished_panels_and_resumes(tmp_path, monkeypatch):
    import errno

    import kernelfit.storage as storage
    from kernelfit.storage import StorageError

    A = spd(90, seed=7)
    calls = {"n": 0}
    real = storage.HashingWriter.write

    def full_disk(self, b):
        if self.nbytes == 0:
            calls["n"] += 1
        if calls["n"] == 5:       # the 5th panel file finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, b)

    monkeypatch.setattr(storage.HashingWriter, "write", full_disk)
    with pytest.raises(StorageError, match=r"float64.L_00004.npy.*No space left.*keeps panels 0..3 .*continue from "
                                           r"panel 4") as ei:
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path), checkpoint_every=1)
    assert ei.value.errno == errno.ENOSPC
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(storage.HashingWriter, "write", real)
    G = SymmetricPanels.from_dense(A, 8)
    info = factor(G, FactorOptions(checkpoint_dir=tmp_path, resume=True))
    assert info.resumed_from_panel == 4
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)


def test_free_space_is_checked_before_the_factorization(tmp_path, monkeypatch):
    import kernelfit.places as results
    from kernelfit.storage import StorageError

    monkeypatch.setattr(results, "free_bytes", lambda d: 1000)
    G = SymmetricPanels.from_dense(spd(60), 8)
    hook = []
    with pytest.raises(StorageError, match="float64 checkpoint.*needs.*GiB but only"):
        factor(G, FactorOptions(checkpoint_dir=tmp_path), on_panel_done=hook.append)
    assert hook == [] and not (tmp_path / "manifest.json").exists()


def test_a_non_empty_directory_we_did_not_write_is_refused(tmp_path):
    (tmp_path / "Train_X.npy").write_bytes(b"user data")
    G = SymmetricPanels.from_dense(spd(30), 8)
    with pytest.raises(InputError, match=r"not empty and kernelfit did not write it.*Train_X.npy.*empty or new"):
        factor(G, FactorOptions(checkpoint_dir=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Train_X.npy"]


_HOLD_LOCK = """
import sys
from kernelfit.linalg.checkpoint import owned_dir
held = owned_dir(sys.argv[1]).claim()
print("locked", flush=True)
sys.stdin.read()
"""


def test_two_processes_cannot_share_a_checkpoint_directory(tmp_path):
    import os
    import subprocess
    import sys

    from kernelfit.storage import StorageError

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "ck")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        G = SymmetricPanels.from_dense(spd(30), 8)
        with pytest.raises(StorageError, match=f"in use by another kernelfit run \\(PID {holder.pid}\\)"):
            factor(G, FactorOptions(checkpoint_dir=tmp_path / "ck"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    info = factor(SymmetricPanels.from_dense(spd(30), 8), FactorOptions(checkpoint_dir=tmp_path / "ck"))   # free again
    assert info.checkpoint["saves"] >= 1


@pytest.mark.parametrize("strategy", ["stored-float64-gram", "recomputed-float64"])
def test_float64_fallback_checkpoints_its_own_stage_and_resumes(tmp_path, monkeypatch, strategy):
    """Mixed mode whose float32 attempt must fall back to float64, with a checkpoint directory: the
    fallback is its own stage; a crash inside it resumes (float32 stage complete, float64 stage
    continued) to the float64 answer."""
    import warnings

    from kernelfit.linalg import checkpoint as ck
    from kernelfit.linalg.options import FactorOptions
    from kernelfit.solve import SolveOptions, fit_interpolant

    rng = np.random.default_rng(0)
    X, Y = rng.random((300, 3)), rng.standard_normal((300, 2))    # cond(K) ~ 8e9 (tests/test_solve.py)
    K = np.exp(-scipy.spatial.distance.cdist(X, X, "sqeuclidean") / (2 * 0.3**2))
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(K, lower=True), Y)
    # max_refine=0: the float32 attempt (one residual pass) never reaches float64 level, whatever BLAS
    # rounding this machine gives, so the fallback always runs; force_memory: whatever memory is free now
    opts = dict(bandwidth=0.3, mode="mixed", strategy=strategy, force_memory=True, max_refine=0)
    place = dict(block_size=32, checkpoint_dir=str(tmp_path / "ck"))

    real_hook = ck.Checkpointer.hook

    def crash_in_float64(self, j):
        real_hook(self, j)
        if getattr(self, "stage", np.dtype(self.G.dtype).name) == "float64" and j == 4:
            raise Crash(j)

    monkeypatch.setattr(ck.Checkpointer, "hook", crash_in_float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Crash):
            fit_interpolant(X, Y, SolveOptions(**opts, placement=FactorOptions(**place)))
    m = json.loads((tmp_path / "ck" / "manifest.json").read_text())["stages"]
    # the float32 stage holds what its attempt finished (all panels, or those before its breakdown)
    assert m["float32"]["last_finished_panel"] >= 0 and m["float32"]["dtype"] == "float32"
    assert m["float64"]["last_finished_panel"] == 4 and not m["float64"]["complete"]
    monkeypatch.setattr(ck.Checkpointer, "hook", real_hook)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_interpolant(X, Y, SolveOptions(**opts, placement=FactorOptions(**place, resume=True)))
    st = fit.stats
    assert st["factor_dtype"] == "float64" and "re-factored in float64" in st["refinement"]["fallback"]
    assert st["factorization"]["resumed_from_panel"] == 5 and st["factorization"]["checkpoint"]["stage"] == "float64"
    np.testing.assert_allclose(fit.alpha, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # and uninterrupted, the fallback with a checkpoint directory just runs (it used to stop at
    # "already holds a checkpoint" after the whole float32 attempt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = fit_interpolant(X, Y, SolveOptions(**opts,
                                                   placement=FactorOptions(**{**place, "checkpoint_dir": str(tmp_path / "ck2")})))
    assert fresh.stats["factor_dtype"] == "float64"
    np.testing.assert_allclose(fresh.alpha, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def _rewrite_records(directory, digest):
    """Replace every file record of the manifest with {name of digest: digest(file bytes), bytes}."""
    m = json.loads((directory / "manifest.json").read_text())
    for st in m["stages"].values():
        for name in st["files"]:
            data = (directory / name).read_bytes()
            st["files"][name] = {**digest(data), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps(m))


def test_manifest_records_xxh3_128_of_each_file_bytes(tmp_path):
    import xxhash

    _crashed_checkpoint(tmp_path)
    files = json.loads((tmp_path / "manifest.json").read_text())["stages"]["float64"]["files"]
    assert files
    for name, rec in files.items():
        data = (tmp_path / name).read_bytes()
        assert rec == {"xxh3_128": xxhash.xxh3_128(data).hexdigest(), "bytes": len(data)}


def test_a_checkpoint_with_blake2b_records_still_resumes_and_is_still_checked(tmp_path):
    import hashlib

    from kernelfit.errors import ChecksumError

    A = _crashed_checkpoint(tmp_path)
    _rewrite_records(tmp_path, lambda b: {"blake2b": hashlib.blake2b(b, digest_size=32).hexdigest()})
    G = SymmetricPanels.from_dense(A, 8)
    factor(G, FactorOptions(checkpoint_dir=tmp_path, resume=True))
    L = scipy.linalg.cholesky(A, lower=True)
    assert np.abs(np.tril(G.to_dense(False)) - L).max() <= 1e-12 * np.abs(L).max()

    A = _crashed_checkpoint(tmp_path / "b")
    _rewrite_records(tmp_path / "b", lambda b: {"blake2b": hashlib.blake2b(b + b"x", digest_size=32).hexdigest()})
    with pytest.raises(ChecksumError, match="does not match the checksum"):
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path / "b", resume=True))


def test_a_file_record_without_a_known_checksum_is_refused(tmp_path):
    from kernelfit.errors import StorageError

    A = _crashed_checkpoint(tmp_path)
    _rewrite_records(tmp_path, lambda b: {"md5": "0" * 32})
    with pytest.raises(StorageError, match="bad file entry"):
        factor(SymmetricPanels.from_dense(A, 8), FactorOptions(checkpoint_dir=tmp_path, resume=True))
