"""The Gram and its factor on disk (kernelfit/linalg/diskstore.py): against scipy, resumed after a
kill -9, bounded resident memory, a full disk, and the refusals before any work."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import scipy.linalg

from kernelfit.disk_solve import npy_gram_source, solve_refined_on_disk
from kernelfit.errors import ChecksumError, InputError, MemoryPlanError, StorageError
from kernelfit.linalg import diskstore, slabs
from kernelfit.linalg.diskstore import DiskPanels, disk_cho_solve
from kernelfit.linalg.panels import SymmetricPanels

N, BLOCK, JITTER = 3000, 128, 1e-3

HELPERS = """
import numpy as np
def gaussian_points(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 5))
def gaussian_tile(X, sigma=2.0):
    sq = (X * X).sum(1)
    def tile(rows, cols):
        d = sq[rows][:, None] + sq[cols][None, :] - 2.0 * X[rows] @ X[cols].T
        return np.exp(-np.maximum(d, 0.0) / (2 * sigma**2))
    return tile
"""
exec(HELPERS)


def gram_budget(n=N, block=BLOCK, dtype=np.float64, parts=4):
    return SymmetricPanels.nbytes_for(n, block, dtype) // parts


def budget_for(kind):
    """'wide': a quarter of the Gram (slabs of several panels, each the next one's memory as its panels
    are written); 'narrow': 1.6 first panels (one-panel slabs first, one-block stream pieces)."""
    return gram_budget(parts=4) if kind == "wide" else int(1.6 * N * BLOCK * 8)


def dense_gram(X, jitter=JITTER):
    K = gaussian_tile(X)(slice(None), slice(None))  # noqa: F821 (defined by exec above)
    K = (K + K.T) / 2
    K[np.diag_indices_from(K)] += jitter
    return K


def factor_panels(store):
    return [P.copy() for _, P in store.iter_factor()]


def to_dense_lower(store):
    L = np.zeros((store.n, store.n))
    for s, P in store.iter_factor():
        L[s:, s : s + P.shape[1]] = P
    return np.tril(L)


def new_store(path, X, budget, dtype=np.float64, fill=True, **kw):
    st = DiskPanels.open(path, X.shape[0], source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget,
                         block=BLOCK, dtype=dtype, **kw)
    if fill:
        st.fill(gaussian_tile(X), jitter=JITTER)  # noqa: F821
    return st


@pytest.fixture(scope="module")
def points():
    return gaussian_points(N)  # noqa: F821


@pytest.fixture(scope="module")
def references(tmp_path_factory, points):
    """The uninterrupted disk factor's panels for budget_for(kind) (what a resumed run must reproduce
    bit for bit): 'narrow' slabs or 'wide' ones."""
    cache = {}

    def get(kind):
        if kind not in cache:
            budget = budget_for(kind)
            ref = new_store(tmp_path_factory.mktemp("ref") / "s", points, budget)
            ref.factor(budget)
            cache[kind] = factor_panels(ref)
            ref.close()
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def reference(references):
    return references("narrow")


def test_factor_and_solve_match_scipy_with_at_least_four_slabs(tmp_path, points):
    budget = gram_budget()
    st = new_store(tmp_path / "s", points, budget)
    stats = st.factor(budget)
    assert stats.slabs >= 4 and stats.bytes_read > 0 and stats.bytes_written > 0 and stats.io_wait_s >= 0
    K = dense_gram(points)
    L = scipy.linalg.cholesky(K, lower=True)
    assert np.abs(to_dense_lower(st) - L).max() <= 1e-10 * np.abs(L).max()
    Y = np.random.default_rng(1).standard_normal((N, 3))
    alpha = disk_cho_solve(st, Y)
    ref = scipy.linalg.cho_solve((L, True), Y)
    assert np.linalg.norm(alpha - ref) <= 1e-8 * np.linalg.norm(ref)
    # files: only the factor's panels remain, each listed with its checksum
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".npy"))
    assert names == sorted(st.record["files"]) and all(".L_" in n for n in names)
    st.close()


def test_float32_factor_refined_in_float64_reaches_cho_solve(tmp_path, points):
    budget = gram_budget(dtype=np.float32)
    st = new_store(tmp_path / "s", points, budget, dtype=np.float32)
    st.factor(budget)
    K = dense_gram(points, jitter=0.0)
    Y = np.random.default_rng(2).standard_normal((N, 2))
    X, R, rep = solve_refined_on_disk(st, lambda V: K @ V, Y, jitter=JITTER)
    Kj = K + JITTER * np.eye(N)
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(Kj, lower=True), Y)
    assert rep.iterations >= 1
    assert np.linalg.norm(X - ref) <= 1e-9 * np.linalg.norm(ref)
    # float64 level: the residual of scipy's float64 solve, within a small factor
    assert np.linalg.norm(Y - Kj @ X) <= 4 * np.linalg.norm(Y - Kj @ ref) + 1e-14 * np.linalg.norm(Y)
    st.close()


def test_npy_gram_file_and_a_changed_file_refused_on_resume(tmp_path, points):
    K = dense_gram(points)
    path = tmp_path / "K.npy"
    np.save(path, K)
    n, dt, tile, source = npy_gram_source(path)
    assert (n, dt) == (N, np.float64)
    budget = gram_budget()
    st = DiskPanels.open(tmp_path / "s", n, source=source, budget_bytes=budget, block=BLOCK, dtype=np.float64)
    st.fill(tile)
    st.close()
    # resume with the same file: accepted; then factor and compare
    st = DiskPanels.open(tmp_path / "s", n, source=npy_gram_source(path)[3], budget_bytes=budget, block=BLOCK,
                         dtype=np.float64, resume=True)
    st.factor(budget)
    L = scipy.linalg.cholesky(K, lower=True)
    assert np.abs(to_dense_lower(st) - L).max() <= 1e-10 * np.abs(L).max()
    st.close()
    K[5, 7] = K[7, 5] = K[5, 7] * 0.5
    np.save(path, K)
    with pytest.raises(InputError, match="input_sha256.*Gram file or the options changed"):
        DiskPanels.open(tmp_path / "s", n, source=npy_gram_source(path)[3], budget_bytes=budget, block=BLOCK,
                        dtype=np.float64, resume=True)


def test_npy_gram_file_not_square_refused(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    with pytest.raises(Exception, match="expected a square 2-D float"):
        npy_gram_source(tmp_path / "bad.npy")


KILL_SCRIPT = HELPERS + """
import os, signal, sys
import numpy as np
from kernelfit.linalg import diskstore
from kernelfit.linalg.diskstore import DiskPanels
path, n, block, budget, jitter, where = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5]), sys.argv[6]
X = gaussian_points(n)
st = DiskPanels.open(path, n, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget, block=block,
                     dtype=np.float64)
