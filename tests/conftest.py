"""Shared pytest fixtures.

``shared_data_dir`` locates the real data sets (``mnist.npz``, ``cifar10-jpeg-q75.tar.gz``) that
tests marked ``@pytest.mark.data`` need. It looks, in order, at ``$KERNELFIT_DATA`` and at
``<repo root>/../shared/data`` (where CI mounts them) and skips the test with a reason naming
both places when neither holds ``mnist.npz``. ``blas_thread_counts`` reads every loaded BLAS
library's thread count through ``threadpoolctl.threadpool_info`` (not through kernelfit's own
controller), for tests of the thread limits.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _candidate_data_dirs() -> list[tuple[str, Path | None]]:
    env = os.environ.get("KERNELFIT_DATA")
    return [
        ("$KERNELFIT_DATA", Path(env).expanduser() if env else None),
        ("<repo root>/../shared/data", DEFAULT_SHARED_DATA),
    ]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Directory holding the real data sets (at least ``mnist.npz``); skips when there is none."""
    tried = []
    for label, path in _candidate_data_dirs():
        if path is None:
            tried.append(f"{label} (not set)")
            continue
        if (path / "mnist.npz").is_file():
            return path.resolve()
        tried.append(f"{label} = {path} (no mnist.npz)")
    pytest.skip(
        "real data sets not found: looked for mnist.npz in " + "; ".join(tried)
        + ". Set KERNELFIT_DATA to a directory holding mnist.npz (and cifar10-jpeg-q75.tar.gz) "
        "or place them in ../shared/data next to the repository."
    )


@pytest.fixture
def blas_thread_counts():
    """A function giving the thread count of each loaded BLAS library, read fresh by threadpoolctl."""
    from threadpoolctl import threadpool_info

    return lambda: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def interrupt_at_commit():
    """``interrupt_at_commit(store, k)``: the disk store's k-th slab commit raises
    RuntimeError("interrupted"), so k - 1 slabs stay finished on disk."""
    def arm(store, k: int):
        real, commits = store.commit_slab, {"n": 0}

        def commit(j0, j1):
            commits["n"] += 1
            if commits["n"] == k:
                raise RuntimeError("interrupted")
            real(j0, j1)

        store.commit_slab = commit

    return arm


@pytest.fixture
def full_disk_at(monkeypatch):
    """``full_disk_at(n)``: the n-th panel file the disk store writes (``diskstore.save_npy``) fails with
    ENOSPC; returns a function that gives the disk its space back."""
    import errno

    from kernelfit.linalg import diskstore

    real = diskstore.save_npy

    def arm(n: int):
        calls = {"n": 0}

        def full_disk(path, arr, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, arr, **kw)

        monkeypatch.setattr(diskstore, "save_npy", full_disk)
        return lambda: monkeypatch.setattr(diskstore, "save_npy", real)

    return arm
