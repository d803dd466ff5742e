"""The one thread pool for element-wise passes over big tiles (kernel finishes, casts, copies).

numpy runs an element-wise ufunc on one thread but releases the GIL inside it, so row blocks on a
small pool use all cores; BLAS calls are already multi-threaded and do not go through here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_POOL_WORKERS = max(1, min(8, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="kernelfit-ew")
_MIN_PARALLEL_ELEMENTS = 1 << 20


def parallel_row_blocks(rows: int, size: int, fn) -> None:
    """Call ``fn(slice)`` for row blocks covering ``rows`` rows, on the thread pool when the tile
    (``size`` elements) is big enough to pay for it."""
    if size < _MIN_PARALLEL_ELEMENTS or _POOL_WORKERS == 1 or rows < 2:
        fn(slice(0, rows))
        return
    step = -(-rows // _POOL_WORKERS)
    list(_pool.map(fn, [slice(i, min(i + step, rows)) for i in range(0, rows, step)]))
