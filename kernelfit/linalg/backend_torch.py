"""torch backend: the three in-place tile kernels of ``tiled.py`` on torch tensors (CPU or CUDA).

``tiled.cholesky_inplace`` only slices panels and calls ``potrf`` / ``trsm`` / ``syrk_update``, so a
``SymmetricPanels`` whose panels are torch tensors runs the *same* tiled algorithm through this
backend, on whatever device the tensors live on. CI runs it on CPU tensors; the CUDA path is the
same code with device tensors.

Index limits: every call here sees one tile or one panel (at most (n - s) x block elements, e.g.
150,000 x 2,048 = 3.1e8 < 2^31), never the whole matrix, so 32-bit LAPACK/cuBLAS indexing is never
approached by the tiled path. Whole-matrix calls (the benchmark's ``torch.linalg.cholesky``
reference) go through torch, which uses cuSOLVER's 64-bit ``cusolverDnXpotrf`` API on CUDA.

TF32: PyTorch may run float32 matmuls on TF32 tensor cores (10-bit mantissa). That corrupts the
|x|^2 + |z|^2 - 2 x.z expansion of squared distances, so Gram construction runs inside
``tf32_disabled()``; the factorization may opt in with ``tf32_enabled()`` (mixed precision then
refines the answer in float64).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import InputError

# A triangular solve in torch is out of place; solving a tall panel in row chunks bounds the
# temporary to TRSM_CHUNK_ELEMENTS numbers (64 MiB in float32) instead of a whole panel.
TRSM_CHUNK_ELEMENTS = 1 << 24


def require_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but keep the message clean
        raise InputError("backend='torch' needs PyTorch, which is not installed here. Install it "
                         "(pip install torch) or use backend='numpy'.") from None
    return torch


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device=None):
    """torch.device from None ('cuda' when available, else 'cpu'), a string or a device.
    Asking for CUDA on a machine without it raises with what was found."""
    torch = require_torch()
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} was requested but torch {torch.__version__} sees no CUDA GPU "
                         f"(torch.cuda.is_available() is False). Use device='cpu' or run on a machine with a GPU.")
    return dev


def torch_dtype(dtype):
    torch = require_torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def numpy_dtype(dtype):
    torch = require_torch()
    return {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}[dtype]


def _new_precision_api(torch) -> bool:
    # torch >= 2.9: per-backend fp32_precision ("ieee" / "tf32"); mixing it with the legacy
    # allow_tf32 flags makes later reads raise, so use only one API, the new one where it exists.
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


@contextlib.contextmanager
def _tf32(value: bool):
    torch = require_torch()
    if _new_precision_api(torch):
        knobs = [torch.backends.cuda.matmul]
        # CPU (oneDNN) matmuls can also be lowered to reduced precision; cuDNN convolutions default
        # to TF32 (torch.backends.cudnn.conv.fp32_precision == "tf32"), the random-conv features use them
        for name, op in (("mkldnn", "matmul"), ("cudnn", "conv"), ("mkldnn", "conv")):
            knob = getattr(getattr(torch.backends, name, None), op, None)
            if knob is not None and hasattr(knob, "fp32_precision"):
                knobs.append(knob)
        saved = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "tf32" if value else "ieee"
        try:
            yield
        finally:
            for k, v in zip(knobs, saved):
                k.fp32_precision = v
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = value
    torch.backends.cudnn.allow_tf32 = value
    torch.set_float32_matmul_precision("high" if value else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])


def tf32_matmul_enabled() -> bool:
    """Whether float32 CUDA matmuls may use TF32 now (reads the API in use without mixing them)."""
    torch = require_torch()
    if _new_precision_api(torch):
        prec = torch.backends.cuda.matmul.fp32_precision
        if prec == "none":
            prec = getattr(torch.backends, "fp32_precision", "ieee")
        return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def tf32_disabled():
    """Context: float32 matmuls and convolutions in full float32 (Grams, features); restores the settings."""
    return _tf32(False)


def tf32_enabled():
    """Context: allow TF32 tensor cores for float32 matmuls (factor GEMMs only); restores after."""
    return _tf32(True)


class TorchBackend:
    name = "torch"

    @staticmethod
    def potrf(T) -> int:
        torch = require_torch()
        L, info = torch.linalg.cholesky_ex(T, upper=False)   # reads the lower triangle only
        T.copy_(L)                                           # L has zeros above the diagonal
        return 0 if info.is_meta else int(info)              # meta tensors (dry runs) hold no values

    @staticmethod
    def trsm(P, L) -> None:
        # P <- P L^{-T}: solve X L^T = P (right side, upper triangular L^T), in row chunks.
        torch = require_torch()
        U = L.transpose(0, 1)
        rows = max(1, TRSM_CHUNK_ELEMENTS // max(1, P.shape[1]))
        for a in range(0, P.shape[0], rows):
            chunk = P[a : a + rows]
            chunk.copy_(torch.linalg.solve_triangular(U, chunk, upper=True, left=False))

    @staticmethod
    def syrk_update(C, A, B) -> None:
        # C <- C - A B^T in place (addmm_ writes into C; no temporary of C's size).
        C.addmm_(A, B.transpose(0, 1), beta=1.0, alpha=-1.0)

    @staticmethod
    def empty(shape, dtype, device="cpu"):
        torch = require_torch()
        return torch.empty(tuple(shape), dtype=torch_dtype(dtype), device=device)


def panels_to_torch(G, device=None, copy: bool = True):
    """SymmetricPanels of numpy arrays -> SymmetricPanels of torch tensors on ``device``.
    With copy=False on CPU the tensors share memory with the numpy panels."""
    torch = require_torch()
    from .panels import SymmetricPanels

    dev = resolve_device(device)
    if dev.type == "cpu" and not copy:
        panels = [torch.from_numpy(P) for P in G.panels]
    else:
        panels = [torch.from_numpy(P).to(dev, copy=True) for P in G.panels]
    return SymmetricPanels(n=G.n, block=G.block, panels=panels)


def panels_to_numpy(G):
    from .panels import SymmetricPanels

    return SymmetricPanels(n=G.n, block=G.block, panels=[P.detach().cpu().numpy() for P in G.panels])


def cho_solve_torch(L, B):
    """Solve (L L^T) X = B with a SymmetricPanels of torch tensors; B is a tensor on the same device."""
    torch = require_torch()
    squeeze = B.ndim == 1
    Z = (B[:, None] if squeeze else B).clone()
    pairs = list(zip(L.starts, L.panels))
    for s, P in pairs:                       # forward: L Z = B
        w = P.shape[1]
        Z[s : s + w] = torch.linalg.solve_triangular(P[:w], Z[s : s + w], upper=False)
        if P.shape[0] > w:
            Z[s + w :] -= P[w:] @ Z[s : s + w]
    for s, P in reversed(pairs):             # backward: L^T X = Z
        w = P.shape[1]
        if P.shape[0] > w:
            Z[s : s + w] -= P[w:].transpose(0, 1) @ Z[s + w :]
        Z[s : s + w] = torch.linalg.solve_triangular(P[:w].transpose(0, 1), Z[s : s + w], upper=True)
    return Z[:, 0] if squeeze else Z
