"""The left-looking slab Cholesky over a slow memory, within a RAM budget.

A slab is a run of panels that fits in RAM; for each slab, every finished factor panel before it is
streamed through in row pieces (the next piece read on a reader thread while the GEMMs of the
current one run), the slab is factored in RAM, each of its panels handed to a writer thread as soon
as it is final, and the next slab's input panels are read into the memory of the panels already
written, while the factorization goes on. ``left_looking`` talks to its slow memory through a few
calls (see its docstring); ``diskstore.DiskPanels`` is the disk implementation.

Streaming in pieces keeps the stream buffers small (the top rows of the streamed panel plus two
pieces), so the panels can be as wide as the in-core ones (efficient GEMMs) whatever the budget, and
one slab takes almost all of it (wide slabs: the finished panels are streamed once per slab, and the
in-slab GEMMs are the in-core ones).

Where a slab lives and its GEMMs run is a ``compute``: ``HostCompute`` (numpy in RAM, the default) or
``TorchCompute`` (a torch device, disk -> host -> device: uploads on the reader thread, downloads on
the writer thread, the slabs planned within the device budget as well).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from ..directio import ALIGN, BufferPool, aligned_empty
from ..errors import InputError, MemoryPlanError, NotPositiveDefiniteError
from ..results import format_bytes
from .backend import get_backend
from .panels import SymmetricPanels, panel_flops
from .tiled import cholesky_inplace

PIECE_MAX_BYTES = 32 << 20      # one streamed piece: large enough for full-rate GEMMs, small beside a slab


def piece_rows(block: int, itemsize: int, budget: int) -> int:
    """Rows of a streamed piece: a 16th of the budget, at most PIECE_MAX_BYTES, at least one block."""
    per_row = block * itemsize
    return max(block, min(PIECE_MAX_BYTES // per_row, int(budget) // (16 * per_row)))


def stream_bytes(width: int, block: int, rows: int, itemsize: int) -> int:
    """RAM of the streamed pieces alive at once while a slab ``width`` columns wide is updated: the top
    rows of the streamed panel (``width`` x block, the B of every GEMM), the piece being applied and
    the one read ahead (each at most max(width, rows) x block), each read as whole ALIGN blocks."""
    return (width + 2 * max(width, rows)) * block * itemsize + 3 * 2 * ALIGN


def min_disk_budget(n: int, block: int, itemsize: int) -> int:
    """The smallest budget a disk factorization runs in: each one-panel slab with its stream pieces."""
    starts = SymmetricPanels.starts_for(n, block)
    rows = block                    # the smallest pieces
    widths = [min(block, n - s) for s in starts]
    need = [slab_bytes(n, starts, widths, itemsize, j, j + 1) + (stream_bytes(widths[j], block, rows, itemsize) if j else 0)
            for j in range(len(starts))]
    return max(need)


def _check_budget(n: int, block: int, itemsize: int, budget_bytes) -> None:
    need = min_disk_budget(n, block, itemsize)
    if budget_bytes is None or int(budget_bytes) < need:
        raise MemoryPlanError(f"memory budget {format_bytes(int(budget_bytes or 0))} is too small for a disk "
                              f"factorization with n={n}, block={block} ({itemsize}-byte numbers): one panel and its "
                              f"streamed rows need {format_bytes(need)}. Fix: a larger --memory-budget or a smaller "
                              f"block.")


@dataclass
class DiskSlabPlan:
    """The slabs of a disk factorization (see ``plan_disk_slabs``)."""
    slabs: list          # [(j0, j1), ...] panel ranges
    piece_rows: int      # rows of one streamed piece


def slab_bytes(n: int, starts: list, widths: list, itemsize: int, j0: int, j1: int) -> int:
    """RAM of panels j0..j1-1 in one slab buffer (each panel padded to ALIGN bytes, for O_DIRECT)."""
    return sum(padded_bytes(n - starts[j], widths[j], itemsize) for j in range(j0, j1))


def padded_bytes(rows: int, width: int, itemsize: int) -> int:
    """Bytes a rows x width panel takes in a slab buffer: rounded up to ALIGN, so each panel starts aligned."""
    return -(-rows * width * itemsize // ALIGN) * ALIGN


def plan_disk_slabs(n: int, block: int, itemsize: int, budget: int, start_panel: int = 0) -> DiskSlabPlan:
    """Slabs for ``left_looking``, greedy from panel 0: a slab takes panels while they and its streamed
    pieces fit the budget (one slab in RAM at a time; the next slab's panels are read into the memory
    of this one's as its factor panels are written). Wide slabs: the finished panels are streamed once
    per slab, so the fewer slabs, the less disk traffic, and the in-slab GEMMs are the in-core ones.
    The plan depends only on (n, block, itemsize, budget): a resume from a slab boundary gets the
    remaining slabs of the same plan (from another panel, a plan starting there)."""
    starts = SymmetricPanels.starts_for(n, block)
    widths = [min(block, n - s) for s in starts]

    def greedy(first, rows):
        def need(j0, j1):
            pieces = stream_bytes(starts[j1 - 1] + widths[j1 - 1] - starts[j0], block, rows, itemsize) if j0 else 0
            return slab_bytes(n, starts, widths, itemsize, j0, j1) + pieces

        slabs, j0 = [], first
        while j0 < len(starts):
            if need(j0, j0 + 1) > budget:
                return None
            j1 = j0 + 1
            while j1 < len(starts) and need(j0, j1 + 1) <= budget:
                j1 += 1
            slabs.append((j0, j1))
            j0 = j1
        return slabs

    # large pieces when they fit, one-block pieces otherwise
    for rows in sorted({piece_rows(block, itemsize, budget), block}, reverse=True):
        slabs = greedy(0, rows)
        if slabs is not None and start_panel and start_panel not in [a for a, _ in slabs]:
            slabs = greedy(start_panel, rows)
        if slabs is not None:
            return DiskSlabPlan(slabs=[s for s in slabs if s[0] >= start_panel], piece_rows=rows)
    _check_budget(n, block, itemsize, budget)     # raises: not even one panel and its pieces fit
    raise AssertionError("unreachable: a budget that passes the check has a plan")


# --- the fast memory: where a slab lives and its GEMMs and factorization run ----------------------

class HostCompute:
    """The default fast memory: host RAM. The slab is the numpy panels ``read_slab`` filled and a
    streamed piece is the mapped rows themselves: no copies (the CPU path as it always ran)."""
    backend = "numpy"
    device = "cpu"
    syrk_update = staticmethod(get_backend("numpy").syrk_update)

    def budget(self, host_budget: int, n: int, block: int, itemsize: int) -> int:
        return int(host_budget)

    def upload_slab(self, slab: list) -> list:
        return slab

    def upload_piece(self, piece):
        return piece

    def factored(self, slab: list):
        return None

    def download_slab(self, slab: list, token) -> list:
        return slab

    def synchronize(self) -> None:
        pass

    def record(self) -> dict:
        return {"device": self.device, "compute": self.backend}


class TorchCompute:
    """A torch device as the fast memory between the host buffers and the GEMMs: CUDA, or torch 'cpu'
    as a *separate* device (its own copies, as ``linalg.factor`` with a device_memory_budget does; CI
    tests the device path so).

    Uploads run on the reader thread (a slab right after it is read, its host arrays then dropped; a
    streamed piece right after it is mapped, the mapping then dropped), downloads on the writer thread
    before the commit. On CUDA both go through two pinned staging buffers of STAGE_BYTES on their own
    streams: a read-only mapping is copied into pinned memory by numpy (``torch.from_numpy`` of a
    read-only array warns, and a pageable copy would stage it a second time), then DMA'd. Tensors
    made on a copy stream are marked used by the compute stream (``record_stream``), so the caching
    allocator never hands their memory out while queued GEMMs still read it."""
    backend = "torch"
    STAGE_BYTES = 8 << 20

    def __init__(self, device, device_memory_budget: int | None = None):
        from .backend_torch import TorchBackend, require_torch, resolve_device

        torch = self.torch = require_torch()
        dev = resolve_device(device)
        if dev.type not in ("cpu", "cuda"):
            raise InputError(f"a disk factorization runs on the host or on a CPU / CUDA torch device; got {str(device)!r}.")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.dev, self.device, self.is_cuda = dev, str(dev), dev.type == "cuda"
        self.given_budget = None if device_memory_budget is None else int(device_memory_budget)
        self.budget_bytes = None
        self.syrk_update = TorchBackend.syrk_update
        self.bytes_uploaded = self.bytes_downloaded = 0
        self.timings_s = {"upload": 0.0, "download": 0.0}
        self._stage, self._stage_used = None, [None, None]
        if self.is_cuda:
            self.compute_stream = torch.cuda.current_stream(dev)
            self.up_stream = torch.cuda.Stream(dev)       # the reader thread's uploads
            self.down_stream = torch.cuda.Stream(dev)     # the writer thread's downloads

    def budget(self, host_budget: int, n: int, block: int, itemsize: int) -> int:
        """min(host budget, device budget less the torch factor's workspace); the device budget is
        ``device_memory_budget`` or DEVICE_SAFETY of the device's free memory. Refuses a device that
        cannot hold one panel and its streamed pieces."""
        from .backend import free_device_bytes
        from .backend_torch import TRSM_CHUNK_ELEMENTS
        from .factor import DEVICE_SAFETY

        given = self.given_budget
        self.budget_bytes = given if given is not None else int(DEVICE_SAFETY * free_device_bytes(self.device))
        workspace = (block * block + min(n * block, max(TRSM_CHUNK_ELEMENTS, block))) * itemsize   # potrf tile, trsm chunk
        need = min_disk_budget(n, block, itemsize)
        if self.budget_bytes - workspace < need:
            raise MemoryPlanError(f"device {self.device} allows {format_bytes(self.budget_bytes)} ("
                                  f"{'device_memory_budget' if given is not None else f'{DEVICE_SAFETY:.0%} of its free memory'}"
                                  f"); a disk factorization with n={n}, block={block} ({itemsize}-byte numbers) needs "
                                  f"{format_bytes(need + workspace)} there (one panel, its streamed rows, the factor's "
                                  f"workspace). Fix: free device memory, a larger device_memory_budget, or a smaller block.")
        return min(int(host_budget), self.budget_bytes - workspace)

    def _staging(self, dtype):
        if self._stage is None or self._stage[0].dtype != dtype:
            t = self.torch
            from .backend_torch import torch_dtype

            count = self.STAGE_BYTES // np.dtype(dtype).itemsize
            try:
                bufs = [t.empty(count, dtype=torch_dtype(dtype), pin_memory=True) for _ in range(2)]
            except RuntimeError:      # pinning refused: pageable buffers (synchronous copies, slower)
                bufs = [t.empty(count, dtype=torch_dtype(dtype)) for _ in range(2)]
            self._stage = [b.numpy() for b in bufs]
            self._stage_t = bufs
            self._stage_used = [None, None]
        return self._stage

    def _upload(self, host: np.ndarray):
        from .backend_torch import torch_dtype

        torch = self.torch
        t0 = time.perf_counter()
        if not self.is_cuda:
            dst = torch.empty(host.shape, dtype=torch_dtype(host.dtype))
            np.copyto(dst.numpy(), host)          # one copy; host may be a read-only mapping
        else:
            stage = self._staging(host.dtype)
            w = host.shape[1] if host.ndim == 2 and host.shape[1] else 1
            rows = max(1, stage[0].size // w)
            with torch.cuda.stream(self.up_stream):
                dst = torch.empty(host.shape, dtype=torch_dtype(host.dtype), device=self.dev)
                for i, r in enumerate(range(0, host.shape[0], rows)):
                    b, k = i % 2, min(rows, host.shape[0] - r)
                    if self._stage_used[b] is not None:
                        self._stage_used[b].synchronize()      # its previous DMA is done
                    np.copyto(stage[b][: k * w].reshape(k, w), host[r : r + k])
                    dst[r : r + k].copy_(self._stage_t[b][: k * w].view(k, w), non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.up_stream)
                    self._stage_used[b] = ev
                self.up_stream.synchronize()      # on the device before the compute thread sees it
            dst.record_stream(self.compute_stream)
            dst.record_stream(self.down_stream)
        self.bytes_uploaded += host.nbytes
        self.timings_s["upload"] += time.perf_counter() - t0
        return dst

    def upload_slab(self, slab: list) -> list:
        out = []
        while slab:                               # each host panel goes once it is on the device
            out.append(self._upload(slab.pop(0)))
        return out

    def upload_piece(self, piece):
        return self._upload(piece)

    def factored(self, slab: list):
        """Main thread, after the slab's factorization is queued: what the download waits for."""
        if not self.is_cuda:
            return None
        ev = self.torch.cuda.Event()
        ev.record(self.compute_stream)
        return ev

    def download_slab(self, slab: list, token) -> list:
        from .backend_torch import numpy_dtype

        torch = self.torch
        t0 = time.perf_counter()
        out = []
        for P in slab:
            dt = np.dtype(numpy_dtype(P.dtype))       # aligned, so the commit can write it with O_DIRECT
            host = aligned_empty(P.numel() * dt.itemsize)[: P.numel() * dt.itemsize].view(dt).reshape(tuple(P.shape))
            if self.is_cuda:
                with torch.cuda.stream(self.down_stream):
                    self.down_stream.wait_event(token)
                    torch.from_numpy(host).copy_(P)        # into pageable memory: returns when done
            else:
                np.copyto(host, P.numpy())
            self.bytes_downloaded += host.nbytes
            out.append(host)
        self.timings_s["download"] += time.perf_counter() - t0
        return out

    def synchronize(self) -> None:
        if self.is_cuda:
            self.compute_stream.synchronize()

    def record(self) -> dict:
        return {"device": self.device, "compute": self.backend, "device_budget_bytes": self.budget_bytes,
                "bytes_uploaded": self.bytes_uploaded, "bytes_downloaded": self.bytes_downloaded}


def make_compute(device=None, device_memory_budget: int | None = None):
    """The fast memory of ``left_looking``: the host (numpy) for device None, else that torch device."""
    if device is None:
        return HostCompute()
    return TorchCompute(device, device_memory_budget)


def _apply_piece(slab, starts, s0: int, r0: int, piece: np.ndarray, top: np.ndarray, syrk_update) -> None:
    """Subtract rows r0.. of L_k L_k^T from the slab: ``piece`` is rows r0..r0+len of a finished panel
    L_k, ``top`` its rows s0..s1 (the slab's columns). Panel i takes the piece's rows at or below s_i."""
    r1 = r0 + piece.shape[0]
    for i, Pi in enumerate(slab):
        si, wi = starts[i], Pi.shape[1]
        a = max(r0, si)
        if r1 > a:
            syrk_update(Pi[a - si : r1 - si], piece[a - r0 :], top[si - s0 : si - s0 + wi])


class _Aborted(Exception):
    """The factorization stopped (an error elsewhere): a panel write or a read waiting on one gives up."""


def _settle(fut: Future, exc: BaseException | None = None) -> None:
    """Resolve a hand-made future once (the writer and an abort may both try)."""
    try:
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        pass


def left_looking(slow, budget_bytes: int, progress=None, jitter: float = 0.0, compute=None) -> dict:
    """Left-looking slab Cholesky over a slow memory ``slow`` (n, block, dtype, starts, widths, finished,
    stats; ``read_input(j, out)``, ``factor_rows(k, row0, row1)`` [+ ``release_rows(rows)``],
    ``write_factor_panel(j, P)``, ``commit_slab(j0, j1)`` [+ ``discard_unlisted()``]).

    Per slab [s0, s1) (``plan_disk_slabs``: one slab in RAM at a time, as wide as the budget allows):
    for each finished panel k < j0, subtract L_k L_k^T from the slab, L_k streamed in pieces: its top
    rows s0..s1 first (the right-hand factor of every GEMM), then rows s1..n in ``piece_rows`` chunks,
    the next piece read on the reader thread while the GEMMs of the current one run; factor the slab in
    RAM (``tiled.cholesky_inplace``), each panel handed to the writer thread the moment it is final
    (a right-looking step never reads a finished panel again), while the reader thread reads the next
    slab's input panels into the memory of those already written; then the manifest lists the slab
    (``commit_slab``, on the writer thread after its panel writes). So disk reads and writes run beside
    the GEMMs, and the budget holds one slab and the stream pieces.

    Order on disk is kept: a slab's stream starts after the previous slab's commit (its files exist, the
    manifests advance slab by slab). A writer error (a full disk) surfaces here as its StorageError, the
    finished slabs kept and the unlisted files of the slab in progress removed. Main-thread waits:
    timings 'read_wait' (inputs), 'stream_wait', 'write_wait' (commits), all in ``io_wait_s``;
    'read_slab' / 'write_slab' are the reader's / writer's own seconds, 'reader_cpu' / 'writer_cpu'
    the CPU those threads took from the GEMMs.

    ``compute`` (``make_compute``): where slabs live and their GEMMs and factorization run; default the
    host (numpy). A device compute (``TorchCompute``) gets each slab and streamed piece uploaded on the
    reader thread and each factor panel downloaded on the writer thread; the slabs are planned in
    min(RAM budget, device budget), and the next slab goes up once every panel of the previous one is
    down. Returns (and sets as ``slow.stats.device``) the compute's record: device, device budget,
    bytes up / down."""
    n, block, dtype = slow.n, slow.block, slow.dtype
    itemsize = dtype.itemsize
    compute = HostCompute() if compute is None else compute
    _check_budget(n, block, itemsize, budget_bytes)
    plan_budget = compute.budget(int(budget_bytes), n, block, itemsize)
    plan = plan_disk_slabs(n, block, itemsize, plan_budget, slow.finished)
    st = slow.stats
    st.budget_bytes, st.slabs, st.first_panel = int(budget_bytes), len(plan.slabs), slow.finished
    timer = st.timings_s
    for key in ("read_slab", "read_wait", "stream_update", "stream_wait", "factor_slab", "write_slab", "write_wait",
                "reader_cpu", "writer_cpu"):
        timer.setdefault(key, 0.0)
    syrk_update = compute.syrk_update
    buffers = BufferPool()
    abort = threading.Event()

    def release(rows):                      # host rows of the slow memory no longer read
        if isinstance(rows, np.ndarray) and hasattr(slow, "release_rows"):
            slow.release_rows(rows)

    def layout(j0, j1):
        """Shapes of a slab's panels and the end of each in its buffer (each padded to ALIGN bytes)."""
        shapes = [(n - slow.starts[j], slow.widths[j]) for j in range(j0, j1)]
        return shapes, list(accumulate(padded_bytes(r, w, itemsize) for r, w in shapes))

    def read_slab(j0, j1, prev):            # reader thread
        """The slab's input panels: (slab, its host buffer or None, panel ends in it). ``prev``: (buffer,
        ends, written futures) of the slab being factored. On the host this slab reuses that buffer,
        panel i read once every earlier panel sharing its bytes is written; on a device (or when it
        does not fit) once all are."""
        t, c = time.perf_counter(), time.thread_time()
        shapes, ends = layout(j0, j1)
        pbuf, pends, written = prev if prev is not None else (None, [], [])
        reuse = pbuf is not None and pbuf.size >= ends[-1]
        if not reuse:
            for f in written:
                f.result()
            buffers.give(pbuf)
        buf = pbuf if reuse else buffers.take(ends[-1])
        host, start, k = [], 0, 0
        for j, (r, w), end in zip(range(j0, j1), shapes, ends):
            while reuse and k < len(pends) and (pends[k - 1] if k else 0) < end:
                written[k].result()         # bytes that panel k of the previous slab held: free once it is on disk
                k += 1
            P = buf[start : start + r * w * itemsize].view(dtype).reshape(r, w)
            slow.read_input(j, P)
            host.append(P)
            start = end
        timer["read_slab"] += time.perf_counter() - t
        slab = compute.upload_slab(host)
        if slab is not host:                # on a device now: the host copy is free again
            buffers.give(buf)
            buf = None
        timer["reader_cpu"] += time.thread_time() - c
        return slab, buf, ends

    def map_piece(k, row0, row1):           # reader thread: on the device, the host rows go once copied
        c = time.thread_time()
        rows = slow.factor_rows(k, row0, row1)
        piece = compute.upload_piece(rows)
        if piece is not rows:
            release(rows)
        timer["reader_cpu"] += time.thread_time() - c
        return piece

    def write_panel(j, P, token, done):     # writer thread
        try:
            if abort.is_set():
                raise _Aborted()
            c = time.thread_time()
            host = compute.download_slab([P], token)[0]
            t = time.perf_counter()
            slow.write_factor_panel(j, host)
            timer["write_slab"] += time.perf_counter() - t
            timer["writer_cpu"] += time.thread_time() - c
            _settle(done)
        except BaseException as e:
            _settle(done, e)
            raise

    def commit(j0, j1, written):            # writer thread, after the slab's panel writes
        for f in written:
            f.result()                      # a failed write: its error, and no manifest
        t = time.perf_counter()
        slow.commit_slab(j0, j1)
        timer["write_slab"] += time.perf_counter() - t

    def wait(fut, key):
        t = time.perf_counter()
        try:
            return fut.result()
        finally:
            timer[key] += time.perf_counter() - t
            st.io_wait_s += time.perf_counter() - t

    def pieces(s0, s1):
        """Row ranges a panel is applied in: its top rows s0..s1, then piece_rows at a time. The same in
        every run with this plan, so a resumed run repeats every GEMM of an uninterrupted one."""
        return [(s0, s1)] + [(r, min(r + plan.piece_rows, n)) for r in range(s1, n, plan.piece_rows)]

    def stream(reader, j0, s0, s1):
        """(r0, piece) of panels 0..j0-1 from the slow memory, in order, one piece read ahead. A panel's
        top piece is read by all its GEMMs, so it is released when the next panel's arrives."""
        order = [(k, r0, r1) for k in range(j0) for r0, r1 in pieces(s0, s1)]
        fut = reader.submit(map_piece, *order[0]) if order else None
        top = None
        for i, (_, r0, _) in enumerate(order):
            piece = wait(fut, "stream_wait")
            if r0 == s0:
                release(top)
                top = piece
            fut = reader.submit(map_piece, *order[i + 1]) if i + 1 < len(order) else None
            yield r0, piece
            if piece is not top:
                release(piece)
            del piece
        release(top)

    written: list = []
    committed = None                        # (future, flops) of the last slab's commit
    t_all = time.perf_counter()
    try:
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            try:
                ahead = reader.submit(read_slab, *plan.slabs[0], None)
                for si, (j0, j1) in enumerate(plan.slabs):
                    s0, s1 = slow.starts[j0], slow.starts[j1 - 1] + slow.widths[j1 - 1]
                    rel = [slow.starts[j] - s0 for j in range(j0, j1)]
                    slab, buf, ends = wait(ahead, "read_wait")
                    for f in written:           # the previous slab's files, streamed below, are on disk
                        wait(f, "write_wait")
                    if j0 > 0:
                        t = time.perf_counter()
                        top = None
                        for r0, piece in stream(reader, j0, s0, s1):
                            if r0 == s0:
                                top = piece
                            _apply_piece(slab, rel, 0, r0 - s0, piece, top, syrk_update)
                            del piece
                        top = None
                        compute.synchronize()   # a device's queued GEMMs count here, not in factor_slab
                        timer["stream_update"] += time.perf_counter() - t
                    written = [Future() for _ in range(j0, j1)]
                    if si + 1 < len(plan.slabs):
                        ahead = reader.submit(read_slab, *plan.slabs[si + 1], (buf, ends, written))

                    def finished(i, slab=slab, j0=j0, written=written):    # panel i is final
                        writer.submit(write_panel, j0 + i, slab[i], compute.factored([slab[i]]), written[i])

                    if committed is not None:   # the previous slab's manifest (written during the stream)
                        wait(committed[0], "write_wait")
                        if progress is not None:
                            progress.update(committed[1])
                    t = time.perf_counter()
                    try:
                        cholesky_inplace(SymmetricPanels(n=n - s0, block=block, panels=slab), backend=compute.backend,
                                         jitter=jitter, on_panel_done=finished)
                        compute.synchronize()
                    except NotPositiveDefiniteError as exc:
                        raise NotPositiveDefiniteError(minor=exc.minor + s0, n=n, dtype=str(dtype),
                                                       jitter=jitter) from None
                    timer["factor_slab"] += time.perf_counter() - t
                    committed = (writer.submit(commit, j0, j1, written),
                                 sum(panel_flops(n, slow.starts[j], slow.widths[j]) for j in range(j0, j1)))
                    del slab, buf, finished     # a device frees each panel once it is written
                wait(committed[0], "write_wait")
                if progress is not None:
                    progress.update(committed[1])
            except BaseException:
                abort.set()                 # queued writes give up; a read waiting on one is released
                for f in written:
                    _settle(f, _Aborted())
                if committed is not None:   # a failed commit (a full disk) comes first: it removed the
                    try:                    # files a stream then missed
                        committed[0].result()
                    except _Aborted:        # stopped by this error, not the cause of it
                        pass
                raise
    except BaseException:
        if hasattr(slow, "discard_unlisted"):
            slow.discard_unlisted()
        raise
    timer["factor_total"] = timer.get("factor_total", 0.0) + time.perf_counter() - t_all
    record = compute.record()
    for key, seconds in getattr(compute, "timings_s", {}).items():
        timer[key] = timer.get(key, 0.0) + seconds
    st.device = record
    return record
