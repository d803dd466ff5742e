"""A symmetric matrix and its Cholesky factor on disk: exact solves larger than memory.

Layout: ``SymmetricPanels``' lower-triangle panels, one ``.npy`` file per panel, in a checkpoint
directory (``checkpoint.owned_dir``: our marker, a PID lock; ``manifest.json`` in the checkpoint
format with one stage per factor dtype). The input panels are the stage's generation-0 *trailing*
files ``<stage>.T00000_<j>.npy``; a finished factor panel is ``<stage>.L_<j>.npy``. So the factor
on disk *is* the checkpoint: a left-looking factorization never modifies unfinished input panels,
and a slab's input files are removed only after its factor files and the manifest naming them are
on disk. A kill at any moment resumes from the last finished slab; with the same RAM budget the
slabs, hence every GEMM, are the same and the factor is bit-identical. A writer thread writes each
factor panel as it is finished and then the slab's manifest; one slab is committed at a time, so the
manifests advance slab by slab.

Every panel file's checksum (``storage.FILE_DIGEST``) is in the manifest: an input panel is hashed as
it is written and checked when a later process (a resume) reads it for its slab, a factor panel when
a resume opens the store.

I/O: panel files have their header padded to 4 KiB, so their numbers can be written and read with
O_DIRECT (``kernelfit.directio``): factor panels go to disk from the slab's own buffer, and streamed
factor rows come back into a few reused buffers, with no page-cache copies or fresh pages taking CPU
from the GEMMs (the factor is re-read once per slab: at the sizes this is for, far more than RAM
could cache). Input panels are read from the page cache where they still are (the fill just wrote
them), the rest directly. Where the file system refuses O_DIRECT (``stats.io`` says so), or for files
of an older store, the same reads and writes go through the page cache: input panels with plain
``preadv``, factor rows mapped read-only for the time of one piece. Either way resident memory stays
within the RAM budget plus a small overhead.

The slab algorithm (``slabs.left_looking``) talks to its slow memory through ``read_input``,
``factor_rows`` / ``release_rows``, ``write_factor_panel``, ``commit_slab`` and ``discard_unlisted``;
``DiskPanels`` is the disk implementation. The GPU path in ``outofcore.py`` (host RAM as slow memory,
a device as fast memory) has its own loop and planning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.linalg

from ..directio import (
    ALIGN,
    BufferPool,
    DirectIOUnsupported,
    aligned_empty,
    is_aligned,
    npy_header,
    open_direct,
    read_cached_then_direct,
    read_range,
    span,
)
from ..errors import DataError, InputError, StorageError
from ..places import check_free_space, check_writable_dir
from ..results import atomic_file
from ..storage import FILE_DIGEST, _hasher, matches_record, preallocate, recorded_digest, save_npy
from .checkpoint import FORMAT, MANIFEST, owned_dir, read_manifest
from .panels import SymmetricPanels, choose_block
from .slabs import _check_budget, left_looking, make_compute, min_disk_budget, plan_disk_slabs
from .tiled import single_blas_thread

FLAG = "scratch_dir"
FILL_CHUNK_BYTES = 64 << 20     # a Gram tile built while filling the store (bounded RAM, large writes)
# Resident memory besides the budget (over the interpreter with numpy/scipy imported): hashing a Gram
# file in 16 MiB chunks (32 MB peak), OpenBLAS's thread buffers, the reader and writer threads. Measured
# 16 MB over an 18 MB budget at n = 6,000 on 2 cores (tests/test_disk_outofcore.py checks
# VmHWM against budget + this).
OVERHEAD_BYTES = 48 << 20
_READ_MAX = 1 << 30             # one preadv call reads at most this much (Linux caps a call near 2 GiB)

TileFn = Callable[[slice, slice], np.ndarray]


@dataclass
class DiskStats:
    """What a disk factorization or solve did: bytes through the disk, seconds waiting on it.

    ``io_wait_s``: seconds the compute thread sat idle on the disk: waits for a slab's input panels
    (timings_s 'read_wait'), for a streamed panel the reader thread had not finished ('stream_wait'),
    for the previous slab's panel files and manifest ('write_wait'), plus the solves' waits for factor
    panels. 'read_slab' / 'write_slab' are the reader's / writer's own seconds (beside the GEMMs),
    'reader_cpu' / 'writer_cpu' the CPU they took. ``io``: "direct" or "buffered" and why."""
    strategy: str = "disk"
    budget_bytes: int = 0
    slabs: int = 0
    first_panel: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    io_wait_s: float = 0.0
    timings_s: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)     # which compute factored (``slabs.left_looking``'s record)
    io: str = ""         # "direct" (O_DIRECT, ``kernelfit.directio``) or "buffered" and why

    def to_dict(self) -> dict:
        return asdict(self)


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from file offset ``offset`` (plain reads: no mapping outlives the call)."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done : done + _READ_MAX]], offset + done)
        if got <= 0:
            raise DataError(f"unexpected end of file reading {len(buf)} bytes at offset {offset}.")
        done += got


def _npy_header(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read(f)
        return f.tell()


def disk_bytes(n: int, block: int, dtype, budget_bytes: int) -> int:
    """Disk a store needs: the lower panels once, plus one slab's factor files written before its
    input files are removed."""
    itemsize = np.dtype(dtype).itemsize
    gram = SymmetricPanels.nbytes_for(n, block, dtype)
    slab = max(sum((n - G) * min(block, n - G) * itemsize for G in SymmetricPanels.starts_for(n, block)[j0:j1])
               for j0, j1 in plan_disk_slabs(n, block, itemsize, int(budget_bytes)).slabs)
    return gram + slab + 2 * ALIGN * len(SymmetricPanels.starts_for(n, block))    # + the files' headers


@dataclass
class DiskPlan:
    """What a disk solve of n points needs, for ``kernelfit plan`` and the record: RAM (the budget
    plus OVERHEAD_BYTES) and disk bytes, and the factorization's predicted disk traffic."""
    n: int
    block: int
    dtype: str
    budget_bytes: int
    ram_bytes: int
    disk_bytes: int
    slabs: int
    factor_read_bytes: int
    factor_write_bytes: int
    free_disk_bytes: int | None = None
    fits: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan_disk(n: int, dtype, budget_bytes: int, scratch_dir=None, block: int | None = None) -> DiskPlan:
    """The disk strategy's numbers for n points with ``budget_bytes`` of RAM (MemoryPlanError when
    the budget cannot hold a slab); ``fits`` compares disk_bytes with what is free under
    ``scratch_dir`` (None when no directory is given)."""
    from ..places import free_bytes

    dtype = np.dtype(dtype)
    block = disk_block(n, dtype, budget_bytes) if block is None else choose_block(n, block)
    _check_budget(n, block, dtype.itemsize, budget_bytes)
    plan = plan_disk_slabs(n, block, dtype.itemsize, int(budget_bytes))
    starts = SymmetricPanels.starts_for(n, block)
    gram = SymmetricPanels.nbytes_for(n, block, dtype)
    # every input panel once, and for each slab rows s0.. of every finished panel
    streamed = sum(j0 * (n - starts[j0]) * block for j0, _ in plan.slabs) * dtype.itemsize
    free = free_bytes(scratch_dir) if scratch_dir is not None else None
    need = disk_bytes(n, block, dtype, budget_bytes)
    return DiskPlan(n=n, block=block, dtype=dtype.name, budget_bytes=int(budget_bytes),
                    ram_bytes=int(budget_bytes) + OVERHEAD_BYTES, disk_bytes=need, slabs=len(plan.slabs),
                    factor_read_bytes=gram + streamed, factor_write_bytes=gram, free_disk_bytes=free,
                    fits=None if free is None else need <= free)