st.fill(gaussian_tile(X), jitter=jitter)
commits = {"n": 0}
orig_commit, orig_read, orig_save = st.commit_slab, st.factor_rows, diskstore.save_npy
def commit(j0, j1):
    commits["n"] += 1
    commits["wide"] = j1 - j0 >= 2
    orig_commit(j0, j1)
def read(k, row0, row1):       # kill -9 in the middle of the third slab's streamed updates
    if where == "stream" and commits["n"] >= 2 and k == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig_read(k, row0, row1)
def save(p, a, **kw):           # kill -9 between two factor files of the third slab
    if where == "commit" and commits["n"] >= 2 and commits["wide"] and p.name.endswith("L_%05d.npy" % (st.finished + 1)):
        os.kill(os.getpid(), signal.SIGKILL)
    return orig_save(p, a, **kw)
st.commit_slab, st.factor_rows, diskstore.save_npy = commit, read, save
st.factor(budget)
print("NOT KILLED")
"""


@pytest.mark.parametrize("kind", ["narrow", "wide"])   # 'commit': the kill lands in the writer thread
@pytest.mark.parametrize("where", ["stream", "commit"])
def test_kill_9_mid_factorization_then_resume_is_bit_identical(tmp_path, references, where, kind):
    budget, want = budget_for(kind), references(kind)
    plan = slabs.plan_disk_slabs(N, BLOCK, 8, budget)
    assert (plan.slabs[0][1] - plan.slabs[0][0] == 1) == (kind == "narrow")
    d = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(d), str(N), str(BLOCK), str(budget), str(JITTER), where],
                       capture_output=True, text=True, env=os.environ, timeout=300)
    assert p.returncode == -9, p.stdout + p.stderr
    st = DiskPanels.open(d, N, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget, block=BLOCK,
                         dtype=np.float64, resume=True)
    assert 0 < st.finished < len(st.starts) and not st.complete
    st.factor(budget)
    assert st.stats.first_panel > 0
    got = factor_panels(st)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
    st.close()


@pytest.mark.parametrize("kind", ["narrow", "wide"])   # the writer thread's error surfaces in factor()
def test_full_disk_mid_run_keeps_finished_slabs_and_resume_finishes(tmp_path, points, references, full_disk_at, kind):
    budget, want = budget_for(kind), references(kind)
    st = new_store(tmp_path / "s", points, budget)
    free_space = full_disk_at(8)
    with pytest.raises(StorageError, match=r"No space left.*panels 0\.\.\d+ of the factor .*kept.*resume=True \(--resume\)"):
        st.factor(budget)
    kept = st.finished
    st.close()
    free_space()
    listed = json.loads((tmp_path / "s" / "manifest.json").read_text())["stages"]["float64"]
    assert listed["last_finished_panel"] == kept - 1 and kept > 0
    on_disk = {p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".npy")}
    assert on_disk == set(listed["files"])            # nothing half-written left, nothing listed missing
    st = DiskPanels.open(tmp_path / "s", N, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget,
                         block=BLOCK, dtype=np.float64, resume=True)
    st.factor(budget)
    got = factor_panels(st)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
    st.close()


def test_tampered_panel_refused(tmp_path, points):
    budget = gram_budget()
    st = new_store(tmp_path / "s", points, budget)
    st.close()
    victim = tmp_path / "s" / "float64.T00000_00010.npy"
    with open(victim, "r+b") as f:
        f.seek(-8, 2)
        f.write(np.float64(0.25).tobytes())
    st = DiskPanels.open(tmp_path / "s", N, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget,
                         block=BLOCK, dtype=np.float64, resume=True)
    with pytest.raises(ChecksumError, match="T00000_00010.*does not match the checksum"):
        st.factor(budget)
    st.close()


# --- refusals before any work ------------------------------------------------------------------------
def test_scratch_dir_under_a_file_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="scratch_dir .* is a file"):
        DiskPanels.open(tmp_path / "f" / "sub", 100, source={}, budget_bytes=10**6)


def test_scratch_dir_too_small_refused_with_both_sizes(tmp_path, monkeypatch):
    import kernelfit.places as results

    monkeypatch.setattr(results, "free_bytes", lambda d: 1 << 20)
    with pytest.raises(InputError, match=r"needs \d+\.\d+ GiB but only 0\.00 GiB are free"):
        DiskPanels.open(tmp_path / "s", 20000, source={}, budget_bytes=2 << 30, dtype=np.float32)
    assert not (tmp_path / "s").exists()       # refused before any write: not even our marker left


def test_budget_too_small_refused(tmp_path):
    with pytest.raises(MemoryPlanError, match="memory budget .* too small .*--memory-budget"):
        DiskPanels.open(tmp_path / "s", 20000, source={}, budget_bytes=1 << 20)
    assert not (tmp_path / "s").exists()


def test_existing_store_needs_resume_and_foreign_dir_refused(tmp_path, points):
    budget = gram_budget()
    st = new_store(tmp_path / "s", points, budget, fill=False)
    st.close()
    with pytest.raises(InputError, match="already holds a float64 disk store.*resume=True"):
        new_store(tmp_path / "s", points, budget, fill=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(InputError, match="did not write it"):
        new_store(tmp_path / "mine", points, budget, fill=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_store_in_use_by_another_run_refused_naming_its_pid(tmp_path):
    d = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from kernelfit.linalg.diskstore import DiskPanels
        st = DiskPanels.open({str(d)!r}, 1000, source={{}}, budget_bytes=10**7, dtype=np.float64)
        print("ready", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StorageError, match=f"in use by another kernelfit run \\(PID {holder.pid}\\)"):
            DiskPanels.open(d, 1000, source={}, budget_bytes=10**7, dtype=np.float64, resume=True)
    finally:
        holder.kill()
        holder.wait()


RSS_SCRIPT = """
import sys
import numpy as np
from kernelfit.disk_solve import npy_gram_source
from kernelfit.linalg.diskstore import DiskPanels, disk_cho_solve
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
gram, d, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
n, dt, tile, source = npy_gram_source(gram)
base = rss("VmRSS:")
st = DiskPanels.open(d, n, source=source, budget_bytes=budget, block=128, dtype=np.float32)
st.fill(tile, jitter=1e-2)
st.factor(budget)
x = disk_cho_solve(st, np.ones((n, 1)))
print(base, rss("VmHWM:"), st.stats.slabs)
"""


@pytest.mark.slow
def test_peak_rss_within_budget_plus_overhead(tmp_path):
    n = 6000
    X = gaussian_points(n)  # noqa: F821
    tile = gaussian_tile(X)  # noqa: F821
    K = np.lib.format.open_memmap(tmp_path / "K.npy", mode="w+", dtype=np.float32, shape=(n, n))
    for r in range(0, n, 500):
        K[r : r + 500] = tile(slice(r, r + 500), slice(None))
    K.flush()
    del K
    budget = SymmetricPanels.nbytes_for(n, 128, np.float32) // 4
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "K.npy"), str(tmp_path / "s"), str(budget)],
                       capture_output=True, text=True, env=os.environ, timeout=600)
    assert p.returncode == 0, p.stderr
    base, peak, slabs = map(int, p.stdout.split())
    assert slabs >= 4
    # the stated overhead (diskstore.OVERHEAD_BYTES, 48 MiB: file hashing chunks, BLAS and thread
    # buffers); the Gram file (144 MB) and the store are never resident (a memmap reader: +140 MB)
    allowed = budget + (48 << 20)
    assert peak - base <= allowed, (peak - base, allowed)


@pytest.mark.slow      # ~20 s: MNIST loaded by two subprocesses
@pytest.mark.data
def test_benchmark_dry_run_prints_both_rates_and_the_ratio(tmp_path, shared_data_dir):
    out = subprocess.run([sys.executable, "benchmarks/disk_outofcore.py", "--n", "1500", "--budget-fraction", "0.5",
                          "--scratch-dir", str(tmp_path / "s"), "--data-dir", str(shared_data_dir)],
                         capture_output=True, text=True, env=os.environ, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    inc, dsk, summary = (json.loads(line) for line in out.stdout.splitlines())
    assert (inc["part"], dsk["part"], summary["part"]) == ("incore", "disk", "summary")
    assert dsk["slabs"] >= 2 and dsk["bytes_read"] > 0 and dsk["alpha_rel_diff_vs_incore"] < 1e-2
    assert summary["factor_rate_ratio"] == pytest.approx(dsk["factor_gflops"] / inc["factor_gflops"])
    assert summary["sgemm_peak_gflops"] > 0 and "io_wait_s" in summary
    assert not (tmp_path / "s").exists()          # the benchmark removes its store


@pytest.mark.parametrize("kind", ["narrow", "wide"])
def test_full_disk_at_the_manifest_keeps_the_previous_state(tmp_path, points, references, monkeypatch, kind):
    budget, reference = budget_for(kind), references(kind)
    st = new_store(tmp_path / "s", points, budget)
    real, calls = st._write_manifest, {"n": 0}

    def manifest_fails():
        calls["n"] += 1
        if calls["n"] == 2:          # the second slab's manifest
            raise OSError(errno.ENOSPC, "No space left on device")
        real()

    monkeypatch.setattr(st, "_write_manifest", manifest_fails)
    with pytest.raises(StorageError, match="resume=True"):
        st.factor(budget)
    assert st.finished == json.loads((tmp_path / "s" / "manifest.json").read_text())["stages"]["float64"][
        "last_finished_panel"] + 1 > 0      # memory and disk agree: only the first slab is finished
    st.close()
    st = DiskPanels.open(tmp_path / "s", N, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget,
                         block=BLOCK, dtype=np.float64, resume=True)
    st.factor(budget)
    assert all(np.array_equal(a, b) for a, b in zip(factor_panels(st), reference))
    st.close()


def test_smallest_budget_runs_with_one_block_pieces_and_matches_scipy(tmp_path):
    n = 1200
    X = gaussian_points(n)  # noqa: F821
    budget = slabs.min_disk_budget(n, BLOCK, 8)
    plan = slabs.plan_disk_slabs(n, BLOCK, 8, budget)
    assert plan.piece_rows == BLOCK
    with pytest.raises(MemoryPlanError, match="too small"):
        slabs.plan_disk_slabs(n, BLOCK, 8, budget - 1)
    st = new_store(tmp_path / "s", X, budget)
    st.factor(budget)
    L = scipy.linalg.cholesky(dense_gram(X), lower=True)
    assert np.abs(to_dense_lower(st) - L).max() <= 1e-10 * np.abs(L).max()
    st.close()


def test_plan_disk_predicts_the_traffic_of_a_run(tmp_path, points, monkeypatch):
    from kernelfit.linalg.diskstore import plan_disk

    budget = budget_for("narrow")
    plan = plan_disk(N, np.float64, budget, tmp_path, block=BLOCK)
    st = new_store(tmp_path / "s", points, budget)
    st.stats.bytes_read = st.stats.bytes_written = 0      # count the factorization only
    st.factor(budget)
    assert (plan.slabs, plan.factor_read_bytes, plan.factor_write_bytes) == (
        st.stats.slabs, st.stats.bytes_read, st.stats.bytes_written)
    # brute force: rows s0.. of every earlier panel for each slab, plus every input panel once
    starts = list(range(0, N, BLOCK))
    brute = sum(sum((N - starts[j0]) * BLOCK for _ in range(j0)) for j0, _ in slabs.plan_disk_slabs(N, BLOCK, 8, budget).slabs)
    assert plan.factor_read_bytes == (brute + sum((N - s) * min(BLOCK, N - s) for s in starts)) * 8
    assert plan.fits and plan.ram_bytes > budget
    import kernelfit.places as results

    monkeypatch.setattr(results, "free_bytes", lambda d: 1 << 20)
    assert plan_disk(N, np.float64, budget, tmp_path, block=BLOCK).fits is False
    st.close()


# --- the slab pipeline: panels written as they finish, the next slab read into their memory ---------
def test_slab_plans_keep_what_is_in_ram_at_once_within_the_budget():
    starts = list(range(0, N, BLOCK))
    padded = [-(-(N - s) * min(BLOCK, N - s) * 8 // 4096) * 4096 for s in starts]
    for kind, budget in [("wide", gram_budget(parts=2)), ("wide", gram_budget(parts=4)),
                         ("narrow", budget_for("narrow"))]:
        plan = slabs.plan_disk_slabs(N, BLOCK, 8, budget)
        assert len(plan.slabs) >= (3 if budget == gram_budget(parts=2) else 4), (kind, plan)
        assert [j for a, b in plan.slabs for j in range(a, b)] == list(range(len(starts)))     # every panel once
        # brute force: the slab (panels padded to 4 KiB), the top rows of a streamed panel and two
        # pieces, each piece_rows or the slab width, each read as whole 4 KiB blocks
        for a, b in plan.slabs:
            width = min(N, starts[b - 1] + BLOCK) - starts[a]
            pieces = (width + 2 * max(plan.piece_rows, width)) * BLOCK * 8 + 6 * 4096 if a else 0
            assert sum(padded[a:b]) + pieces <= budget, (kind, a, b)
            if b < len(starts):              # greedy: one more panel would not fit
                width = min(N, starts[b] + BLOCK) - starts[a]
                more = (width + 2 * max(plan.piece_rows, width)) * BLOCK * 8 + 6 * 4096 if a else 0
                assert sum(padded[a : b + 1]) + more > budget
        for j0, _ in plan.slabs:                    # a resume replans the same remaining slabs
            assert slabs.plan_disk_slabs(N, BLOCK, 8, budget, j0).slabs == [x for x in plan.slabs if x[0] >= j0]
    # pieces keep the stream buffers small: with half the Gram, every slab holds several panels
    assert min(b - a for a, b in slabs.plan_disk_slabs(N, BLOCK, 8, gram_budget(parts=2)).slabs) >= 2


def test_panels_are_written_as_they_finish_while_the_next_slab_is_read_and_match_scipy(tmp_path, points):
    import threading

    budget = gram_budget(parts=4)
    st = new_store(tmp_path / "s", points, budget)
    seen = {"write_threads": set(), "reads_during_writes": 0, "busy": False, "order": []}
    orig_write, orig_commit, orig_input = st.write_factor_panel, st.commit_slab, st.read_input

    def write_factor_panel(j, P):
        seen["write_threads"].add(threading.get_ident())
        seen["busy"] = True
        try:
            time.sleep(0.02)           # a slow disk: the factorization and the next slab's reads go on
            orig_write(j, P)
        finally:
            seen["busy"] = False
        seen["order"].append(("L", j))

    def commit_slab(j0, j1):
        seen["order"].append(("commit", j0, j1))
        orig_commit(j0, j1)

    def read_input(j, out):
        seen["reads_during_writes"] += seen["busy"]
        orig_input(j, out)

    st.write_factor_panel, st.commit_slab, st.read_input = write_factor_panel, commit_slab, read_input
    stats = st.factor(budget)
    assert threading.get_ident() not in seen["write_threads"] and seen["reads_during_writes"] > 0
    # every panel written once, in order, each slab's manifest after its panels' files
    runs = slabs.plan_disk_slabs(N, BLOCK, 8, budget).slabs
    assert seen["order"] == [x for a, b in runs for x in [("L", j) for j in range(a, b)] + [("commit", a, b)]]
    assert stats.slabs >= 4 and stats.timings_s["write_slab"] > 0.02 * len(st.starts)
    assert stats.io_wait_s >= stats.timings_s["write_wait"] + stats.timings_s["read_wait"]
    L = scipy.linalg.cholesky(dense_gram(points), lower=True)
    assert np.abs(to_dense_lower(st) - L).max() <= 1e-10 * np.abs(L).max()
    names = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".npy"))
    assert names == sorted(st.record["files"]) and all(".L_" in n for n in names) and st.complete
    st.close()


def test_not_positive_definite_mid_slab_leaves_the_store_as_its_manifest_says(tmp_path, points):
    from kernelfit.errors import NotPositiveDefiniteError

    budget = gram_budget(parts=4)
    n = N
    st = DiskPanels.open(tmp_path / "s", n, source={"kind": "test-indefinite"}, budget_bytes=budget, block=BLOCK,
                         dtype=np.float64)
    bad = slabs.plan_disk_slabs(n, BLOCK, 8, budget).slabs[1][0] * BLOCK + BLOCK + 5   # in the second slab's 2nd panel
    tile = gaussian_tile(points)  # noqa: F821

    def indefinite(rows, cols):
        T = tile(rows, cols)
        if rows.start <= bad < rows.stop and cols.start <= bad < cols.stop:
            T[bad - rows.start, bad - cols.start] = -1.0
        return T

    st.fill(indefinite, jitter=JITTER)
    with pytest.raises(NotPositiveDefiniteError) as info:
        st.factor(budget)
    assert info.value.minor == bad + 1
    listed = set(json.loads((tmp_path / "s" / "manifest.json").read_text())["stages"]["float64"]["files"])
    on_disk = {p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".npy")}
    assert on_disk == listed                   # the failed slab's finished panels were not left behind
    assert st.finished == slabs.plan_disk_slabs(n, BLOCK, 8, budget).slabs[1][0]
    st.remove()
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind", ["narrow", "wide"])
def test_plan_disk_predicts_the_traffic_of_each_kind_of_run(tmp_path, points, kind):
    budget = budget_for(kind)
    plan = diskstore.plan_disk(N, np.float64, budget, tmp_path, block=BLOCK)
    st = new_store(tmp_path / "s", points, budget)
    st.stats.bytes_read = st.stats.bytes_written = 0
    st.factor(budget)
    assert (plan.slabs, plan.factor_read_bytes, plan.factor_write_bytes) == (
        st.stats.slabs, st.stats.bytes_read, st.stats.bytes_written)
    # brute force: each slab streams rows s0.. of every panel before it
    runs = slabs.plan_disk_slabs(N, BLOCK, 8, budget).slabs
    starts = list(range(0, N, BLOCK))
    streamed = sum((N - starts[j0]) * BLOCK for j0, _ in runs for _ in range(j0))
    assert plan.factor_read_bytes == (streamed + sum((N - s) * min(BLOCK, N - s) for s in starts)) * 8
    st.close()


# --- direct I/O: the same factor through the page cache or around it ----------------------------
def test_direct_and_buffered_io_give_the_same_bits_and_say_which_ran(tmp_path, points, references):
    budget, want = budget_for("wide"), references("wide")
    got = {}
    for direct in (True, False):
        st = new_store(tmp_path / f"s{direct}", points, budget, direct_io=direct)
        stats = st.factor(budget)
        got[direct] = factor_panels(st)
        assert stats.io.startswith("direct" if direct else "buffered")
        st.close()
    assert all(np.array_equal(a, b) for a, b in zip(got[True], got[False])) and len(got[True]) == len(want)
    assert all(np.array_equal(a, b) for a, b in zip(got[True], want))


def test_a_file_system_refusing_o_direct_falls_back_to_buffered_io(tmp_path, points, references, monkeypatch):
    from kernelfit import directio

    def refuse(path):
        raise directio.DirectIOUnsupported(errno.EINVAL, "O_DIRECT refused (test)")

    monkeypatch.setattr(diskstore, "open_direct", refuse)
    monkeypatch.setattr(directio, "open_direct", refuse)
    budget = budget_for("wide")
    st = new_store(tmp_path / "s", points, budget)
    assert not st.direct_io and "O_DIRECT refused" in st.stats.io
    st.factor(budget)
    assert all(np.array_equal(a, b) for a, b in zip(factor_panels(st), references("wide")))
    st.close()


def test_a_buffered_store_resumes_with_direct_io_bit_for_bit(tmp_path, points, references, interrupt_at_commit):
    """A store written through the page cache (numpy's 64-byte headers: the numbers not on an ALIGN
    boundary), interrupted, then resumed with direct I/O: its old files are read buffered, new ones direct."""
    budget, want = budget_for("wide"), references("wide")
    st = new_store(tmp_path / "s", points, budget, direct_io=False)
    interrupt_at_commit(st, 3)        # the third slab's commit fails: two slabs stay on disk
    with pytest.raises(RuntimeError, match="interrupted"):
        st.factor(budget)
    st.close()
    st = DiskPanels.open(tmp_path / "s", N, source={"kind": "test-gaussian", "seed": 0}, budget_bytes=budget,
                         block=BLOCK, dtype=np.float64, resume=True)
    assert st.direct_io and 0 < st.finished < len(st.starts)
    st.factor(budget)
    assert all(np.array_equal(a, b) for a, b in zip(factor_panels(st), want))
    st.close()
