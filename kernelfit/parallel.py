"""Thread control in one place: the pool for element-wise passes over big tiles, the task runner for
independent kernel tiles, and the BLAS thread limits both rely on.

numpy runs an element-wise ufunc on one thread but releases the GIL inside it, so row blocks on a
small pool use all cores; BLAS calls are already multi-threaded and do not go through that pool.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

_POOL_WORKERS = max(1, min(8, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="kernelfit-ew")
_MIN_PARALLEL_ELEMENTS = 1 << 20
# Set in the threads of ``parallel_tasks``: each task already has a core of its own, so the
# element-wise passes it calls run on that thread (the pool would put more busy threads than cores).
_in_task = threading.local()


def parallel_row_blocks(rows: int, size: int, fn) -> None:
    """Call ``fn(slice)`` for row blocks covering ``rows`` rows, on the thread pool when the tile
    (``size`` elements) is big enough to pay for it."""
    if size < _MIN_PARALLEL_ELEMENTS or _POOL_WORKERS == 1 or rows < 2 or getattr(_in_task, "on", False):
        fn(slice(0, rows))
        return
    step = -(-rows // _POOL_WORKERS)
    list(_pool.map(fn, [slice(i, min(i + step, rows)) for i in range(0, rows, step)]))


@functools.lru_cache(maxsize=1)
def blas_controller():
    """One threadpoolctl controller, made at first use (numpy's and scipy's BLAS are loaded by then):
    ``threadpool_limits`` scans the loaded libraries on every call, 1-2 ms each, and the solves and
    products limit threads once per block."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def blas_threads() -> int:
    """The number of threads one BLAS call would use now (the most among the loaded BLAS libraries)."""
    libs = blas_controller().select(user_api="blas").lib_controllers
    return max([int(lib.num_threads) for lib in libs] or [1])


@functools.lru_cache(maxsize=None)
def _task_pool(workers: int) -> ThreadPoolExecutor:
    def mark():
        _in_task.on = True

    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kernelfit-task", initializer=mark)


def parallel_tasks(fn, items, workers: int) -> None:
    """Call ``fn(item)`` for every item, ``workers`` at a time, each on one BLAS thread.

    For independent kernel tiles (a GEMM, its element-wise finish, a product with a few columns):
    tiles side by side on one core each beat every tile's GEMM split over all cores, because a
    threaded BLAS call leaves its worker threads spinning through the finish that follows it and the
    finish then shares the cores with them. ``fn`` must write only its own part of any output."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with blas_controller().limit(limits=1, user_api="blas"):
        list(_task_pool(workers).map(fn, items))


_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def limit_threads(n: int | None):
    """Run the enclosed work on at most ``n`` threads: BLAS / OpenMP (threadpoolctl, on every library
    loaded now), torch's intra-op pool, the element-wise pool, and (through the environment) any
    library or worker process started inside. Everything is restored on exit. ``None`` changes nothing.

    For a shared machine: on 2 busy cores a solve left on all threads runs several times slower than
    on one, because BLAS threads spin while they wait for a core."""
    global _POOL_WORKERS, _pool
    if n is None:
        yield
        return
    n = int(n)
    if n < 1:
        raise ValueError(f"threads: expected a positive integer, got {n}")
    import numpy  # noqa: F401  (load both BLAS libraries first, so that the limit reaches them)
    import scipy.linalg  # noqa: F401

    saved_env = {k: os.environ.get(k) for k in _THREAD_ENV}
    saved_pool = (_POOL_WORKERS, _pool)
    os.environ.update({k: str(n) for k in _THREAD_ENV})
    _POOL_WORKERS, _pool = min(_POOL_WORKERS, n), ThreadPoolExecutor(max_workers=min(_POOL_WORKERS, n),
                                                                     thread_name_prefix="kernelfit-ew")
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        with blas_controller().limit(limits=n):
            yield
    finally:
        _pool.shutdown(wait=False)
        _POOL_WORKERS, _pool = saved_pool
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
