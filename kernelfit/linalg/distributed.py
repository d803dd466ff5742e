"""Distributed blocked Cholesky and solves on dask.distributed, for problems past one machine.

The matrix is cut into square tiles (block x block, the last row/column narrower). The factorization
is the right-looking tiled algorithm written as a task graph of futures:

    for k:  L_kk = potrf(A_kk)
            L_ik = trsm(A_ik, L_kk)                   i > k
            A_ij = A_ij - L_ik L_jk^T                 k < j <= i

Each task runs the same tile kernels as the single-process code (``backend.get_backend``), so the
result agrees with ``tiled.cholesky_inplace`` to rounding. Tiles stay on the workers as futures; the
solves (forward and back substitution by tiles) are task graphs on them too, and only the solution
comes back. Tiles can be scattered from host panels, taken from a dask array with square chunks,
or computed on the workers by a tile function the caller hands in (``lower_tiles``: kernel tiles
from the data in ``kernelfit.gram.gram_tiles``, tiles of a Gram file in ``kernelfit.data.gram``), so
the Gram never exists on the driver.

``dask.array.linalg.cholesky`` would also work on square chunks, but it factors with scipy on
whole tiles without our NotPositiveDefinite reporting and backends; the explicit graph keeps one
algorithm and lets GPU workers run tiles with ``backend="torch", device="cuda"`` (that path is
UNTESTED here: no GPU). Connect with ``scheduler_address="tcp://host:8786"`` or pass a ``Client``.
"""

from __future__ import annotations

import uuid
from typing import Self

import numpy as np

from ..errors import InputError, NotPositiveDefiniteError
from .panels import SymmetricPanels


def require_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError("the distributed solver needs dask.distributed; install kernelfit[dask] "
                         "(pip install 'dask[distributed]').") from None
    return distributed


def get_client(client=None, scheduler_address: str | None = None):
    """An existing Client, a Client connected to ``scheduler_address``, or the current default client."""
    distributed = require_distributed()
    if client is not None:
        return client
    if scheduler_address is not None:
        return distributed.Client(scheduler_address)
    try:
        return distributed.get_client()
    except ValueError:
        raise InputError("no dask client: pass client=Client(...) or scheduler_address='tcp://host:8786' "
                         "(or start one with distributed.LocalCluster()).") from None


# --- tile tasks (run on workers; pure: inputs are never modified) -------------------------------

def _kernels(backend, device):
    from .backend import get_backend

    return get_backend(backend), device


def _to(x, backend, device):
    if backend == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(device or "cpu", copy=True)
    return np.array(x, order="C", copy=True)


def _back(x):
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def _potrf(T, row0, n, backend, device):
    be, _ = _kernels(backend, device)
    T = _to(T, backend, device)
    info = be.potrf(T)
    if info:
        raise NotPositiveDefiniteError(minor=row0 + info, n=n, dtype=str(T.dtype))
    return _back(T)


def _trsm(P, L, backend, device):
    be, _ = _kernels(backend, device)
    P = _to(P, backend, device)
    be.trsm(P, _to(L, backend, device))
    return _back(P)


def _update(C, A, B, backend, device):
    be, _ = _kernels(backend, device)
    C = _to(C, backend, device)
    be.syrk_update(C, _to(A, backend, device), _to(B, backend, device))
    return _back(C)


def _fwd_sub(acc, Lik, Zk):
    return acc - Lik @ Zk


def _bwd_sub(acc, Lki, Xk):
    return acc - Lki.T @ Xk


def _trsv(L, R, trans):
    import scipy.linalg

    return scipy.linalg.solve_triangular(L, R, lower=True, trans="T" if trans else "N", check_finite=False)


# --- tiles ------------------------------------------------------------------------------------------