def disk_block(n: int, dtype, budget_bytes) -> int:
    """Default panel width of a disk store: the in-core choice (full-rate GEMMs and panel steps), narrowed
    in steps of 128 only until a one-panel slab and its stream pieces fit the RAM budget."""
    block = choose_block(n)
    if n <= 128:
        return block
    itemsize, budget = np.dtype(dtype).itemsize, int(budget_bytes or 0)
    return next((b for b in range(block, 127, -128) if min_disk_budget(n, b, itemsize) <= budget), 128)


class DiskPanels:
    """Lower-triangle panels of an n x n symmetric matrix in a scratch directory (see module doc).

    ``open(directory, n, source=..., budget_bytes=...)`` claims the directory (refuses a foreign
    non-empty one, another run's lock naming its PID, a stage of another input, too little disk);
    ``fill(tile)`` writes the input; ``factor(budget)`` overwrites it with its Cholesky factor."""

    def __init__(self, directory, n: int, block: int, dtype, source: dict, flag: str = FLAG, direct_io: bool = True):
        self.dir = Path(directory)
        self.n, self.block, self.dtype = int(n), int(block), np.dtype(dtype)
        self.flag = flag
        self.stage = self.dtype.name
        self.source = source
        self.starts = SymmetricPanels.starts_for(self.n, self.block)
        self.widths = [min(self.block, self.n - s) for s in self.starts]
        self.owned = owned_dir(self.dir, flag)
        self.manifest = None
        self.stats = DiskStats()
        self.budget_bytes = 0
        self.hashed_here = set()     # input panels this process wrote and hashed: not hashed again on read
        self._data_offset = {}       # factor file name -> where its numbers start (a factor file never changes)
        self.direct_io = bool(direct_io)
        self.stats.io = "direct" if self.direct_io else "buffered (direct_io=False)"
        self._pieces = BufferPool()  # the buffers of streamed factor rows (direct I/O), reused
        self._lent = {}              # id(base array of a piece handed out) -> its pool buffer
        self._unlisted = {}          # factor files written for the slab in progress -> their records

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory, n: int, *, source: dict, budget_bytes: int, block: int | None = None,
             dtype=np.float32, resume: bool = False, flag: str = FLAG, direct_io: bool = True) -> "DiskPanels":
        """Claim ``directory`` for this matrix. ``source``: what the input is (JSON; a user's Gram file
        with its hash), so a resume of another input is refused. Nothing heavy runs before the checks.
        ``direct_io``: panel files written and read with O_DIRECT where the file system takes it
        (``kernelfit.directio``; ``stats.io`` says which ran), else through the page cache."""
        n = int(n)
        if n < 1:
            raise InputError(f"a disk store needs n >= 1 points; got {n}.")
        self = cls(directory, n, disk_block(n, dtype, budget_bytes) if block is None else choose_block(n, block),
                   dtype, source, flag, direct_io)
        self.budget_bytes = int(budget_bytes) if budget_bytes else 0
        _check_budget(n, self.block, self.dtype.itemsize, budget_bytes)
        check_writable_dir(self.dir, flag)
        self.owned.claim()
        fresh = True
        try:
            m = read_manifest(self.dir, flag)
            fresh = m is None
            st = None if m is None else m["stages"].get(self.stage)
            if st is not None and not resume:
                raise InputError(f"{flag} {self.dir} already holds a {self.stage} disk store (run {m['run_id'][:8]}); "
                                 f"pass resume=True (--resume) to continue it, or use an empty directory.")
            if st is not None:
                want = {"n": n, "block": self.block, "dtype": self.dtype.name, "input_sha256": self.input_sha256,
                        "algorithm": "left-looking", "strategy": "disk"}
                diffs = [f"{k}: store has {st.get(k)!r}, this run has {v!r}" for k, v in want.items() if st.get(k) != v]
                if diffs:
                    raise InputError(f"{flag} {self.dir} holds the store of a different input or factorization ("
                                     + "; ".join(diffs) + "). The Gram file or the options changed since it was "
                                     "written; use another directory, or delete this one and start afresh.")
            if m is None:
                import uuid

                m = {"format": FORMAT, "run_id": uuid.uuid4().hex, "stages": {}}
            if st is None:
                m["stages"][self.stage] = {
                    "n": n, "block": self.block, "dtype": self.dtype.name, "input_sha256": self.input_sha256,
                    "config": {"source": source}, "algorithm": "left-looking", "strategy": "disk",
                    "last_finished_panel": -1, "filled_panels": 0, "panels": len(self.starts),
                    "trailing_generation": 0, "complete": False, "files": {}}
            self.manifest = m
            have = sum(int(r.get("bytes", 0)) for r in self.record["files"].values())
            need = disk_bytes(n, self.block, self.dtype, budget_bytes) - have
            check_free_space(self.dir, max(need, 0), flag, f"the disk store (n={n}, {self.dtype.name})")
            if st is None:
                self._write_manifest()
            else:
                self._verify_factor_files()
            if self.direct_io:
                self._probe_direct_io()
        except BaseException:
            if fresh and not (self.dir / MANIFEST).exists():
                self.owned.remove([])      # refused before any write: leave no marker behind
            else:
                self.close()
            raise
        return self

    @property
    def input_sha256(self) -> str:
        blob = json.dumps({"n": self.n, "block": self.block, "dtype": self.dtype.name, "source": self.source},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def record(self) -> dict:
        return self.manifest["stages"][self.stage]

    @property
    def filled(self) -> int:
        return int(self.record.get("filled_panels", 0))

    @property
    def finished(self) -> int:
        """Panels 0..finished-1 hold the final factor."""
        return int(self.record["last_finished_panel"]) + 1

    @property
    def complete(self) -> bool:
        return bool(self.record["complete"])

    def close(self) -> None:
        self.owned.release()

    def remove(self) -> list[str]:
        """Delete the store: exactly the files the manifest lists, the manifest, marker and lock."""
        files = [f for st in self.manifest["stages"].values() for f in st["files"]] + [MANIFEST]
        return self.owned.remove(files)

    def _name(self, kind: str, j: int) -> str:
        return f"{self.stage}.L_{j:05d}.npy" if kind == "L" else f"{self.stage}.T00000_{j:05d}.npy"

    def _write_manifest(self) -> None:
        with atomic_file(self.dir / MANIFEST, "w") as f:
            json.dump(self.manifest, f, indent=1, sort_keys=True)

    def _probe_direct_io(self) -> None:
        """Whether this file system takes O_DIRECT: one aligned read of our manifest."""
        try:
            fd = open_direct(self.dir / MANIFEST)
            try:
                read_range(fd, 0, 1, aligned_empty(ALIGN))
            finally:
                os.close(fd)
        except DirectIOUnsupported as e:
            self._no_direct_io(e)

    def _no_direct_io(self, why: Exception) -> None:
        self.direct_io = False
        self.stats.io = f"buffered (O_DIRECT refused here: {why})"

    def _verify_factor_files(self) -> None:
        from ..errors import ChecksumError

        for name, rec in self.record["files"].items():
            if ".L_" not in name:
                continue            # input panels are checked as their slab reads them
            path = self.dir / name
            if not path.is_file() or not matches_record(path, rec):
                raise ChecksumError(f"{self.flag} {self.dir}: factor panel {name} is missing or does not match the "
                                    f"checksum in {MANIFEST}; the store is not used. Fix: delete the directory and "
                                    f"start afresh.")

    # --- filling -------------------------------------------------------------------------------
    def fill(self, tile: TileFn, jitter: float = 0.0, chunk_bytes: int | None = None) -> None:
        """Write the input panels from ``tile(rows, cols)`` (a dense block of the matrix), at most
        ``chunk_bytes`` at a time (default: 64 MiB, at most a quarter of the RAM budget); ``jitter``
        is added to the diagonal. Continues after the last filled panel."""
        itemsize = self.dtype.itemsize
        if chunk_bytes is None:
            chunk_bytes = min(FILL_CHUNK_BYTES, max(self.budget_bytes // 4, 1))
        t = time.perf_counter()
        for j in range(self.filled, len(self.starts)):
            s, w = self.starts[j], self.widths[j]
            name = self._name("T", j)
            header = npy_header(self.dtype, (self.n - s, w), ALIGN if self.direct_io else 64)
            offset = len(header)
            with open(self.dir / name, "wb") as f:     # header, then the data blocks reserved (a full disk fails here)
                f.write(header)
                f.flush()
                preallocate(f.fileno(), offset, (self.n - s) * w * itemsize, self.dir, self.flag, f"input panel {j}")
            h = _hasher(FILE_DIGEST)
            h.update(header)
            rows = max(1, chunk_bytes // (w * itemsize))
            with open(self.dir / name, "r+b") as f:
                f.seek(offset)
                for r0 in range(s, self.n, rows):
                    r1 = min(r0 + rows, self.n)
                    T = np.ascontiguousarray(tile(slice(r0, r1), slice(s, s + w)), dtype=self.dtype)
                    if T.shape != (r1 - r0, w):
                        raise InputError(f"tile(rows {r0}:{r1}, cols {s}:{s + w}) returned shape {T.shape}; "
                                         f"expected {(r1 - r0, w)}.")
                    if not np.isfinite(T).all():
                        i, k = np.argwhere(~np.isfinite(T))[0]
                        raise DataError(f"the matrix has a non-finite entry at ({r0 + i}, {s + k}); a Gram must be "
                                        f"finite. Fix: check the data or the Gram file.")
                    if jitter and r0 < s + w:
                        d = np.arange(r0, min(r1, s + w))
                        T[d - r0, d - s] += self.dtype.type(jitter)
                    f.write(T.data)
                    h.update(T.data)
                    self.stats.bytes_written += T.nbytes
                f.flush()
                os.fsync(f.fileno())
            self.record["files"][name] = {FILE_DIGEST: h.hexdigest(), "bytes": offset + (self.n - s) * w * itemsize}
            self.hashed_here.add(name)
            self.record["filled_panels"] = j + 1
            self._write_manifest()
        self.stats.timings_s["fill"] = self.stats.timings_s.get("fill", 0.0) + time.perf_counter() - t

    # --- the slow-memory interface of left_looking ---------------------------------------------
    def read_input(self, j: int, out: np.ndarray) -> None:
        """Input panel j into ``out``; checked against its manifest checksum unless this process wrote
        it (and hashed it then): a resume checks every input it reads."""
        from ..errors import ChecksumError

        name = self._name("T", j)
        rec = self.record["files"].get(name)
        if rec is None:
            raise StorageError(errno.ENOENT, f"{self.flag} {self.dir}: input panel {name} is not in {MANIFEST} "
                                             f"(the store was not filled); fill it first.")
        check = name not in self.hashed_here
        algorithm, digest = recorded_digest(rec)
        path = self.dir / name
        offset = _npy_header(path)
        if check:
            h = _hasher(algorithm)
            with open(path, "rb") as f:
                h.update(f.read(offset))
        if not self._read_direct(path, out, offset):
            fd = os.open(path, os.O_RDONLY)
            try:
                pread_into(fd, memoryview(out).cast("B"), offset)
            finally:
                os.close(fd)
        if check:
            h.update(memoryview(out).cast("B"))
        self.stats.bytes_read += out.nbytes
        if check and h.hexdigest() != digest:
            raise ChecksumError(f"{self.flag} {self.dir}: input panel {name} does not match the checksum in {MANIFEST} "
                                f"(modified or truncated); it is never used. Fix: delete the directory and start afresh.")

    def _read_direct(self, path, out: np.ndarray, offset: int) -> bool:
        """``out`` from ``offset`` of ``path`` with O_DIRECT when both are aligned; False when not done."""
        if not (self.direct_io and offset % ALIGN == 0 and is_aligned(out)):
            return False
        try:
            read_cached_then_direct(path, out, offset)
        except DirectIOUnsupported as e:
            self._no_direct_io(e)
            return False
        return True

    def factor_rows(self, k: int, row0: int, row1: int) -> np.ndarray:
        """Rows row0..row1 (absolute) of finished factor panel k, read-only, read on the caller's thread:
        with direct I/O into a pooled buffer (give it back with ``release_rows`` when done), else mapped
        (no copy; the mapping lives as long as the array)."""
        path = self.dir / self._name("L", k)
        w = self.widths[k]
        if path.name not in self._data_offset:      # read once, not once per streamed piece
            self._data_offset[path.name] = _npy_header(path)
        start = self._data_offset[path.name] + (row0 - self.starts[k]) * w * self.dtype.itemsize
        nbytes = (row1 - row0) * w * self.dtype.itemsize
        if self.direct_io and self._data_offset[path.name] % ALIGN == 0:
            buf = self._pieces.take(span(start, nbytes))
            try:
                fd = open_direct(path)
                try:
                    rows = read_range(fd, start, nbytes, buf)
                finally:
                    os.close(fd)
            except DirectIOUnsupported as e:
                self._pieces.give(buf)
                self._no_direct_io(e)
            else:
                self.stats.bytes_read += nbytes
                out = rows.view(self.dtype).reshape(row1 - row0, w)
                self._lent[id(out.base)] = buf
                out.flags.writeable = False
                return out
        base = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        fd = os.open(path, os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, start - base + nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=base)
        finally:
            os.close(fd)
        self.stats.bytes_read += nbytes
        return np.frombuffer(mm, dtype=self.dtype, count=(row1 - row0) * w, offset=start - base).reshape(row1 - row0, w)

    def release_rows(self, rows: np.ndarray) -> None:
        """``rows`` from ``factor_rows`` are no longer read: their buffer serves a later piece."""
        self._pieces.give(self._lent.pop(id(rows.base), None))

    def write_factor_panel(self, j: int, P: np.ndarray) -> None:
        """Write finished factor panel j (an atomic file, not yet in the manifest: ``commit_slab`` lists
        a slab's panels once all are written). A failed write (a full disk) removes this slab's unlisted
        files, keeps every finished slab and says how to resume."""
        name = self._name("L", j)
        try:
            self._unlisted[name] = save_npy(self.dir / name, P, direct=self.direct_io)
        except OSError as e:
            self._failed(f"could not write factor panel {j}", e)
        self.stats.bytes_written += P.nbytes

    def commit_slab(self, j0: int, j1: int) -> None:
        """The manifest naming factor panels j0..j1-1 (written by ``write_factor_panel``), then their
        input files removed: from here a resume starts at panel j1."""
        prev = self.record
        names = [self._name("L", j) for j in range(j0, j1)]
        try:
            files = {k: v for k, v in prev["files"].items() if k not in {self._name("T", j) for j in range(j0, j1)}}
            files.update({name: self._unlisted[name] for name in names})
            record = {**prev, "files": files, "last_finished_panel": j1 - 1, "complete": j1 == len(self.starts)}
            self.manifest["stages"][self.stage] = record
            self._write_manifest()
        except OSError as e:
            self.manifest["stages"][self.stage] = prev      # as the manifest on disk still says
            self._failed(f"could not write {MANIFEST} after factor panels {j0}..{j1 - 1}", e)
        for name in names:
            self._unlisted.pop(name)
        for j in range(j0, j1):
            (self.dir / self._name("T", j)).unlink(missing_ok=True)

    def discard_unlisted(self) -> None:
        """Remove the factor files written for a slab that was not committed (ours, not in the manifest):
        the store stays as its manifest says."""
        for name in list(self._unlisted):
            (self.dir / name).unlink(missing_ok=True)
            self._unlisted.pop(name)

    def _failed(self, what: str, e: OSError):
        self.discard_unlisted()
        done = self.finished
        kept = (f"panels 0..{done - 1} of the factor (finished slabs) are kept" if done else "no factor panel was "
                "finished yet; the input panels are kept")
        raise StorageError(e.errno or errno.EIO, f"{what} to {self.flag} {self.dir} ({e.strerror or e}); {kept} in "
                                                 f"{MANIFEST}. Fix: free space on that disk and rerun with resume=True "
                                                 f"(--resume) and the same memory budget to continue from panel "
                                                 f"{done}.") from None

    # --- factorization and solves --------------------------------------------------------------
    def factor(self, budget_bytes: int, progress=None, jitter: float = 0.0, device=None,
               device_memory_budget: int | None = None) -> DiskStats:
        """Overwrite the input with its Cholesky factor in ``budget_bytes`` of RAM (slabs + read-ahead).
        ``device`` (a torch device: 'cuda', 'cuda:1', or 'cpu' as a separate device): the slabs are
        factored there, disk -> host -> device, within ``device_memory_budget`` (None: 90% of its free
        memory) as well; None factors in host RAM. ``stats.device`` says which ran it."""
        if self.filled < len(self.starts):
            raise InputError(f"{self.flag} {self.dir}: only {self.filled} of {len(self.starts)} input panels are "
                             f"filled; fill the store before factoring it.")
        left_looking(self, budget_bytes, progress=progress, jitter=jitter,
                     compute=make_compute(device, device_memory_budget))
        return self.stats

    def iter_factor(self, reverse: bool = False):
        """(start, panel) of the factor in order (or reverse), each mapped ahead on a thread
        (``factor_rows``): at most two panels mapped at a time."""
        if not self.complete:
            raise InputError(f"{self.flag} {self.dir}: the factor is not finished ({self.finished} of "
                             f"{len(self.starts)} panels); run the factorization (resume=True continues it).")
        order = list(range(len(self.starts)))[::-1 if reverse else 1]

        def read(j):
            return self.factor_rows(j, self.starts[j], self.n)

        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(read, order[0])
            for i, j in enumerate(order):
                t = time.perf_counter()
                P = fut.result()
                self.stats.io_wait_s += time.perf_counter() - t
                fut = pool.submit(read, order[i + 1]) if i + 1 < len(order) else None
                yield self.starts[j], P
                self.release_rows(P)
                del P


def disk_cho_solve(store: DiskPanels, B: np.ndarray) -> np.ndarray:
    """Solve (L L^T) X = B with the factor on disk: forward substitution reads the panels in order,
    back substitution in reverse (``tiled.solve_lower`` / ``solve_upper_t`` panel by panel)."""
    B = np.asarray(B)
    squeeze = B.ndim == 1
    Z = np.array(B[:, None] if squeeze else B, dtype=store.dtype, copy=True, order="C")
    if Z.shape[0] != store.n:
        raise InputError(f"right-hand side has {Z.shape[0]} rows; the stored factor is {store.n} x {store.n}.")
    for s, P in store.iter_factor():
        w = P.shape[1]
        with single_blas_thread(Z.shape[1]):
            Z[s : s + w] = scipy.linalg.solve_triangular(P[:w], Z[s : s + w], lower=True, check_finite=False)
        if P.shape[0] > w:
            Z[s + w :] -= P[w:] @ Z[s : s + w]
    for s, P in store.iter_factor(reverse=True):
        w = P.shape[1]
        if P.shape[0] > w:
            Z[s : s + w] -= P[w:].T @ Z[s + w :]
        with single_blas_thread(Z.shape[1]):
            Z[s : s + w] = scipy.linalg.solve_triangular(P[:w], Z[s : s + w], lower=True, trans="T", check_finite=False)
    return Z[:, 0] if squeeze else Z
