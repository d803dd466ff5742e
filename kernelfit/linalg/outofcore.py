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
torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"meta"`` for shape-only dry runs). The same code
runs on all of them; only CUDA has streams, events and pinned staging buffers, and those calls go
through ``CudaOps``. CI runs the numpy and torch-CPU devices with small budgets to force streaming,
the CUDA ordering on CPU tensors under a recording fake of ``CudaOps`` (tests/test_cuda_fake.py),
and full-size plans on the meta device; tests/test_gpu.py runs the same cases on a GPU.

Every device allocation goes through ``WorkingSet``, which refuses to exceed the budget and
records the peak, so the bound is checked, not assumed.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError, MemoryPlanError, NotPositiveDefiniteError
from ..results import format_bytes
from .panels import SymmetricPanels, panel_flops
from .tiled import cholesky_inplace


class WorkingSet:
    """Device-byte accounting of *live* buffers, plus a fixed reservation for backend temporaries.

    A buffer's bytes count until the buffer and every view of it are garbage (``weakref.finalize``),
    not until the algorithm says it is done with it, so the bound holds for what is really allocated.
    Allocating past the budget raises."""

    def __init__(self, budget: int, reserved: int = 0):
        self.budget, self.reserved = int(budget), int(reserved)
        self.current = self.reserved
        self.peak = self.current

    def alloc(self, dev, shape, dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.current + nbytes > self.budget:
            raise MemoryPlanError(f"out-of-core working set would exceed its device budget: {format_bytes(self.current)} in "
                                  f"use + {format_bytes(nbytes)} requested > {format_bytes(self.budget)}.")
        buf = dev.empty(shape, dtype)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(buf, self._release, nbytes)
        return buf

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes


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

    def stage(self, max_elements, dtype) -> bool:
        return False

    def release(self):
        pass

    def compute_begin(self):
        return None

    def compute_end(self, start):
        pass

    def busy_seconds(self):
        return None   # no separate device: compute and copies are the same CPU time

    def workspace_bytes(self, block, rows, itemsize) -> int:
        return 0   # scipy's potrf/trsm/gemm work in place on the panels


class CudaOps:
    """Every CUDA stream / event / pinned-memory call of the streamed copies, in one place, so that
    a recording fake can stand in for it on a machine without a GPU (tests/test_cuda_fake.py)."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def stream(self):
        return self.torch.cuda.Stream(device=self.device)

    def current_stream(self):
        return self.torch.cuda.current_stream(self.device)

    def use_stream(self, stream):
        return self.torch.cuda.stream(stream)

    def event(self, timing: bool = False):
        return self.torch.cuda.Event(enable_timing=timing)

    def synchronize(self):
        self.torch.cuda.synchronize(self.device)

    def pinned_empty(self, numel: int, dtype):
        return self.torch.empty(int(numel), dtype=dtype, pin_memory=True)

    def copy(self, dst, src, non_blocking: bool) -> None:
        dst.copy_(src, non_blocking=non_blocking)


STAGING_SLOTS = 2   # pinned host buffers: staging slot k+1 on the host while slot k's DMA runs


class TorchDevice:
    """A torch device: CPU, CUDA, or "meta" (shapes and dtypes only: a full-size dry run in seconds).

    On CUDA, host <-> device copies go through ``STAGING_SLOTS`` pinned host buffers of one panel
    each (allocated once, outside the per-panel loop): a panel is copied into a staging buffer on the
    host, then DMA'd asynchronously. The Gram itself is never page-locked (cudaHostRegister of tens
    of GB costs seconds and can fail); when even the staging buffers cannot be pinned the copies
    fall back to pageable (synchronous) ones with a warning. A copy stream and events overlap the
    streamed copies of finished panels with the update GEMMs on the compute stream. ``cuda_ops``
    replaces the CUDA calls (tests drive the same logic on CPU tensors with a recording fake)."""

    backend = "torch"

    def __init__(self, device, cuda_ops=None):
        from .backend_torch import TRSM_CHUNK_ELEMENTS, require_torch, resolve_device

        self.torch = require_torch()
        self.device = resolve_device(device)
        self.name = str(self.device)
        self.is_meta = self.device.type == "meta"
        if cuda_ops is None and self.device.type == "cuda":
            cuda_ops = CudaOps(self.torch, self.device)
        self.ops = cuda_ops
        self.is_cuda = cuda_ops is not None
        self.trsm_chunk = TRSM_CHUNK_ELEMENTS
        self.pinned = False
        self._staging = []
        self._spans = []
        if self.is_cuda:
            self.copy_stream = self.ops.stream()
            self.copied = [None, None]      # per stream buffer: its DMA is done
            self.computed = [None, None]    # per stream buffer: the GEMMs that read it are done
            self._staged = [None] * STAGING_SLOTS   # per staging buffer: the DMA that used it last
            self._next_slot = 0

    # GPU busy time: timing events on the compute stream around each batch of kernels. A start event
    # recorded after wait_copied() fires when the copy is done, so spans exclude waiting for copies.
    def compute_begin(self):
        if not self.is_cuda:
            return None
        ev = self.ops.event(timing=True)
        ev.record(self.ops.current_stream())
        return ev

    def compute_end(self, start):
        if start is None:
            return
        ev = self.ops.event(timing=True)
        ev.record(self.ops.current_stream())
        self._spans.append((start, ev))

    def busy_seconds(self):
        if not self.is_cuda:
            return None
        self.ops.synchronize()
        return sum(a.elapsed_time(b) for a, b in self._spans) / 1e3

    def empty(self, shape, dtype):
        from .backend_torch import torch_dtype

        return self.torch.empty(tuple(shape), dtype=torch_dtype(dtype), device=self.device)

    # --- staging through pinned host buffers -----------------------------------------------------
    def stage(self, max_elements: int, dtype) -> bool:
        """Allocate the pinned staging buffers (CUDA only). False, with a warning, when pinning fails."""
        if not self.is_cuda or self._staging:
            return self.pinned
        from .backend_torch import torch_dtype

        try:
            self._staging = [self.ops.pinned_empty(max_elements, torch_dtype(dtype)) for _ in range(STAGING_SLOTS)]
        except Exception as exc:   # cudaHostAlloc refused (locked-memory limit, no memory): pageable copies
            self._staging = []
            warnings.warn(f"could not allocate {STAGING_SLOTS} pinned host staging buffers of "
                          f"{format_bytes(max_elements * np.dtype(dtype).itemsize)} ({exc}); host<->device copies fall back "
                          f"to pageable memory (synchronous, slower).", RuntimeWarning, stacklevel=3)
        self.pinned = bool(self._staging)
        return self.pinned

    def release(self):
        if self.is_cuda:
            self.ops.synchronize()
            self._staged = [None] * STAGING_SLOTS
        self._staging = []
        self.pinned = False

    def _staging_view(self, slot: int, shape):
        """The pinned buffer ``slot`` as an array of ``shape``, once the DMA that last used it is done."""
        if self._staged[slot] is not None:
            self._staged[slot].synchronize()      # the host waits for that one copy only
            self._staged[slot] = None
        numel = int(np.prod(shape))
        return self._staging[slot][:numel].view(tuple(shape))

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot = (slot + 1) % STAGING_SLOTS
        return slot

    def _h2d(self, dst, src: np.ndarray, stream) -> None:
        """dst <- src on ``stream``: through a staging buffer when pinned, else a pageable copy."""
        host = self.torch.from_numpy(src)
        if not self.pinned:
            self.ops.copy(dst, host, non_blocking=False)
            return
        slot = self._take_slot()
        view = self._staging_view(slot, src.shape)
        self.ops.copy(view, host, non_blocking=False)      # host memcpy into pinned memory
        with self.ops.use_stream(stream):
            self.ops.copy(dst, view, non_blocking=True)    # asynchronous DMA
            ev = self.ops.event()
            ev.record(stream)
        self._staged[slot] = ev
        return ev

    def to_device(self, dst, src: np.ndarray) -> None:
        if not self.is_cuda:
            dst.copy_(self.torch.from_numpy(src))
            return
        self._h2d(dst, src, self.ops.current_stream())

    def to_host(self, dst: np.ndarray, src) -> None:
        if self.is_meta:   # no values: check what would arrive
            from .backend_torch import numpy_dtype

            if tuple(src.shape) != dst.shape or numpy_dtype(src.dtype) != dst.dtype:
                raise InputError(f"device panel {tuple(src.shape)} {src.dtype} does not match its host panel "
                                 f"{dst.shape} {dst.dtype}.")
            return
        if not (self.is_cuda and self.pinned):
            self.torch.from_numpy(dst).copy_(src)
            return
        slot = self._take_slot()
        view = self._staging_view(slot, dst.shape)
        stream = self.ops.current_stream()
        self.ops.copy(view, src, non_blocking=True)
        ev = self.ops.event()
        ev.record(stream)
        ev.synchronize()
        self.ops.copy(self.torch.from_numpy(dst), view, non_blocking=False)

    def copy_in_streamed(self, dst, src, slot):
        if not self.is_cuda:
            return self.to_device(dst, src)
        if self.computed[slot] is not None:      # the GEMMs that read this buffer last are done
            self.copy_stream.wait_event(self.computed[slot])
        ev = self._h2d(dst, src, self.copy_stream)
        if ev is None:   # pageable: the copy was synchronous
            ev = self.ops.event()
            ev.record(self.copy_stream)
        self.copied[slot] = ev

    def wait_copied(self, slot):
        if self.is_cuda:
            self.ops.current_stream().wait_event(self.copied[slot])

    def mark_computed(self, slot):
        if self.is_cuda:
            ev = self.ops.event()
            ev.record(self.ops.current_stream())
            self.computed[slot] = ev

    def synchronize(self):
        if self.is_cuda:
            self.ops.synchronize()
            self.computed = [None, None]

    def workspace_bytes(self, block, rows, itemsize) -> int:
        # cholesky_ex's output tile + one trsm row chunk (torch's triangular solve is out of place)
        return (block * block + min(rows * block, max(self.trsm_chunk, block))) * itemsize


def make_device(device):
    """'numpy' -> NumpyDevice; a device object (NumpyDevice / TorchDevice) as it is; anything else is
    a torch device spec ('cpu', 'cuda', 'cuda:0', 'meta', torch.device)."""
    if isinstance(device, (NumpyDevice, TorchDevice)):
        return device
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
            f"device budget {format_bytes(budget)} is too small for out-of-core Cholesky with n={n}, block={block} "
            f"({itemsize}-byte numbers): one panel + one streamed panel + workspace need {format_bytes(need1)}. "
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


def budget_for_slabs(n: int, block: int, itemsize: int, slabs: int, workspace: int = 0) -> int:
    """The largest device budget whose slab plan has at least ``slabs`` slabs: a run that claims to be
    out-of-core really streams (on a large GPU, 90% of free memory often holds the whole Gram)."""
    lo = min_budget_bytes(n, block, itemsize, workspace, buffers=1)
    hi = SymmetricPanels.nbytes_for(n, block, np.dtype(f"f{itemsize}")) + workspace
    if len(plan_slabs(n, block, itemsize, lo, workspace).slabs) < slabs:
        raise MemoryPlanError(f"n={n}, block={block} cannot be cut into {slabs} slabs (even the smallest budget, "
                              f"{format_bytes(lo)}, gives fewer); use a smaller block or fewer slabs.")
    while hi - lo > max(1, itemsize * block):    # slab counts only fall as the budget grows
        mid = (lo + hi) // 2
        if len(plan_slabs(n, block, itemsize, mid, workspace).slabs) >= slabs:
            lo = mid
        else:
            hi = mid
    return int(lo)


def cholesky_out_of_core(G: SymmetricPanels, device="numpy", budget_bytes: int | None = None, progress=None,
                         jitter: float = 0.0, start_panel: int = 0, on_panel_done=None, pin: bool = True,
                         stats_out: dict | None = None) -> SymmetricPanels:
    """Overwrite host panels G (numpy) with the Cholesky factor, using at most ``budget_bytes`` of
    device memory. ``start_panel``: panels before it already hold the final factor (resume);
    ``on_panel_done(j)`` is called after each slab is back on the host, with its last panel index.
    ``pin``: stage CUDA copies through pinned host buffers (falls back to pageable with a warning).
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
    stats = OutOfCoreStats(device=dev.name, backend=dev.backend, budget_bytes=plan.budget, peak_device_bytes=0,
                           buffers=plan.buffers, slabs=len(plan.slabs))
    timer = {"stage": 0.0, "load": 0.0, "stream_update": 0.0, "factor_slab": 0.0, "store": 0.0}
    t_all = time.perf_counter()
    stats.pinned = dev.stage(G.panels[0].size, G.dtype) if pin else False
    timer["stage"] = time.perf_counter() - t_all
    try:
        for j0, j1 in plan.slabs:
            # every device buffer of a slab dies when _run_slab returns, before the next slab allocates
            _run_slab(G, dev, be, ws, plan, j0, j1, stats, timer, jitter)
            if progress is not None:
                progress.update(sum(panel_flops(n, G.starts[j], G.panels[j].shape[1]) for j in range(j0, j1)))
            if on_panel_done is not None:
                on_panel_done(j1 - 1)
    finally:
        dev.release()
        stats.peak_device_bytes = ws.peak
        # On CUDA the streamed copies overlap the GEMMs, so 'stream' is copies + updates together.
        total = time.perf_counter() - t_all
        stats.timings_s = {**timer, "total": total}
        busy = dev.busy_seconds()
        if busy is not None:   # CUDA only: fraction of the wall time the compute stream ran kernels
            stats.timings_s["gpu_busy"] = busy
            stats.timings_s["gpu_busy_fraction"] = busy / total if total > 0 else float("nan")
        if stats_out is not None:
            stats_out.update(stats.to_dict())
    return G


