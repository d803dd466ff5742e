"""One entry point for the Cholesky factorization: backend, device, in-core / out-of-core, checkpoints.

``factor(G, placement)`` overwrites host panels ``G`` (``SymmetricPanels`` of numpy arrays) with their
lower Cholesky factor and returns a ``FactorInfo`` saying what ran where (backend, device, path,
bytes moved, device memory, timings). The result always ends in ``G`` on the host, so the existing
solves (``tiled.cho_solve``) and refinement work unchanged.

Choices (falkon-style: decided from measured free memory, with force switches):

* backend "auto": the data decides. numpy panels with ``device=None`` -> numpy (the CPU path);
  ``device="cuda"`` (or any torch device) -> torch; "cupy" -> cupy (in-core only).
* out_of_core "auto": in-core when the Gram + workspace fit in the usable device memory (measured
  free memory x 0.9, or ``device_memory_budget``), else out-of-core with that budget. ``False`` with a
  Gram that does not fit raises ``MemoryPlanError`` with both numbers; ``True`` always streams.

Mixed precision (float32 / TF32 factor, float64 refinement, float64 fallback) is driven by
``kernelfit.linalg.mixed.solve_refined``, which calls ``factor`` for each attempt.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError, MemoryPlanError
from ..results import format_bytes
from .backend import free_device_bytes
from .options import FactorOptions
from .panels import SymmetricPanels, cholesky_flops
from .tiled import cholesky_inplace

BACKEND_CHOICES = ("auto", "numpy", "torch", "cupy")
DEFAULT_PLACEMENT = FactorOptions()   # host numpy, in-core when it fits, no checkpoint
DEVICE_SAFETY = 0.90     # leave 10% of measured free device memory to the allocator / other tensors


@dataclass
class DevicePlan:
    """Device-memory plan for one factorization (cf. kernelfit.planning for host memory)."""

    n: int
    block: int
    dtype: str
    in_core_bytes: int           # Gram panels + backend workspace on the device
    free_bytes: int              # measured (or given) free device memory
    usable_bytes: int            # what the plan allows itself to use
    fits_in_core: bool
    min_out_of_core_bytes: int   # smallest budget the streamed algorithm runs in

    def to_dict(self) -> dict:
        return asdict(self)


def plan_device_memory(n: int, block: int, dtype, free_bytes: int, budget: int | None = None,
                       workspace: int = 0, in_place: bool = False) -> DevicePlan:
    """in_place: the device *is* the host memory that already holds the panels (CPU), so the
    in-core path needs only the workspace on top of them."""
    from .outofcore import min_budget_bytes

    itemsize = np.dtype(dtype).itemsize
    gram = 0 if in_place else SymmetricPanels.nbytes_for(n, block, dtype)
    usable = int(budget) if budget is not None else int(DEVICE_SAFETY * free_bytes)
    return DevicePlan(n=n, block=block, dtype=np.dtype(dtype).name, in_core_bytes=gram + workspace,
                      free_bytes=int(free_bytes), usable_bytes=usable, fits_in_core=gram + workspace <= usable,
                      min_out_of_core_bytes=min_budget_bytes(n, block, itemsize, workspace, buffers=1))


@dataclass
class FactorInfo:
    backend: str
    device: str
    path: str                     # "in-core" | "out-of-core"
    n: int
    block: int
    dtype: str
    bytes_moved: dict = field(default_factory=dict)     # h2d / d2h bytes
    device_memory: dict = field(default_factory=dict)   # the DevicePlan + peak of the streamed path
    timings_s: dict = field(default_factory=dict)
    tflops: float = float("nan")  # n^3/3 / factor time
    resumed_from_panel: int = 0
    checkpoint: dict | None = None
    tf32: bool = False
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve_backend(G, backend, device):
    if backend not in BACKEND_CHOICES:
        raise InputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_CHOICES)}.")
    if backend == "auto":
        if device is None or device == "numpy":
            return "numpy", "cpu"
        backend = "torch"
    if backend == "numpy":
        if device not in (None, "cpu", "numpy"):
            raise InputError(f"backend='numpy' runs on the CPU; got device={device!r}. Use backend='torch' "
                             f"(or 'cupy') for a GPU, or leave device unset.")
        return "numpy", "cpu"
    if backend == "torch":
        from .backend_torch import resolve_device

        return "torch", str(resolve_device(device))
    from .backend_cupy import require_cupy

    require_cupy()
    return "cupy", "cuda" if device is None else str(device)


def factor(G: SymmetricPanels, placement: FactorOptions = DEFAULT_PLACEMENT, *, jitter: float = 0.0, progress=None,
           on_panel_done=None, checkpoint_every: int | None = None, checkpoint_strategy: str = "recompute") -> FactorInfo:
    """Overwrite host panels G with the lower Cholesky factor of the matrix they hold.

    ``placement``: where and how it runs (backend, device, out_of_core, device_memory_budget, tf32,
    checkpoint_dir, resume; its block_size and progress flag are the caller's: G has its panels and
    ``progress`` is a bar). ``tf32=True`` lets float32 factor GEMMs use TF32 tensor cores on CUDA
    (use with mixed-precision refinement). jitter only words the error message (add it to the
    diagonal before calling, as for ``cholesky_inplace``). ``on_panel_done(j)`` runs after any
    checkpoint save.
    """
    backend, device, out_of_core = placement.backend, placement.device, placement.out_of_core
    device_memory_budget, tf32 = placement.device_memory_budget, placement.tf32
    checkpoint_dir, resume = placement.checkpoint_dir, placement.resume
    kind = type(G.panels[0]).__module__.split(".")[0]
    if kind in ("torch", "cupy"):
        return _factor_resident(G, kind, backend, device, out_of_core, checkpoint_dir, progress, jitter, on_panel_done,
                                tf32)
    if not all(isinstance(P, np.ndarray) for P in G.panels):
        raise InputError(f"factor() expects panels as numpy arrays (host), or torch / cupy arrays (factored where "
                         f"they live); got {type(G.panels[0]).__name__}.")
    if out_of_core == "disk":   # the disk store is filled from the data, not from panels already in RAM
        raise InputError("out_of_core='disk' keeps the Gram on disk from the start, so it runs through "
                         "kernelfit.solve.fit_interpolant / fit_precomputed (kernelfit.disk_solve); factor() works on "
                         "panels in RAM or on a GPU. Fix: pass the options to fit_interpolant, or out_of_core='auto'.")
    if out_of_core not in ("auto", True, False):
        raise InputError(f"out_of_core must be 'auto', True, False or 'disk'; got {out_of_core!r}.")
    be_name, dev_name = _resolve_backend(G, backend, device)
    # Each BLAS/LAPACK call sees one panel: keep it under 2^31 elements, where 32-bit indexing in
    # LAPACK / cuSOLVER builds breaks (the GUIDE saw OpenBLAS crash on 60000^2 outputs).
    biggest = G.panels[0].size
    if biggest >= 2**31:
        raise InputError(f"the first panel holds {biggest} elements (n={G.n} x block={G.block}), past 2^31 where "
                         f"32-bit BLAS/LAPACK indexing breaks; use block_size <= {(2**31 - 1) // G.n}.")
    is_gpu = dev_name.startswith("cuda")

    # --- memory plan --------------------------------------------------------------------------
    from .outofcore import make_device

    workspace = 0 if be_name != "torch" else make_device(dev_name).workspace_bytes(G.block, G.n, G.dtype.itemsize)
    if dev_name == "meta":   # a dry run: no memory to measure, the budget stands for the target device
        if device_memory_budget is None:
            raise InputError("device='meta' (a dry run: shapes, dtypes and the memory plan, no values) needs "
                             "device_memory_budget, the bytes the target GPU would allow.")
        measured = int(device_memory_budget)
    else:
        measured = free_device_bytes("cupy" if be_name == "cupy" else dev_name)
    # On the CPU the panels already sit in the memory the factorization runs in: in place, no copy.
    # A device_memory_budget there simulates a smaller, separate device (tests, CI): the full Gram is
    # compared with it and the panels are copied to it and back, as on a GPU.
    in_place = dev_name == "cpu" and device_memory_budget is None
    plan = plan_device_memory(G.n, G.block, G.dtype, measured, device_memory_budget, workspace, in_place)
    in_place = in_place or be_name == "numpy"      # numpy always factors the host panels themselves
    if out_of_core == "auto":
        path = "in-core" if plan.fits_in_core else "out-of-core"
    else:
        path = "out-of-core" if out_of_core else "in-core"
    if path == "in-core" and not plan.fits_in_core and out_of_core is False:
        raise MemoryPlanError(
            f"out_of_core=False, but the Gram does not fit on {dev_name}: it needs {format_bytes(plan.in_core_bytes)} "
            f"({G.n} x {G.n} lower panels in {G.dtype} + workspace) and {format_bytes(plan.usable_bytes)} is usable "
            f"({format_bytes(plan.free_bytes)} free). Use out_of_core='auto' or True (streams through the device), "
            f"mode 'mixed'/'float32' (half the bytes), or fewer points.", plan=plan)
    if path == "out-of-core" and be_name == "cupy":
        raise InputError("the out-of-core path is implemented for backend='torch' (and numpy on the CPU), not "
                         "cupy; use backend='torch' with device='cuda', or out_of_core=False.")
    if path == "out-of-core" and plan.usable_bytes < plan.min_out_of_core_bytes:
        raise MemoryPlanError(
            f"even the out-of-core path needs at least {format_bytes(plan.min_out_of_core_bytes)} of device memory for "
            f"n={G.n}, block={G.block} ({G.dtype}); {format_bytes(plan.usable_bytes)} is usable. Use a smaller "
            f"block_size or free device memory.", plan=plan)

    info = FactorInfo(backend=be_name, device=dev_name, path=path, n=G.n, block=G.block, dtype=str(G.dtype),
                      device_memory=plan.to_dict(), tf32=bool(tf32 and is_gpu and G.dtype == np.float32))
    if tf32 and not info.tf32:
        info.notes.append("tf32 requested but ignored: it applies to float32 factors on CUDA only")

    # --- checkpoint ----------------------------------------------------------------------------
    ckpt = None
    start = 0
    if checkpoint_dir is not None:
        from .checkpoint import Checkpointer

        algorithm = "left-looking" if path == "out-of-core" else "right-looking"
        on_device = path == "in-core" and not in_place   # factored in a copy: host panels go stale
        if on_device and checkpoint_strategy == "trailing":
            raise InputError("checkpoint_strategy='trailing' would save stale host copies of panels that live on "
                             f"{dev_name}; use checkpoint_strategy='recompute' (the default) there.")
        every = checkpoint_every or (1 if path == "out-of-core" else max(1, len(G.panels) // 10))
        ckpt = Checkpointer(checkpoint_dir, every=every, strategy=checkpoint_strategy, algorithm=algorithm,
                            config={"jitter": float(jitter)})
        if resume:
            t = time.perf_counter()
            # on a GPU the trailing updates are re-applied there, after the panels are moved
            start = ckpt.resume(G, backend="numpy", apply_updates=not on_device)
            info.timings_s["resume"] = time.perf_counter() - t
        else:
            ckpt.begin(G)   # refuses a directory holding another run's checkpoint, or this stage already
        info.resumed_from_panel = start

    def hook(j):
        if ckpt is not None:
            ckpt.hook(j)
        if on_panel_done is not None:
            on_panel_done(j)

    # --- run -----------------------------------------------------------------------------------
    import contextlib

    ctx = contextlib.nullcontext()
    if info.tf32:
        from .backend_torch import tf32_enabled

        ctx = tf32_enabled()
    t0 = time.perf_counter()
    try:
        with ctx:
            if start >= len(G.panels):
                info.notes.append("checkpoint was complete; nothing to factor")
            elif path == "out-of-core":
                from .outofcore import cholesky_out_of_core

                stats = {}
                cholesky_out_of_core(G, device="numpy" if be_name == "numpy" else dev_name,
                                     budget_bytes=plan.usable_bytes, progress=progress, jitter=jitter,
                                     start_panel=start, on_panel_done=hook, stats_out=stats)
                info.bytes_moved = {"h2d": stats["h2d_bytes"], "d2h": stats["d2h_bytes"]}
                info.device_memory.update(peak_bytes=stats["peak_device_bytes"], budget_bytes=stats["budget_bytes"],
                                          stream_buffers=stats["buffers"], slabs=stats["slabs"], pinned=stats["pinned"])
                info.timings_s.update({f"ooc_{k}": v for k, v in stats["timings_s"].items()})
            else:
                _factor_in_core(G, be_name, dev_name, start, hook, progress, jitter, info, in_place,
                                needs_host_copy=ckpt is not None or on_panel_done is not None,
                                pending_updates=ckpt is not None and ckpt.pending_updates)
    finally:
        if ckpt is not None:
            ckpt.close()   # the directory's lock
    info.timings_s["factor"] = time.perf_counter() - t0
    remaining = (1.0 - G.starts[start] / G.n) ** 3 if start < len(G.panels) else 0.0   # flops left after resume
    info.tflops = cholesky_flops(G.n) * remaining / max(info.timings_s["factor"], 1e-12) / 1e12
    if ckpt is not None:
        info.checkpoint = {"dir": str(ckpt.dir), "stage": ckpt.stage, "every": ckpt.every, "strategy": ckpt.strategy,
                           "algorithm": ckpt.algorithm, "saves": ckpt.saves, "bytes_written": ckpt.bytes_written}
    return info


def _factor_resident(G, kind, backend, device, out_of_core, checkpoint_dir, progress, jitter, on_panel_done,
                     tf32=False):
    """Panels already on a device (torch tensors / cupy arrays): the data decides; factor in place there."""
    import contextlib

    where = str(G.panels[0].device)
    if backend not in ("auto", kind):
        raise InputError(f"the panels are {kind} arrays on {where} but backend={backend!r} was requested; use "
                         f"backend='auto' or {kind!r}, or convert the panels to numpy first.")
    if device is not None and str(device) != where and not (kind == "torch" and str(device) == where.split(":")[0]):
        raise InputError(f"the panels live on {where} but device={device!r} was requested; move them first or "
                         f"leave device unset.")
    if out_of_core is True or checkpoint_dir is not None:
        raise InputError("out-of-core and checkpoints need host (numpy) panels: the device-resident panels are "
                         "factored in place in device memory. Pass numpy panels and device=... instead.")
    dtype = str(G.dtype).replace("torch.", "")
    on_cuda = where.startswith("cuda")
    info = FactorInfo(backend=kind, device=where, path="in-core", n=G.n, block=G.block, dtype=dtype,
                      bytes_moved={"h2d": 0, "d2h": 0}, tf32=bool(tf32 and on_cuda and kind == "torch" and
                                                                 dtype == "float32"))
    if tf32 and not info.tf32:
        info.notes.append("tf32 requested but ignored: it applies to float32 torch factors on CUDA only")
    ctx = contextlib.nullcontext()
    if info.tf32:
        from .backend_torch import tf32_enabled

        ctx = tf32_enabled()
    t = time.perf_counter()
    with ctx:
        cholesky_inplace(G, backend=kind, progress=progress, jitter=jitter, on_panel_done=on_panel_done)
    if on_cuda and kind == "torch":   # the last GEMMs are still queued: time the work, not its launch
        import torch

        torch.cuda.synchronize(G.panels[0].device)
    info.timings_s["factor"] = time.perf_counter() - t
    info.tflops = cholesky_flops(G.n) / max(info.timings_s["factor"], 1e-12) / 1e12
    return info


def _factor_in_core(G, be_name, dev_name, start, hook, progress, jitter, info, in_place, needs_host_copy=True,
                    pending_updates=False):
    """In-core: numpy factors the host panels themselves; torch factors them where they live when
    ``in_place`` (CPU tensors sharing the numpy memory), else in device copies that come back at the end."""
    from .checkpoint import apply_finished_updates

    if be_name == "numpy":
        cholesky_inplace(G, backend="numpy", progress=progress, jitter=jitter, start_panel=start, on_panel_done=hook)
        info.bytes_moved = {"h2d": 0, "d2h": 0}
        return
    if be_name == "torch":
        from .backend_torch import require_torch
        from .outofcore import make_device

        torch = require_torch()
        dev = make_device(dev_name)
        t = time.perf_counter()
        pinned = None
        if in_place:
            panels = [torch.from_numpy(P) for P in G.panels]
        else:
            pinned = dev.stage(G.panels[0].size, G.dtype)    # pinned staging buffers on CUDA (else pageable)
            panels = []
            for P in G.panels:
                panels.append(dev.empty(P.shape, P.dtype))
                dev.to_device(panels[-1], P)
            dev.synchronize()
        # the copy branch is decided by the memory itself: panels that share the host arrays need none
        shared = all(Pd.data_ptr() == P.ctypes.data for P, Pd in zip(G.panels, panels))
        info.timings_s["to_device"] = time.perf_counter() - t
        D = SymmetricPanels(n=G.n, block=G.block, panels=panels)
        if pending_updates:   # resume: bring the trailing panels up to date on the device
            apply_finished_updates(D, start - 1, "torch")

        def dev_hook(j):
            if not shared and needs_host_copy:   # a checkpoint reads the host copy of the finished panel
                dev.to_host(G.panels[j], D.panels[j])
            hook(j)

        try:
            cholesky_inplace(D, backend="torch", progress=progress, jitter=jitter, start_panel=start,
                             on_panel_done=dev_hook)
            dev.synchronize()
            t = time.perf_counter()
            if not shared:
                for P, Pd in zip(G.panels, D.panels):
                    dev.to_host(P, Pd)
                dev.synchronize()
            info.timings_s["to_host"] = time.perf_counter() - t
        finally:
            dev.release()
        moved = 0 if shared else G.nbytes
        info.bytes_moved = {"h2d": moved, "d2h": moved}
        info.device_memory["pinned_staging"] = pinned
        return
    import cupy  # cupy: in-core only (its tile kernels are tested against a faithful fake cupy)

    panels = [cupy.asarray(P) for P in G.panels]
    D = SymmetricPanels(n=G.n, block=G.block, panels=panels)
    if pending_updates:
        apply_finished_updates(D, start - 1, "cupy")

    def cp_hook(j):
        G.panels[j][...] = cupy.asnumpy(D.panels[j])
        hook(j)

    cholesky_inplace(D, backend="cupy", progress=progress, jitter=jitter, start_panel=start, on_panel_done=cp_hook)
    info.bytes_moved = {"h2d": G.nbytes, "d2h": G.nbytes}