class TiledMatrix:
    """Lower tiles (i >= j) of a symmetric matrix as futures on the cluster."""

    def __init__(self, client, tiles: dict, n: int, block: int, dtype, keepalive=None):
        self.client, self.tiles, self.n, self.block, self.dtype = client, tiles, n, block, np.dtype(dtype)
        # Scattered data cannot be recomputed: if the client released it while dependent tasks still
        # wait, the scheduler cancels them ("lost dependencies"). Hold such futures until done.
        self.keepalive = list(keepalive or [])

    def wait(self) -> "TiledMatrix":
        """Block until every tile is computed (raising a task's error), then drop held inputs."""
        distributed = require_distributed()
        distributed.wait(list(self.tiles.values()))
        for f in self.tiles.values():
            if f.status == "error":
                f.result()
        self.keepalive = []
        return self

    @property
    def starts(self):
        return list(range(0, self.n, self.block))

    @property
    def T(self) -> int:
        return len(self.starts)

    def to_panels(self) -> SymmetricPanels:
        """Gather to host panel storage (for comparison with the single-process factor)."""
        G = SymmetricPanels.empty(self.n, self.block, self.dtype)
        keys = list(self.tiles)
        values = self.client.gather([self.tiles[k] for k in keys])
        self.keepalive = []
        st = self.starts
        for (i, j), tile in zip(keys, values):
            G.panels[j][st[i] - st[j] : st[i] - st[j] + tile.shape[0]] = tile
        return G

    def to_dask_array(self):
        """Lower triangle as a dask array (zeros above the diagonal), tiles staying on the workers."""
        import dask.array as da

        st = self.starts
        widths = [min(self.block, self.n - s) for s in st]
        rows = []
        for i in range(self.T):
            row = []
            for j in range(self.T):
                if j <= i:
                    row.append(da.from_delayed(self.tiles[(i, j)], (widths[i], widths[j]), dtype=self.dtype))
                else:
                    row.append(da.zeros((widths[i], widths[j]), dtype=self.dtype, chunks=(widths[i], widths[j])))
            rows.append(row)
        return da.block(rows)


def scatter_panels(G: SymmetricPanels, client=None, scheduler_address=None) -> TiledMatrix:
    """Send the lower tiles of host panels to the workers."""
    client = get_client(client, scheduler_address)
    st = G.starts
    data = {}
    for j, P in enumerate(G.panels):
        for i in range(j, len(st)):
            w = min(G.block, G.n - st[i])
            data[(i, j)] = np.ascontiguousarray(P[st[i] - st[j] : st[i] - st[j] + w])
    keys = list(data)
    futures = client.scatter([data[k] for k in keys], hash=False)   # equal tiles (zeros) must not share a key
    return TiledMatrix(client, dict(zip(keys, futures)), G.n, G.block, G.dtype, keepalive=futures)


def from_dask_array(A, client=None, scheduler_address=None) -> TiledMatrix:
    """Lower tiles of a symmetric dask array with square chunks (all equal but the last)."""
    client = get_client(client, scheduler_address)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise InputError(f"expected a square 2-D dask array; got shape {A.shape}.")
    rc, cc = A.chunks
    block = rc[0]
    if rc != cc or any(c != block for c in rc[:-1]) or rc[-1] > block:
        raise InputError(f"the distributed Cholesky needs square chunks, all equal but a smaller last one; got "
                         f"row chunks {rc} and column chunks {cc}. Use A.rechunk(({block}, {block})).")
    blocks = A.to_delayed()
    T = len(rc)
    futures = client.compute([blocks[i, j] for i in range(T) for j in range(i + 1)])
    keys = [(i, j) for i in range(T) for j in range(i + 1)]
    return TiledMatrix(client, dict(zip(keys, futures)), A.shape[0], block, A.dtype)


def lower_tiles(tile, tile_args, n: int, block: int, dtype, client, name: str = "tile", keepalive=None) -> TiledMatrix:
    """A TiledMatrix whose lower tiles (i >= j) are computed on the workers: tile (i, j) is
    ``tile(*tile_args(i, j, r0, r1, c0, c1))`` for rows r0:r1 and columns c0:c1. ``tile`` must be a
    picklable function (it travels to the workers); ``tile_args`` runs on the driver and may return
    futures (dask resolves them on the worker). ``keepalive`` holds futures the tiles read from.
    The caller builds the tiles (kernel tiles from data, tiles read from a Gram file): linalg
    only lays out and submits them."""
    st = list(range(0, n, block))
    tag = uuid.uuid4().hex[:12]
    tiles = {(i, j): client.submit(tile, *tile_args(i, j, st[i], min(st[i] + block, n), st[j], min(st[j] + block, n)),
                                   key=f"{name}-{i}-{j}-{tag}")
             for i in range(len(st)) for j in range(i + 1)}
    return TiledMatrix(client, tiles, n, block, dtype, keepalive=keepalive)