def _run_slab(G, dev, be, ws, plan, j0, j1, stats, timer, jitter) -> None:
    """Load panels j0..j1-1, apply the finished panels' updates, factor them, store them."""
    n, block, starts = G.n, G.block, G.starts
    s0 = starts[j0]
    t = time.perf_counter()
    slab = []
    for j in range(j0, j1):
        buf = ws.alloc(dev, G.panels[j].shape, G.dtype)
        dev.to_device(buf, G.panels[j])
        stats.h2d_bytes += G.panels[j].nbytes
        slab.append(buf)
    timer["load"] += time.perf_counter() - t

    if j0 > 0:
        t = time.perf_counter()
        _stream_updates(G, dev, be, ws, plan, j0, j1, slab, stats)
        timer["stream_update"] += time.perf_counter() - t

    t = time.perf_counter()
    sub = SymmetricPanels(n=n - s0, block=block, panels=slab)
    span = dev.compute_begin()
    try:
        cholesky_inplace(sub, backend=dev.backend, jitter=jitter)
    except NotPositiveDefiniteError as exc:
        raise NotPositiveDefiniteError(minor=exc.minor + s0, n=n, dtype=str(G.dtype), jitter=jitter) from None
    dev.compute_end(span)
    dev.synchronize()
    timer["factor_slab"] += time.perf_counter() - t

    t = time.perf_counter()
    for j, buf in zip(range(j0, j1), slab):
        dev.to_host(G.panels[j], buf)
        stats.d2h_bytes += G.panels[j].nbytes
    dev.synchronize()
    timer["store"] += time.perf_counter() - t


def _stream_updates(G, dev, be, ws, plan, j0, j1, slab, stats) -> None:
    """slab -= L_k L_k^T restricted to its rows/columns, for every finished panel k < j0, each L_k
    streamed into one of ``plan.buffers`` device buffers (which die when this returns)."""
    n, block, starts = G.n, G.block, G.starts
    s0 = starts[j0]
    bufs = [ws.alloc(dev, (n - s0, block), G.dtype) for _ in range(plan.buffers)]
    for k in range(j0):
        slot = k % plan.buffers
        piece = G.panels[k][s0 - starts[k]:]           # rows s0.. of finished panel k
        Lk = bufs[slot]                                # finished panels are full width (block)
        dev.copy_in_streamed(Lk, piece, slot)
        stats.h2d_bytes += piece.nbytes
        dev.wait_copied(slot)
        span = dev.compute_begin()
        for i, Pi in zip(range(j0, j1), slab):
            off = starts[i] - s0
            be.syrk_update(Pi, Lk[off:], Lk[off : off + Pi.shape[1]])
        dev.compute_end(span)
        dev.mark_computed(slot)
    dev.synchronize()
