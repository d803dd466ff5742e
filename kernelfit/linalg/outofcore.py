"""Out-of-core blocked Cholesky: host-resident panels streamed through a device working set.

The Gram (lower-triangle panels, ``SymmetricPanels`` of numpy arrays) stays in host memory; only
an explicit budget of *device* bytes is used at any time. The algorithm is left-looking over
**slabs** (runs of consecutive panels that fit in the budget):

    for each slab S (panels j0..j1-1, rows s0..n):
        load S's panels to the device
        for each finished panel k < j0:          # left-looking update, streamed
            copy rows s0.. of L_k to a device buffer (double-buffered: the copy of k+1 overlaps
            the GEMMs of k on a second CUDA stream)
            S_i -= L_k[rows of S_i] L_k[cols of S_i]^T for every panel i of S
        factor S in place with the in-core tiled algorithm (``tiled.cholesky_inplace``)
        write S back to the host

Host traffic is about n^3 / (6 W) numbers for slab width W (plus n^2/2 each way once), so the
budget should hold slabs much wider than one panel: with W = 16,384 columns, n = 150,000 moves
~0.14 TB in float32, a few seconds over PCIe 5. A left-looking order also never modifies the
trailing host panels, so a checkpoint only needs the newly finished panels (see checkpoint.py).

Devices: ``"numpy"`` (device buffers are separate numpy arrays; copies are ``np.copyto``), or any
torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``). The same code runs on all of them; only CUDA has
real streams/events and pinned host memory. CI runs the numpy and torch-CPU devices with tiny
budgets to force streaming; the CUDA overlap path is untested here (no GPU) - see tests/test_gpu.py.

Every device allocation goes through ``WorkingSet``, which refuses to exceed the budget and
records the peak, so the bound is checked, not assumed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError, MemoryPlanError, NotPositiveDefiniteError
from .tiled import SymmetricPanels, _panel_flops, cholesky_inplace


def _gib(b) -> str:
    # small sizes in MiB so two different numbers never print alike
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{int(b)} bytes"


class WorkingSet:
    """Device-byte accounting: every buffer the algorithm allocates on the device is counted here,
    plus a fixed reservation for backend temporaries. Exceeding the budget raises."""

    def __init__(self, budget: int, reserved: int = 0):
        self.budget, self.reserved = int(budget), int(reserved)
        self.current = self.reserved
        self.peak = self.current
        self._sizes = {}

    def alloc(self, dev, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.current + nbytes > self.budget:
            raise MemoryPlanError(f"out-of-core working set would exceed its device budget: {_gib(self.current)} in "
                                  f"use + {_gib(nbytes)} requested > {_gib(self.budget)}.")
        buf = dev.empty(shape, dtype)
        self._sizes[id(buf)] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        return buf

    def free(self, buf) -> None:
        self.current -= self._sizes.pop(id(buf))


# --- devices -------------------------------------------------------------------------------------

class NumpyDevice:
    """A 'device' whose memory is separate numpy arrays: exercises the streaming logic on any CPU."""

    backend = "numpy"
    name = "numpy"
    is_cuda = False
    pinned = False

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def to_device(self, dst, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def to_host(self, dst: np.ndarray, src) -> None:
        np.copyto(dst, src)

    # no streams: copies are synchronous
    def copy_in_streamed(self, dst, src, slot):
        self.to_device(dst, src)

    def wait_copied(self, slot):
        pass

    def mark_computed(self, slot):
        pass

    def synchronize(self):
        pass

    def pin(self, arrays):
        return False

    def compute_begin(self):
        return None

    def compute_end(self, start):
        pass

    def busy_seconds(self):
        return None   # no separate device: compute and copies are the same CPU time

    def unpin(self):
        pass

    def workspace_bytes(self, block, rows, itemsize) -> int:
        return 0   # scipy's potrf/trsm/gemm work in place on the panels


class TorchDevice:
    """A torch device (CPU or CUDA). On CUDA: a copy stream + events overlap the streamed copies of
    finished panels with the update GEMMs on the compute stream (UNTESTED ON A GPU here)."""

    backend = "torch"

    def __init__(self, device):
        from .backend_torch import TRSM_CHUNK_ELEMENTS, require_torch, resolve_device

        self.torch = require_torch()
        self.device = resolve_device(device)
        self.name = str(self.device)
        self.is_cuda = self.device.type == "cuda"
        self.trsm_chunk = TRSM_CHUNK_ELEMENTS
        self.pinned = False
        self._registered = []
        self._spans = []
        if self.is_cuda:
            self.copy_stream = self.torch.cuda.Stream(device=self.device)
            self.copied = [self.torch.cuda.Event(), self.torch.cuda.Event()]
            self.computed = [None, None]

    # GPU busy time: timing events on the compute stream around each batch of kernels. A start event
    # recorded after wait_copied() fires when the copy is done, so spans exclude waiting for copies.
    def compute_begin(self):
        if not self.is_cuda:
            return None
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record(self.torch.cuda.current_stream(self.device))
        return ev

    def compute_end(self, start):
        if start is None:
            return
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record(self.torch.cuda.current_stream(self.device))
        self._spans.append((start, ev))

    def busy_seconds(self):
        if not self.is_cuda:
            return None
        self.torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self._spans) / 1e3

    def empty(self, shape, dtype):
        from .backend_torch import torch_dtype

        return self.torch.empty(tuple(shape), dtype=torch_dtype(dtype), device=self.device)

    def to_device(self, dst, src: np.ndarray) -> None:
        dst.copy_(self.torch.from_numpy(src), non_blocking=self.pinned)

    def to_host(self, dst: np.ndarray, src) -> None:
        self.torch.from_numpy(dst).copy_(src, non_blocking=self.pinned)

    def copy_in_streamed(self, dst, src, slot):
        if not self.is_cuda:
            return self.to_device(dst, src)
        torch = self.torch
        with torch.cuda.stream(self.copy_stream):
            if self.computed[slot] is not None:      # the GEMMs that read this buffer last are done
                self.copy_stream.wait_event(self.computed[slot])
            dst.copy_(torch.from_numpy(src), non_blocking=self.pinned)
            self.copied[slot].record(self.copy_stream)

    def wait_copied(self, slot):
        if self.is_cuda:
            self.torch.cuda.current_stream(self.device).wait_event(self.copied[slot])

    def mark_computed(self, slot):
        if self.is_cuda:
            ev = self.torch.cuda.Event()
            ev.record(self.torch.cuda.current_stream(self.device))
            self.computed[slot] = ev

    def synchronize(self):
        if self.is_cuda:
            self.torch.cuda.synchronize(self.device)
            self.computed = [None, None]

    def pin(self, arrays) -> bool:
        """Page-lock the host panels (cudaHostRegister) so copies are asynchronous DMA."""
        if not self.is_cuda:
            return False
        ok = True
        try:
            cudart = self.torch.cuda.cudart()
            for a in arrays:
                if a.nbytes and int(cudart.cudaHostRegister(a.ctypes.data, a.nbytes, 0)) == 0:
                    self._registered.append(a)
                else:
                    ok = False
        except Exception:   # no cudart binding: fall back to pageable (synchronous) copies
            ok = False
        self.pinned = ok
        return ok

    def unpin(self):
        if self._registered:
            cudart = self.torch.cuda.cudart()
            for a in self._registered:
                cudart.cudaHostUnregister(a.ctypes.data)
            self._registered = []
        self.pinned = False

    def workspace_bytes(self, block, rows, itemsize) -> int:
        # cholesky_ex's output tile + one trsm row chunk (torch's triangular solve is out of place)
        return (block * block + min(rows * block, max(self.trsm_chunk, block))) * itemsize


def make_device(device):
    """'numpy' -> NumpyDevice; anything else is a torch device spec ('cpu', 'cuda', 'cuda:0', torch.device)."""
    if device is None or (isinstance(device, str) and device == "numpy"):
        return NumpyDevice()
    return TorchDevice(device)


# --- planning ------------------------------------------------------------------------------------

@dataclass
class SlabPlan:
    n: int
    block: int
    itemsize: int
    budget: int
    buffers: int                 # streamed-panel buffers (2 = double-buffered copy/compute overlap)
    slabs: list                  # [(j0, j1), ...] panel ranges
    workspace: int

    @property
    def min_budget(self) -> int:
        return min_budget_bytes(self.n, self.block, self.itemsize, self.workspace)


def min_budget_bytes(n, block, itemsize, workspace=0, buffers=1) -> int:
    """Smallest budget that runs at all: the widest single-panel slab after the first (rows n-block..)
    plus its streamed buffers, or the first panel alone."""
    first = n * min(block, n) * itemsize
    if n <= block:
        return first + workspace
    rows = n - block
    second = rows * min(block, rows) * itemsize + buffers * rows * block * itemsize
    return max(first, second) + workspace


def plan_slabs(n: int, block: int, itemsize: int, budget: int, workspace: int = 0, start_panel: int = 0) -> SlabPlan:
    """Greedy slabs: from each start, take panels while slab + stream buffers + workspace fit.
    Uses two stream buffers (overlap) when the budget allows, else one; raises when even one
    panel does not fit, naming the numbers and the fix."""
    starts = list(range(0, n, block))
    widths = [min(block, n - s) for s in starts]
    need1 = min_budget_bytes(n, block, itemsize, workspace, buffers=1)
    if budget < need1:
        raise MemoryPlanError(
            f"device budget {_gib(budget)} is too small for out-of-core Cholesky with n={n}, block={block} "
            f"({itemsize}-byte numbers): one panel + one streamed panel + workspace need {_gib(need1)}. "
            f"Use a smaller block (panel bytes = n x block x {itemsize}) or a larger device_memory_budget.")
    buffers = 2 if budget >= min_budget_bytes(n, block, itemsize, workspace, buffers=2) else 1
    slabs = []
    j0 = start_panel
    while j0 < len(starts):
        s0 = starts[j0]
        rows = n - s0
        fixed = workspace + (buffers * rows * block * itemsize if j0 > 0 else 0)
        used, j1 = fixed, j0
        while j1 < len(starts):
            p = (n - starts[j1]) * widths[j1] * itemsize
            if used + p > budget and j1 > j0:
                break
            used += p
            j1 += 1
        slabs.append((j0, j1))
        j0 = j1
    return SlabPlan(n=n, block=block, itemsize=itemsize, budget=int(budget), buffers=buffers, slabs=slabs,
                    workspace=workspace)


@dataclass
class OutOfCoreStats:
    device: str
    backend: str
    budget_bytes: int
    peak_device_bytes: int
    buffers: int
    slabs: int
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    pinned: bool = False
    timings_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def cholesky_out_of_core(G: SymmetricPanels, device="numpy", budget_bytes: int | None = None, progress=None,
                         jitter: float = 0.0, start_panel: int = 0, on_panel_done=None, pin: bool = True,
                         stats_out: dict | None = None) -> SymmetricPanels:
    """Overwrite host panels G (numpy) with the Cholesky factor, using at most ``budget_bytes`` of
    device memory. ``start_panel``: panels before it already hold the final factor (resume);
    ``on_panel_done(j)`` is called after each slab is back on the host, with its last panel index.
    Returns G; fills ``stats_out`` (if given) with an ``OutOfCoreStats`` dict."""
    from .backend import get_backend

    if not all(isinstance(P, np.ndarray) for P in G.panels):
        raise InputError("cholesky_out_of_core expects host panels (numpy arrays); got "
                         f"{type(G.panels[0]).__name__}. Keep the Gram on the host; the device is the working set.")
    dev = make_device(device)
    be = get_backend(dev.backend)
    n, block, itemsize = G.n, G.block, G.dtype.itemsize
    workspace = dev.workspace_bytes(block, n, itemsize)
    if budget_bytes is None:
        budget_bytes = G.nbytes + workspace
    plan = plan_slabs(n, block, itemsize, int(budget_bytes), workspace, start_panel)
    ws = WorkingSet(plan.budget, reserved=workspace)
    starts = G.starts
    stats = OutOfCoreStats(device=dev.name, backend=dev.backend, budget_bytes=plan.budget, peak_device_bytes=0,
                           buffers=plan.buffers, slabs=len(plan.slabs))
    t_load = t_stream = t_factor = t_store = 0.0
    stats.pinned = dev.pin(G.panels) if pin else False
    t_all = time.perf_counter()
    try:
        for j0, j1 in plan.slabs:
            s0 = starts[j0]
            t = time.perf_counter()
            slab = []
            for j in range(j0, j1):
                buf = ws.alloc(dev, G.panels[j].shape, G.dtype)
                dev.to_device(buf, G.panels[j])
                stats.h2d_bytes += G.panels[j].nbytes
                slab.append(buf)
            t_load += time.perf_counter() - t

            t = time.perf_counter()
            if j0 > 0:
                bufs = [ws.alloc(dev, (n - s0, block), G.dtype) for _ in range(plan.buffers)]
                for k in range(j0):
                    slot = k % plan.buffers
                    piece = G.panels[k][s0 - starts[k]:]           # rows s0.. of finished panel k
                    dev.copy_in_streamed(bufs[slot], piece, slot)
                    stats.h2d_bytes += piece.nbytes
                    dev.wait_copied(slot)
                    span = dev.compute_begin()
                    Lk = bufs[slot]
                    for i, Pi in zip(range(j0, j1), slab):
                        off = starts[i] - s0
                        be.syrk_update(Pi, Lk[off:], Lk[off : off + Pi.shape[1]])
                    dev.compute_end(span)
                    dev.mark_computed(slot)
                dev.synchronize()
                for b in bufs:
                    ws.free(b)
            t_stream += time.perf_counter() - t

            t = time.perf_counter()
            sub = SymmetricPanels(n=n - s0, block=block, panels=slab)
            span = dev.compute_begin()
            try:
                cholesky_inplace(sub, backend=dev.backend, jitter=jitter)
            except NotPositiveDefiniteError as exc:
                raise NotPositiveDefiniteError(minor=exc.minor + s0, n=n, dtype=str(G.dtype), jitter=jitter) from None
            dev.compute_end(span)
            dev.synchronize()
            t_factor += time.perf_counter() - t

            t = time.perf_counter()
            for j, buf in zip(range(j0, j1), slab):
                dev.to_host(G.panels[j], buf)
                stats.d2h_bytes += G.panels[j].nbytes
            dev.synchronize()
            for buf in slab:
                ws.free(buf)
            t_store += time.perf_counter() - t
            if progress is not None:
                progress.update(sum(_panel_flops(n, starts[j], G.panels[j].shape[1]) for j in range(j0, j1)))
            if on_panel_done is not None:
                on_panel_done(j1 - 1)
    finally:
        dev.unpin()
        stats.peak_device_bytes = ws.peak
        # On CUDA the streamed copies overlap the GEMMs, so 'stream' is copies + updates together.
        total = time.perf_counter() - t_all
        stats.timings_s = {"load": t_load, "stream_update": t_stream, "factor_slab": t_factor, "store": t_store,
                           "total": total}
        busy = dev.busy_seconds()
        if busy is not None:   # CUDA only: fraction of the wall time the compute stream ran kernels
            stats.timings_s["gpu_busy"] = busy
            stats.timings_s["gpu_busy_fraction"] = busy / total if total > 0 else float("nan")
        if stats_out is not None:
            stats_out.update(stats.to_dict())
    return G


def build_gram_panels_device(X, kernel: str, bandwidth: float, block: int | None = None, dtype=np.float32,
                             device="cpu", out: SymmetricPanels | None = None, center: bool = True) -> SymmetricPanels:
    """Lower-triangle Gram panels computed on a torch device, one panel at a time, and written to
    host panels (never the whole Gram on the device). TF32 is off for the distance GEMMs. Points are
    centered first (in float64; the kernels are translation-invariant), which keeps the float32
    |x|^2 + |z|^2 - 2 x.z expansion accurate for data far from the origin, as solve.py does."""
    from .backend_torch import gram_tile_into, require_torch, resolve_device, torch_dtype

    torch = require_torch()
    dev = resolve_device(device)
    X = np.asarray(X, dtype=np.float64)
    if center:
        X = X - X.mean(axis=0)
    X = np.ascontiguousarray(X, dtype=dtype)
    n = X.shape[0]
    G = out if out is not None else SymmetricPanels.empty(n, block, dtype)
    Xd = torch.from_numpy(X).to(dev)
    sq = (Xd * Xd).sum(1)
    tile = torch.empty((n, G.block), dtype=torch_dtype(dtype), device=dev)
    for s, P in zip(G.starts, G.panels):
        w = P.shape[1]
        T = tile[: n - s, :w]
        gram_tile_into(T, Xd[s:], Xd[s : s + w], sq[s:], sq[s : s + w], kernel, bandwidth)
        T[torch.arange(w), torch.arange(w)] = 1.0      # k(x, x) = 1 exactly, as in kernelfit.gram
        torch.from_numpy(P).copy_(T)
    return G