class Cluster:
    """A dask Client for ``--scheduler``: ``tcp://HOST:PORT`` connects, ``local:N`` starts a LocalCluster of N
    worker processes (one thread each) and shuts it down on ``close`` / leaving the ``with`` block."""

    def __init__(self, scheduler: str):
        distributed = require_distributed()
        self.scheduler, self.cluster = str(scheduler), None
        if self.scheduler.startswith("local:"):
            try:
                workers = int(self.scheduler.split(":", 1)[1])
            except ValueError:
                workers = 0
            if workers < 1:
                raise InputError(f"--scheduler {scheduler!r}: expected local:N with N >= 1 worker processes "
                                 f"(e.g. local:2), or a scheduler address tcp://HOST:PORT.")
            self.cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                    dashboard_address=":0", silence_logs=40)
            self.client = distributed.Client(self.cluster)
        else:
            if "://" not in self.scheduler:
                raise InputError(f"--scheduler {scheduler!r}: expected a scheduler address such as "
                                 f"tcp://10.0.0.5:8786, or local:N to start N local worker processes.")
            try:
                self.client = distributed.Client(self.scheduler, timeout="10s")
            except OSError as exc:
                raise InputError(f"--scheduler {scheduler!r}: could not connect ({exc}). Fix: start the "
                                 f"scheduler (dask scheduler) and workers, or use local:N.") from None

    def info(self) -> dict:
        return {"scheduler": self.scheduler, "address": str(self.client.scheduler.address),
                "workers": len(self.client.scheduler_info()["workers"]), "local": self.cluster is not None}

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cholesky(A: TiledMatrix, backend: str = "numpy", device=None) -> TiledMatrix:
    """Right-looking tiled Cholesky as a graph of futures; returns the factor's tiles (lazy)."""
    client, T, st, n = A.client, A.T, A.starts, A.n
    W = dict(A.tiles)
    L = {}
    tag = uuid.uuid4().hex[:12]   # unique keys: never collide with a previous run's futures
    for k in range(T):
        L[(k, k)] = client.submit(_potrf, W[(k, k)], st[k], n, backend, device, key=f"potrf-{k}-{tag}")
        for i in range(k + 1, T):
            L[(i, k)] = client.submit(_trsm, W[(i, k)], L[(k, k)], backend, device, key=f"trsm-{i}-{k}-{tag}")
        for i in range(k + 1, T):
            for j in range(k + 1, i + 1):
                W[(i, j)] = client.submit(_update, W[(i, j)], L[(i, k)], L[(j, k)], backend, device,
                                          key=f"update-{i}-{j}-{k}-{tag}")
    return TiledMatrix(client, L, n, A.block, A.dtype, keepalive=list(A.tiles.values()) + A.keepalive)


def cho_solve(L: TiledMatrix, B) -> np.ndarray:
    """Solve (L L^T) X = B with the distributed factor; only X comes back to the driver."""
    client, T, st = L.client, L.T, L.starts
    B = np.asarray(B)
    squeeze = B.ndim == 1
    B2 = np.ascontiguousarray((B[:, None] if squeeze else B), dtype=L.dtype)
    if B2.shape[0] != L.n:
        raise InputError(f"right-hand side has {B2.shape[0]} rows; the factor is {L.n} x {L.n}.")
    Bf = client.scatter([B2[s : s + L.block] for s in st], hash=False)
    Z = {}
    for i in range(T):
        acc = Bf[i]
        for k in range(i):
            acc = client.submit(_fwd_sub, acc, L.tiles[(i, k)], Z[k])
        Z[i] = client.submit(_trsv, L.tiles[(i, i)], acc, False)
    X = {}
    for i in reversed(range(T)):
        acc = Z[i]
        for k in range(i + 1, T):
            acc = client.submit(_bwd_sub, acc, L.tiles[(k, i)], X[k])
        X[i] = client.submit(_trsv, L.tiles[(i, i)], acc, True)
    out = np.vstack(client.gather([X[i] for i in range(T)]))
    L.keepalive = []   # every factor tile was needed, so all are computed now
    return out[:, 0] if squeeze else out
