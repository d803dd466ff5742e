"""The left-looking slab Cholesky over a slow memory, within a RAM budget.

A slab is a run of panels that fits in RAM; for each slab, the finished factor panels before it are
streamed through (the next one read on a thread while the GEMMs of the previous one run), the slab is
factored in RAM, and committed. ``left_looking`` talks to its slow memory through three calls
(``read_input(j, out)``, ``read_factor_rows(k, row0, out)``, ``commit_slab(j0, panels)``);
``diskstore.DiskPanels`` is the disk implementation. When the budget holds two slabs
(``plan_disk_slabs``), the commit of slab s runs on a writer thread while slab s+1 proceeds.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import MemoryPlanError, NotPositiveDefiniteError
from ..results import format_bytes
from .backend import get_backend
from .outofcore import min_budget_bytes, plan_slabs
from .panels import SymmetricPanels, panel_flops
from .tiled import cholesky_inplace


def _check_budget(n: int, block: int, itemsize: int, budget_bytes) -> None:
    need = min_budget_bytes(n, block, itemsize, 0, buffers=1)
    if budget_bytes is None or int(budget_bytes) < need:
        raise MemoryPlanError(f"memory budget {format_bytes(int(budget_bytes or 0))} is too small for a disk "
                              f"factorization with n={n}, block={block} ({itemsize}-byte numbers): one panel and one "
                              f"streamed panel need {format_bytes(need)}. Fix: a larger --memory-budget or a smaller "
                              f"block.")


@dataclass
class DiskSlabPlan:
    """The slabs of a disk factorization and whether consecutive slabs overlap (see ``plan_disk_slabs``)."""
    slabs: list          # [(j0, j1), ...] panel ranges
    buffers: int         # streamed-panel buffers (2: the read of panel k+1 overlaps the GEMMs of k)
    overlap: bool        # a writer thread commits slab s while slab s+1 runs


def plan_disk_slabs(n: int, block: int, itemsize: int, budget: int, start_panel: int = 0) -> DiskSlabPlan:
    """Slabs for ``left_looking``. Overlapped when the budget allows: slab s stays in RAM while a writer
    thread commits it and slab s+1 reads its inputs and streams its updates (the panels of slab s from
    RAM), so every two consecutive slabs plus slab s+1's two stream buffers must fit the budget. The
    greedy rule takes panels while 2 x slab + buf <= budget, buf being the two buffers of the slab's
    first streamed rows (panel max(j0, 1)); buffers shrink with the rows, so slab s + slab s+1 +
    buf(s+1) <= budget. When even one-panel slabs do not fit that rule (small budgets), the plain
    ``plan_slabs`` with the whole budget and synchronous commits. The choice depends only on
    (n, block, itemsize, budget), never on ``start_panel``: a resume replans the same slabs."""
    starts = SymmetricPanels.starts_for(n, block)
    widths = [min(block, n - s) for s in starts]
    panel = [(n - s) * w * itemsize for s, w in zip(starts, widths)]
    buf = [2 * (n - starts[max(j, 1)]) * block * itemsize if len(starts) > 1 else 0 for j in range(len(starts))]
    if any(2 * p + b > budget for p, b in zip(panel, buf)):
        plan = plan_slabs(n, block, itemsize, int(budget), 0, start_panel)
        return DiskSlabPlan(slabs=plan.slabs, buffers=plan.buffers, overlap=False)
    slabs, j0 = [], start_panel
    while j0 < len(starts):
        used, j1 = 0, j0
        while j1 < len(starts) and 2 * (used + panel[j1]) + buf[j0] <= budget:
            used += panel[j1]
            j1 += 1
        slabs.append((j0, j1))
        j0 = j1
    return DiskSlabPlan(slabs=slabs, buffers=2, overlap=True)


def left_looking(slow, budget_bytes: int, progress=None, jitter: float = 0.0) -> None:
    """Left-looking slab Cholesky over a slow memory ``slow`` (n, block, dtype, starts, widths,
    finished, stats; read_input(j, out), read_factor_rows(k, row0, out), commit_slab(j0, panels)).

    Per slab (``plan_disk_slabs``): its input panels (read ahead on the reader thread while the previous
    slab factors, when overlapped); for each finished panel k < j0 subtract L_k L_k^T from the slab,
    panel k+1 being read on the reader thread while the GEMMs of k run (the previous slab's panels come
    from RAM); factor the slab in RAM (``tiled.cholesky_inplace``); hand it to the writer thread.

    Order on disk is kept: one commit in flight at a time (slab s's commit is waited for before slab
    s+1's starts, so manifests stay in slab order and files of panels < the previous slab exist before
    they are streamed); a writer error (a full disk) surfaces here as its StorageError, finished slabs
    kept. Main-thread waits: timings 'read_wait' (inputs), 'stream_wait', 'write_wait' (commits), all
    in ``io_wait_s``; 'read_slab' / 'write_slab' are the reader's / writer's own seconds."""
    n, block, dtype = slow.n, slow.block, slow.dtype
    _check_budget(n, block, dtype.itemsize, budget_bytes)
    plan = plan_disk_slabs(n, block, dtype.itemsize, int(budget_bytes), slow.finished)
    st = slow.stats
    st.budget_bytes, st.slabs, st.first_panel = int(budget_bytes), len(plan.slabs), slow.finished
    timer = st.timings_s
    for key in ("read_slab", "read_wait", "stream_update", "stream_wait", "factor_slab", "write_slab", "write_wait"):
        timer.setdefault(key, 0.0)
    syrk_update = get_backend("numpy").syrk_update

    def read_slab(j0, j1):                  # reader thread
        t = time.perf_counter()
        slab = [np.empty((n - slow.starts[j], slow.widths[j]), dtype=dtype) for j in range(j0, j1)]
        for j, P in zip(range(j0, j1), slab):
            slow.read_input(j, P)
        timer["read_slab"] += time.perf_counter() - t
        return slab

    def commit(j0, slab):                   # writer thread
        t = time.perf_counter()
        slow.commit_slab(j0, slab)
        timer["write_slab"] += time.perf_counter() - t

    def wait(fut, key):
        t = time.perf_counter()
        try:
            return fut.result()
        finally:
            timer[key] += time.perf_counter() - t
            st.io_wait_s += time.perf_counter() - t

    pending = None                          # (future, flops) of the commit in flight
    prev, p0 = None, None                   # the previous slab's panels (in RAM while committed) and j0

    def settle():                           # wait for the commit in flight; then its slab may go
        nonlocal pending, prev
        if pending is not None:
            fut, flops = pending
            pending = None
            wait(fut, "write_wait")
            if progress is not None:
                progress.update(flops)
        if not plan.overlap:
            prev = None

    t_all = time.perf_counter()
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        ahead = reader.submit(read_slab, *plan.slabs[0])
        for si, (j0, j1) in enumerate(plan.slabs):
            s0 = slow.starts[j0]
            slab = wait(ahead, "read_wait")
            ahead = None
            on_disk = p0 if prev is not None else j0      # panels 0..on_disk-1 are streamed from disk
            if j0 > 0:
                t = time.perf_counter()
                bufs = [np.empty((n - s0, block), dtype=dtype) for _ in range(plan.buffers if on_disk else 0)]
                fut = reader.submit(slow.read_factor_rows, 0, s0, bufs[0]) if on_disk else None
                for k in range(j0):
                    if k < on_disk:
                        w0 = time.perf_counter()
                        fut.result()
                        st.io_wait_s += time.perf_counter() - w0
                        timer["stream_wait"] += time.perf_counter() - w0
                        Lk = bufs[k % plan.buffers]
                        if k + 1 < on_disk and plan.buffers == 2:    # read k+1 while the GEMMs of k run
                            fut = reader.submit(slow.read_factor_rows, k + 1, s0, bufs[(k + 1) % 2])
                    else:
                        Lk = prev[k - p0][s0 - slow.starts[k]:]
                    for i, Pi in zip(range(j0, j1), slab):
                        off = slow.starts[i] - s0
                        syrk_update(Pi, Lk[off:], Lk[off : off + Pi.shape[1]])
                    if k + 1 < on_disk and plan.buffers == 1:    # one buffer: read after the GEMMs
                        fut = reader.submit(slow.read_factor_rows, k + 1, s0, bufs[0])
                del bufs, Lk
                timer["stream_update"] += time.perf_counter() - t
            settle()                        # the previous slab is on disk; its RAM is free
            prev = None
            if plan.overlap and si + 1 < len(plan.slabs):     # two slabs in RAM: this one and the next's inputs
                ahead = reader.submit(read_slab, *plan.slabs[si + 1])
            t = time.perf_counter()
            try:
                cholesky_inplace(SymmetricPanels(n=n - s0, block=block, panels=slab), jitter=jitter)
            except NotPositiveDefiniteError as exc:
                raise NotPositiveDefiniteError(minor=exc.minor + s0, n=n, dtype=str(dtype), jitter=jitter) from None
            timer["factor_slab"] += time.perf_counter() - t
            pending = (writer.submit(commit, j0, slab),
                       sum(panel_flops(n, slow.starts[j], slow.widths[j]) for j in range(j0, j1)))
            if plan.overlap:
                prev, p0 = slab, j0
            else:
                settle()
                if si + 1 < len(plan.slabs):
                    ahead = reader.submit(read_slab, *plan.slabs[si + 1])
            del slab
        settle()
    timer["factor_total"] = timer.get("factor_total", 0.0) + time.perf_counter() - t_all
