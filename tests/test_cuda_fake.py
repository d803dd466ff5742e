"""The CUDA stream / event / pinned-memory logic of the streamed copies, driven on CPU tensors by a
recording fake of ``outofcore.CudaOps``: the order of copies, waits and host synchronizations is
checked against the rules that make asynchronous copies safe, and a failed pinned allocation
falls back to pageable copies with a warning. Results are compared with LAPACK."""

import itertools

import numpy as np
import pytest
import scipy.linalg

torch = pytest.importorskip("torch")

from kernelfit.linalg.factor import factor  # noqa: E402
from kernelfit.linalg.options import FactorOptions  # noqa: E402
from kernelfit.linalg.outofcore import STAGING_SLOTS, TorchDevice, cholesky_out_of_core, plan_slabs  # noqa: E402
from kernelfit.linalg.panels import SymmetricPanels  # noqa: E402


class FakeEvent:
    def __init__(self, log, ids):
        self.log, self.id, self.stream = log, next(ids), None

    def record(self, stream):
        self.stream = stream.name
        self.log.append(("record", stream.name, self.id))

    def synchronize(self):
        assert self.stream is not None, "host waits for an event that was never recorded"
        self.log.append(("host_wait", self.id))

    def elapsed_time(self, other):
        return 1.0


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_event(self, ev):
        assert ev.stream is not None, "a stream waits for an event that was never recorded"
        self.log.append(("wait", self.name, ev.id))


class RecordingCuda:
    """Stands in for CudaOps on CPU tensors; copies run at once (CPU), and every call is logged."""

    def __init__(self, fail_pinning=False):
        self.log, self._ids, self.fail_pinning = [], itertools.count(), fail_pinning
        self.compute = FakeStream(self.log, "compute")
        self._current = [self.compute]
        self._streams = itertools.count()
        self.staging = []

    def stream(self):
        return FakeStream(self.log, f"side{next(self._streams)}")

    def current_stream(self):
        return self._current[-1]

    class _Use:
        def __init__(self, ops, s):
            self.ops, self.s = ops, s

        def __enter__(self):
            self.ops._current.append(self.s)

        def __exit__(self, *exc):
            self.ops._current.pop()

    def use_stream(self, stream):
        return self._Use(self, stream)

    def event(self, timing=False):
        return FakeEvent(self.log, self._ids)

    def synchronize(self):
        self.log.append(("device_sync",))

    def pinned_empty(self, numel, dtype):
        if self.fail_pinning:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        buf = torch.empty(int(numel), dtype=dtype)
        self.staging.append(buf)
        return buf

    def _slot(self, t):
        for i, s in enumerate(self.staging):
            if s.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                return i
        return None

    def copy(self, dst, src, non_blocking):
        kind = ("stage_in" if self._slot(dst) is not None and self._slot(src) is None and src.device.type == "cpu"
                and not non_blocking else "dma" if non_blocking else "pageable")
        slot = self._slot(dst) if self._slot(dst) is not None else self._slot(src)
        self.log.append(("copy", kind, self.current_stream().name, slot, non_blocking))
        dst.copy_(src)


def spd(n, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n + 3))
    return (A @ A.T / n + np.eye(n)).astype(dtype)


def _run_out_of_core(fake, n=160, block=12, slabs=3):
    A = spd(n, seed=n)
    G = SymmetricPanels.from_dense(A, block)
    dev = TorchDevice("cpu", cuda_ops=fake)
    ws = dev.workspace_bytes(block, n, 8)
    budget = G.nbytes // slabs + ws
    assert len(plan_slabs(n, block, 8, budget, ws).slabs) >= slabs
    stats = {}
    cholesky_out_of_core(G, device=dev, budget_bytes=budget, stats_out=stats)
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)
    return stats


def test_staged_copies_are_ordered_safely():
    fake = RecordingCuda()
    stats = _run_out_of_core(fake)
    assert stats["pinned"] and stats["slabs"] >= 3 and len(fake.staging) == STAGING_SLOTS
    assert stats["timings_s"]["gpu_busy"] > 0                      # CUDA-event spans were recorded
    log = fake.log
    # 1. the host overwrites a staging buffer only after the DMA that last read it is done
    last_dma_event = {}
    waited = set()
    for i, e in enumerate(log):
        if e[0] == "host_wait":
            waited.add(e[1])
        if e[0] == "copy" and e[1] == "stage_in":
            slot = e[3]
            if slot in last_dma_event:
                assert last_dma_event[slot] in waited, f"staging slot {slot} overwritten before its DMA finished"
        if e[0] == "copy" and e[1] == "dma" and e[2] != "none":
            # the event recorded right after this DMA, on the same stream
            rec = next(r for r in log[i + 1:] if r[0] == "record")
            assert rec[1] == e[2]
            last_dma_event[e[3]] = rec[2]
    # 2. every streamed DMA (side stream) is waited for by the compute stream before the GEMMs use it
    side_events = []
    for i, e in enumerate(log):
        if e[0] == "copy" and e[1] == "dma" and e[2].startswith("side"):
            side_events.append(next(r for r in log[i + 1:] if r[0] == "record")[2])
    assert side_events, "no copy ran on the copy stream"
    compute_waits = [e[2] for e in log if e[0] == "wait" and e[1] == "compute"]
    assert set(side_events) <= set(compute_waits)
    # 3. a streamed buffer is refilled only after the compute stream marked the GEMMs that read it
    computed = [e[2] for e in log if e[0] == "record" and e[1] == "compute"]
    side_waits = [e[2] for e in log if e[0] == "wait" and e[1].startswith("side")]
    assert side_waits and set(side_waits) <= set(computed)
    # 4. device -> host copies of results are DMAs into pinned memory, then host copies out
    assert any(e[0] == "copy" and e[1] == "dma" and e[2] == "compute" for e in log)
    assert ("copy", "pageable", "compute", None, False) not in log


def test_failed_pinning_falls_back_to_pageable_with_a_warning():
    fake = RecordingCuda(fail_pinning=True)
    with pytest.warns(RuntimeWarning, match="pinned host staging buffers.*pageable"):
        stats = _run_out_of_core(fake)
    assert stats["pinned"] is False and stats["slabs"] >= 3
    copies = [e for e in fake.log if e[0] == "copy"]
    assert copies and all(e[1] == "pageable" and e[4] is False for e in copies)   # no async copy of pageable memory


def test_in_core_factor_stages_through_pinned_buffers(monkeypatch):
    # factor() builds the device through make_device: give it the fake-driven TorchDevice
    import kernelfit.linalg.outofcore as ooc

    fake = RecordingCuda()
    monkeypatch.setattr(ooc, "make_device", lambda d: TorchDevice("cpu", cuda_ops=fake))
    A = spd(70, seed=3)
    G = SymmetricPanels.from_dense(A, 16)
    info = factor(G, FactorOptions(backend="torch", device="cpu", out_of_core=False, device_memory_budget=10 * G.nbytes))
    assert info.device_memory["pinned_staging"] is True and info.bytes_moved["d2h"] == G.nbytes
    np.testing.assert_allclose(G.to_dense(False), scipy.linalg.cholesky(A, lower=True), atol=1e-12)
    assert sum(1 for e in fake.log if e[0] == "copy" and e[1] == "dma") == 2 * len(G.panels)
