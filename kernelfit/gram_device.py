"""Kernel matrices built on a torch device, and the whole solve there when the Gram fits.

``gram_tile_into`` / ``kernel_matmul_torch``: kernel tiles and k(A, B) @ V on the device (TF32 off);
``build_gram_panels_device``: lower-triangle Gram panels computed on the device, kept there or
copied to host panels. These are the device twins of ``kernelfit.gram``.

The resident solve (``solve_resident``): the whole solve on one torch device, for a Gram that fits
in its memory.

Gram build, Cholesky factor (optionally with TF32 GEMMs), refinement (triangular solves through the
factor and float64 K V products from the data) and prediction all run on the device; the n x n
matrix never crosses to the host. Only n x k blocks do (the right-hand sides and residuals handed
to ``linalg.refine``, the solution and the scores), a few MB at MNIST scale. The driver is the
project's one factor / refine / fall-back loop, ``linalg.mixed.solve_refined``; the float64
fallback runs when the float64 Gram fits on the device too, and the report says why otherwise.

Each phase is timed by ``results.PhaseTimer`` (wall clock; the device is synchronized at the end of
each phase so that queued work is counted in it).
A Gram that does not fit belongs to the host-panel path (``linalg.factor`` in-core with copies, or
out-of-core), which ``kernelfit.solve`` uses.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from .catalog import MAX_REFINE
from .errors import InputError, MemoryPlanError
from .kernels import check_kernel
from .linalg.backend import free_device_bytes
from .linalg.backend_torch import cho_solve_torch, require_torch, resolve_device, tf32_disabled, torch_dtype
from .linalg.factor import DEVICE_SAFETY
from .linalg.mixed import solve_refined
from .linalg.options import FactorOptions
from .linalg.panels import SymmetricPanels, choose_block
from .results import PhaseTimer


def gram_tile_into(out, X, Z, X_sq, Z_sq, kernel: str, bandwidth: float):
    """k(X, Z) written into ``out`` (torch tensors, same device), TF32 off. Distances clamped at 0."""
    k = check_kernel(kernel)
    with tf32_disabled():
        out.copy_(X @ Z.transpose(0, 1))
    out.mul_(-2.0).add_(X_sq[:, None]).add_(Z_sq[None, :]).clamp_(min=0.0)
    k.torch_apply_(out, bandwidth)
    return out


def kernel_matmul_torch(A, B, V, kernel: str, bandwidth: float, rows: int = 2048, exact_diagonal: bool = False):
    """k(A, B) @ V on the tensors' device, in their dtype (float64 for residuals), by row tiles of
    (rows x len(B)); never stores k(A, B). ``exact_diagonal`` (A is B) sets k(x_i, x_i) = 1 as the
    Gram builders do. TF32 is off inside ``gram_tile_into``."""
    torch = require_torch()
    m = A.shape[0]
    A_sq, B_sq = (A * A).sum(1), (B * B).sum(1)
    out = torch.empty((m, V.shape[1]), dtype=V.dtype, device=V.device)
    tile = torch.empty((min(rows, m), B.shape[0]), dtype=A.dtype, device=A.device)
    for a in range(0, m, rows):
        e = min(a + rows, m)
        T = gram_tile_into(tile[: e - a], A[a:e], B, A_sq[a:e], B_sq, kernel, bandwidth)
        if exact_diagonal:
            idx = torch.arange(e - a, device=A.device)
            T[idx, idx + a] = 1.0
        with tf32_disabled():
            torch.matmul(T, V, out=out[a:e])
    return out


def build_gram_panels_device(X, kernel: str, bandwidth: float, block: int | None = None, dtype=np.float32,
                             device="cpu", out: SymmetricPanels | None = None, center: bool = True,
                             resident: bool = False) -> SymmetricPanels:
    """Lower-triangle Gram panels computed on a torch device, one panel at a time. By default they
    are written to host panels (never the whole Gram on the device); ``resident=True`` keeps them on
    the device instead (a SymmetricPanels of device tensors, for a matrix that fits there). TF32 is
    off for the distance GEMMs. Points are centered first (in float64; the kernels are
    translation-invariant), which keeps the float32 |x|^2 + |z|^2 - 2 x.z expansion accurate for
    data far from the origin, as solve.py does."""
    torch = require_torch()
    dev = resolve_device(device)
    X = np.asarray(X, dtype=np.float64)
    if center:
        X = X - X.mean(axis=0)
    X = np.ascontiguousarray(X, dtype=dtype)
    n = X.shape[0]
    if resident:
        if out is not None:
            raise InputError("build_gram_panels_device: out= is for host panels; resident=True allocates on the device.")
        block = choose_block(n, block)
        G = SymmetricPanels(n=n, block=block, panels=[
            torch.empty((n - s, min(block, n - s)), dtype=torch_dtype(dtype), device=dev)
            for s in SymmetricPanels.starts_for(n, block)])
    else:
        G = out if out is not None else SymmetricPanels.empty(n, block, dtype)
    Xd = torch.from_numpy(X).to(dev)
    sq = (Xd * Xd).sum(1)
    tile = None if resident else torch.empty((n, G.block), dtype=torch_dtype(dtype), device=dev)
    for s, P in zip(G.starts, G.panels):
        w = P.shape[1]
        T = P if resident else tile[: n - s, :w]
        gram_tile_into(T, Xd[s:], Xd[s : s + w], sq[s:], sq[s : s + w], kernel, bandwidth)
        T[torch.arange(w), torch.arange(w)] = 1.0      # k(x, x) = 1 exactly, as in kernelfit.gram
        if not resident:
            torch.from_numpy(P).copy_(T)
    return G


PRODUCT_ROWS = 2048   # rows of one k(A, B) tile in the float64 products (rows x n numbers)


def resident_bytes(n: int, d: int, k: int, block: int, dtype, rows: int = PRODUCT_ROWS) -> int:
    """Device bytes of a resident solve: Gram panels, the points (float64 + factor dtype), one Gram
    build temporary (panel), one float64 product tile, a few n x k blocks and the factor workspace."""
    itemsize = np.dtype(dtype).itemsize
    gram = SymmetricPanels.nbytes_for(n, block, dtype)
    points = n * d * (8 + itemsize)
    temporaries = n * block * itemsize + min(rows, n) * n * 8 + 6 * n * (k + 1) * 8
    workspace = (block * block + min(n * block, 1 << 24)) * itemsize
    return int(gram + points + temporaries + workspace)


@dataclass
class ResidentSolution:
    alpha: np.ndarray                 # float64 solution of (K + jitter I) alpha = Y
    residual: np.ndarray              # Y - (K + jitter I) alpha, float64 from the data
    report: dict                      # solve_refined's report (factor dtype, refinement, fallback)
    factors: list                     # one dict per factorization attempted (solve_refined's list)
    timings_s: dict                   # wall-clock per phase (solve_refined's "gram"/"factor"/"solve")
    device_timings_s: dict            # seconds per phase, the device synchronized at the end of each
    memory: dict = field(default_factory=dict)
    X_fit: object = None              # centered float64 training points on the device
    mean: np.ndarray | None = None
    kernel: str = "gaussian"
    bandwidth: float = 1.0
    rows: int = PRODUCT_ROWS

    def predict(self, X) -> np.ndarray:
        """k(X, X_fit) @ alpha on the device, float64; returns host scores."""
        import torch

        dev = self.X_fit.device
        Xt = torch.from_numpy(np.asarray(X, dtype=np.float64) - self.mean).to(dev)
        A = torch.from_numpy(self.alpha).to(dev)
        return kernel_matmul_torch(Xt, self.X_fit, A, self.kernel, self.bandwidth, rows=self.rows).cpu().numpy()


@dataclass(frozen=True)
class ResidentOptions:
    """What a resident solve computes (where it runs is its ``FactorOptions``)."""

    kernel: str = "gaussian"
    bandwidth: float = 1.0
    dtype: object = np.float32        # the factor dtype: float32 is refined in float64, float64 is direct
    jitter: float = 0.0
    max_refine: int = MAX_REFINE      # 0 with a float64 factor: a direct solve
    tol: float | None = None
    fallback_float64: bool = True
    rows: int = PRODUCT_ROWS          # rows of one float64 product tile


def solve_resident(X, Y, options: ResidentOptions, placement: FactorOptions) -> ResidentSolution:
    """Solve (K + jitter I) alpha = Y with K = k(X, X) entirely on ``placement.device`` (a torch device).

    ``options.dtype``: the factor dtype (float32: refined in float64, ``max_refine`` steps; float64 with
    ``max_refine=0`` is a direct solve). ``placement.tf32``: float32 factor GEMMs on TF32 (CUDA);
    ``placement.block_size``, ``placement.device_memory_budget`` as for ``linalg.factor``. Raises
    ``MemoryPlanError`` before any device work when the resident solve does not fit."""
    kernel, bandwidth, dtype, jitter = options.kernel, options.bandwidth, options.dtype, options.jitter
    max_refine, tol, fallback_float64, rows = options.max_refine, options.tol, options.fallback_float64, options.rows
    device, block, tf32 = placement.device, placement.block_size, placement.tf32
    device_memory_budget = placement.device_memory_budget
    # the rest of a placement has no meaning here: refuse it rather than ignore it
    if placement.checkpoint_dir is not None or placement.out_of_core is True or placement.backend not in ("auto", "torch"):
        raise InputError(f"a resident solve runs on torch with the whole Gram on the device, without checkpoints; got "
                         f"backend={placement.backend!r}, out_of_core={placement.out_of_core!r}, "
                         f"checkpoint_dir={placement.checkpoint_dir!r}. Use kernelfit.solve (host panels) for those.")
    from .linalg.factor import factor  # looked up per call, as before the move (the device checks patch it)

    torch = require_torch()
    dev = resolve_device(device)
    X64 = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X64.ndim != 2 or Y.ndim != 2 or len(X64) != len(Y):
        raise InputError(f"solve_resident expects X (n, d) and Y (n, k) with the same n; got X {X64.shape}, "
                         f"Y {Y.shape}. Reshape a single target with Y.reshape(-1, 1).")
    n, d = X64.shape
    block = choose_block(n, block)
    usable = int(device_memory_budget) if device_memory_budget is not None else \
        int(DEVICE_SAFETY * free_device_bytes(dev))
    need = resident_bytes(n, d, Y.shape[1], block, dtype, rows)
    if need > usable:
        raise MemoryPlanError(f"a resident solve of n={n} ({np.dtype(dtype).name}) needs {need / 2**30:.2f} GiB on {dev} "
                              f"and {usable / 2**30:.2f} GiB is usable. Use the host-panel path (kernelfit.solve with "
                              f"out_of_core='auto'), mode 'mixed' (float32 Gram), or fewer points.",
                              plan={"need_bytes": need, "usable_bytes": usable})
    mean = X64.mean(axis=0)
    Xc = X64 - mean                  # the kernels are translation-invariant; centering keeps float32 accurate
    Xd = torch.from_numpy(Xc).to(dev)
    timer = PhaseTimer()

    @contextlib.contextmanager
    def phase(name):
        # results.PhaseTimer is a wall clock: wait for the device's queued work before the phase ends
        with timer.phase(name):
            yield
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    def build(dt):
        with phase("gram"):
            return build_gram_panels_device(Xc, kernel, bandwidth, block, dt, dev, center=False, resident=True)

    def factor_gram(G):
        with phase("factor"):
            return factor(G, FactorOptions(tf32=tf32)).to_dict()

    def apply_high(V):
        with phase("refine"):
            out = kernel_matmul_torch(Xd, Xd, torch.from_numpy(V).to(dev), kernel, bandwidth, rows=rows,
                                      exact_diagonal=True)
            return out.cpu().numpy()

    def solver(L, diag):
        # the Gram has a unit diagonal (k(x, x) = 1) plus the jitter: no diagonal scaling to undo
        def solve_low(R):
            with phase("refine"):
                scale = float(np.max(np.abs(R))) or 1.0
                Z = cho_solve_torch(L, torch.from_numpy(R / scale).to(dev, L.panels[0].dtype))
                return Z.to(torch.float64).cpu().numpy() * scale
        return solve_low

    def fallback():
        need64 = resident_bytes(n, d, Y.shape[1], block, np.float64, rows)
        if need64 <= usable:
            return None
        return f"a float64 resident Gram needs {need64 / 2**30:.2f} GiB and {usable / 2**30:.2f} GiB is usable on {dev}"

    timings = {}
    # what a factor that breaks down cannot report itself: where it ran, and whether on TF32 (the rule
    # of linalg.factor for device-resident panels: float32 torch tensors on CUDA)
    attempt_info = {"backend": "torch", "device": str(dev), "path": "in-core",
                    "tf32": bool(tf32 and dev.type == "cuda" and np.dtype(dtype) == np.float32)}
    t = time.perf_counter()
    alpha, R, report, factors = solve_refined(
        build, factor_gram, apply_high, Y, dtype=dtype, max_refine=max_refine, tol=tol, jitter=jitter,
        scale_diagonal=False, fallback=fallback if fallback_float64 and np.dtype(dtype) != np.float64 else None,
        timings=timings, solver=solver, attempt_info=attempt_info)
    timings["total"] = time.perf_counter() - t
    memory = {"need_bytes": need, "usable_bytes": usable}
    if dev.type == "cuda":
        memory["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return ResidentSolution(alpha=alpha, residual=R, report=report, factors=factors, timings_s=timings,
                            device_timings_s=timer.as_dict(), memory=memory, X_fit=Xd, mean=mean, kernel=kernel,
                            bandwidth=float(bandwidth), rows=rows)


def resident_device(options, n: int, d: int, k: int, block: int, dtype):
    """The torch device a ``kernelfit.solve`` run should solve on resident, or None for the
    host-panel path. Resident: a CUDA device (or "cpu" with a device_memory_budget, which stands for
    a separate device, as in ``linalg.factor``), no checkpoint (they save host panels), out-of-core
    not forced, backend auto / torch, and the whole resident solve fits in the usable memory."""
    device = options.device
    if device is None or options.checkpoint_dir is not None or options.out_of_core is True:
        return None
    if options.backend not in ("auto", "torch"):
        return None
    spec = str(device)
    if not (spec.startswith("cuda") or (spec == "cpu" and options.device_memory_budget is not None)):
        return None
    dev = resolve_device(device)
    usable = options.device_memory_budget if options.device_memory_budget is not None else \
        DEVICE_SAFETY * free_device_bytes(dev)
    return dev if resident_bytes(n, d, k, block, dtype) <= usable else None
