"""Directories kernelfit owns: checkpoint directories and feature / Gram cache directories.

Rules (never touch what we did not write):

* A directory we write into carries our marker file ``.kernelfit-owned.json`` (its kind, and whether
  we created the directory). A non-empty directory without it is refused before any work, with what
  was found in it; a cache directory whose every entry is named like a cache file of ours (one written
  before markers existed) is adopted instead.
* One run at a time: ``fcntl.flock`` on ``.kernelfit-lock`` in the directory, which holds the PID of
  the run that has it; a second run gets an error naming that PID. The lock is re-entrant within one
  process (flock would otherwise refuse a second descriptor of the same process).
* Only our own temporaries are cleaned, and only in a marked directory we hold the lock of: the
  ``.NAME.XXXXXXXX.tmp`` names of :func:`kernelfit.results.atomic_file` where NAME is one of the
  directory's own file names.
* Cleanup removes exactly the names the caller lists (its manifest), then the marker and the lock,
  and the directory only when that leaves it empty and we created it.
* Files written through a memmap are preallocated (``os.posix_fallocate``), so a full disk is an error
  with a message before any byte is written, never a SIGBUS in the middle.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import weakref
from pathlib import Path

import numpy as np

from .errors import InputError, StorageError
from .places import check_free_space, free_bytes
from .results import atomic_file, format_bytes

__all__ = ["StorageError", "OwnedDir", "MARKER", "LOCK", "HashingWriter", "save_npy", "file_digest", "FILE_DIGEST",
           "recorded_digest", "matches_record",
           "create_npy_memmap", "preallocate"]

MARKER = ".kernelfit-owned.json"
LOCK = ".kernelfit-lock"
_MKSTEMP_TAIL = r"\.[a-z0-9_]{8}\.tmp"     # tempfile.mkstemp's 8 random characters + our suffix


# ------------------------------------------------------------------------------------------- locks
_HELD: dict[str, list] = {}    # realpath -> [fd, count]: this process's locks (flock is per descriptor)


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _acquire(directory: Path, what: str) -> str:
    key = os.path.realpath(directory)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    lock = Path(key) / LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(errno.EBUSY, f"{what} {directory} is in use by another kernelfit run (PID "
                                            f"{_read_pid(lock)}); two runs in one directory would mix their files. "
                                            f"Fix: wait for that run to finish, or choose another directory.") from None
        try:   # the file we locked must still be the lock file (a finishing run may have removed it)
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    return key


def _release(key: str, remove_file: bool = False) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0 and not remove_file:
        return
    if remove_file:   # unlinked while still locked, so no other run can have locked this file meanwhile
        try:
            os.unlink(Path(key) / LOCK)
        except FileNotFoundError:
            pass
    os.close(held[0])
    del _HELD[key]


# ---------------------------------------------------------------------------------- owned directories
class OwnedDir:
    """A directory kernelfit writes into. ``names``: a regex of the file names the owner writes there
    (matched whole); they, the marker and the lock are the only names whose orphan temporaries are
    ever removed. ``adopt``: adopt an unmarked directory whose entries all match ``names`` (caches).
    ``temporaries``: a regex of the owner's other temporary file names (cleaned like atomic_file's)."""

    def __init__(self, path, kind: str, flag: str, names: str, adopt: bool = False, temporaries: str | None = None):
        self.path = Path(path).expanduser()
        self.kind, self.flag, self.adopt = kind, flag, adopt
        self.names = re.compile(names)
        own = f"(?:{names}|{re.escape(MARKER)})"
        # atomic_file's temporaries of our names, and any other temporary naming of the owner's
        self.tmp = re.compile(rf"\.{own}{_MKSTEMP_TAIL}" + (f"|{temporaries}" if temporaries else ""))
        self._key = None
        self._finalizer = None

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    def marker(self) -> dict | None:
        """Our marker's content, or None when there is none (a foreign or corrupt one is an error)."""
        if not self.marker_path.exists():
            return None
        try:
            m = json.loads(self.marker_path.read_text())
            if not isinstance(m, dict) or "kind" not in m:
                raise ValueError("not a kernelfit marker")
        except (OSError, ValueError) as e:
            raise StorageError(errno.EINVAL, f"{self.flag} {self.path}: its marker {MARKER} is unreadable "
                                             f"({e}); kernelfit leaves the directory as it is. Fix: choose an "
                                             f"empty or new directory.") from None
        if m["kind"] != self.kind:
            raise InputError(f"{self.flag} {self.path} is a kernelfit {m['kind']} directory, not a {self.kind} "
                             f"directory. Fix: choose an empty or new directory.")
        return m

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name not in (MARKER, LOCK))

    def check(self) -> None:
        """Refuse (InputError) a path that is a file, or a non-empty directory we did not mark."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.flag} {self.path} is a file; expected a directory. Fix: choose an empty or "
                             f"new directory.")
        if not self.path.is_dir() or self.marker() is not None:
            return
        found = self._entries()
        if not found:
            return
        if self.adopt and all(self.names.fullmatch(n) or self.tmp.fullmatch(n) for n in found):
            return
        shown = ", ".join(found[:6]) + (f", ... ({len(found)} entries)" if len(found) > 6 else "")
        raise InputError(f"{self.flag} {self.path} is not empty and kernelfit did not write it (no {MARKER}); "
                         f"found: {shown}. kernelfit never writes into or deletes from a directory it does not own. "
                         f"Fix: choose an empty or new directory.")

    def claim(self) -> "OwnedDir":
        """check(), create the directory and our marker, take the lock, clean our orphan temporaries."""
        if self._key is not None:
            return self
        self.check()
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        if self.marker() is None:
            with atomic_file(self.marker_path, "w") as f:
                json.dump({"kind": self.kind, "created_directory": created, "pid": os.getpid()}, f)
        first = os.path.realpath(self.path) not in _HELD
        self._key = _acquire(self.path, self.flag)
        self._finalizer = weakref.finalize(self, _release, self._key)
        if first:
            self.clean_orphans()
        return self

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()       # runs _release once
        self._key = self._finalizer = None

    def clean_orphans(self) -> list[str]:
        """Remove temporaries of our naming left by a killed run (we hold the lock: no writer is live)."""
        gone = []
        for p in self.path.iterdir():
            if self.tmp.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p.name)
        return gone

    def remove(self, names) -> list[str]:
        """Remove exactly ``names`` (each must match ``names``: a tampered manifest never names
        another file), then our temporaries, marker and lock; the directory too when that leaves it
        empty and we created it. Returns the entries left (files we did not write)."""
        marker = self.marker()
        if marker is None:
            raise StorageError(errno.EPERM, f"{self.flag} {self.path} carries no {MARKER}; kernelfit removes "
                                            f"nothing from a directory it does not own.")
        if self._key is None:
            self.claim()
        for name in names:
            if "/" in name or os.sep in name or not self.names.fullmatch(name):
                continue
            (self.path / name).unlink(missing_ok=True)
        self.clean_orphans()
        self.marker_path.unlink(missing_ok=True)
        if self._finalizer is not None:
            self._finalizer.detach()
        _release(self._key, remove_file=True)
        self._key = self._finalizer = None
        left = sorted(p.name for p in self.path.iterdir())
        if not left and marker.get("created_directory"):
            try:
                self.path.rmdir()
            except OSError:
                pass
        return left


# --------------------------------------------------------------------------------- hashed writes
class HashingWriter:
    """A write-only file wrapper that hashes what goes through it (np.save writes in chunks)."""

    def __init__(self, fh):
        self.fh = fh
        self.h = _hasher(FILE_DIGEST)
        self.nbytes = 0

    def write(self, b) -> int:
        self.h.update(b)
        self.nbytes += len(memoryview(b).cast("B"))
        return self.fh.write(b)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def save_npy(path, arr: np.ndarray, direct: bool = False) -> dict:
    """Atomically write ``arr`` as .npy; returns the manifest's record of the file:
    ``{FILE_DIGEST: hex digest of the file bytes, "bytes": size}``. ``direct``: with O_DIRECT and the
    header padded to ``directio.ALIGN`` (``directio.write_npy``) when ``arr`` sits at an aligned address
    and the file system takes it; otherwise (and always without ``direct``) numpy's buffered writer."""
    from .directio import DirectIOUnsupported, is_aligned, set_direct, write_npy

    with atomic_file(path, "wb") as f:
        if direct and is_aligned(arr):
            h = _hasher(FILE_DIGEST)
            try:
                size = write_npy(f.fileno(), arr, h)
                return {FILE_DIGEST: h.hexdigest(), "bytes": size}
            except DirectIOUnsupported:          # refused here: start the file again, buffered
                set_direct(f.fileno(), False)
                os.ftruncate(f.fileno(), 0)
                f.seek(0)
        w = HashingWriter(f)
        np.save(w, np.ascontiguousarray(arr), allow_pickle=False)
    return {FILE_DIGEST: w.hexdigest(), "bytes": w.nbytes}


# The checksum of the panel files we write and of a user's Gram file: it must catch a file changed,
# truncated or swapped since (not an attacker, who could rewrite the manifest too), and it runs on
# every panel of a disk factorization beside the GEMMs: xxh3-128 hashes ~11 GB/s on one core here,
# blake2b ~1 GB/s. Manifests written before it carry blake2b, which is still read.
FILE_DIGEST = "xxh3_128"
KNOWN_DIGESTS = (FILE_DIGEST, "blake2b")


def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.blake2b(digest_size=32) if algorithm == "blake2b" else hashlib.new(algorithm)


def recorded_digest(rec) -> tuple[str, str] | None:
    """(algorithm, hex digest) of a manifest's file record, or None when it carries no known checksum."""
    if isinstance(rec, dict):
        for algorithm in KNOWN_DIGESTS:
            if isinstance(rec.get(algorithm), str):
                return algorithm, rec[algorithm]
    return None


def matches_record(path, rec) -> bool:
    """Whether the file's bytes have the checksum its manifest record names."""
    found = recorded_digest(rec)
    return found is not None and file_digest(path, found[0]) == found[1]


def file_digest(path, algorithm: str = FILE_DIGEST) -> str:
    """Hex digest of a file's bytes, read in 16 MiB chunks (FILE_DIGEST for checkpoints and stores; the
    feature cache records sha256)."""
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- preallocation
def preallocate(fd: int, offset: int, length: int, directory, flag: str, what: str) -> None:
    """Reserve the blocks of a file about to be written through a memmap: a full disk fails here,
    with a message, instead of a SIGBUS on the first page that finds no block."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):   # a filesystem without fallocate
            check_free_space(directory, length, flag, what)
            return
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(e.errno, f"{flag} {directory}: {what} needs {format_bytes(length)} but only "
                                        f"{format_bytes(free_bytes(directory))} are free (nothing was written). Fix: free "
                                        f"space or choose a directory on a larger disk.") from None
        raise


def create_npy_memmap(path, dtype, shape, flag: str, what: str) -> np.memmap:
    """A new .npy file of ``shape`` opened as a writable memmap, its data blocks reserved first."""
    path = Path(path)
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False, "shape": tuple(int(s) for s in shape)})
        offset = f.tell()
        f.flush()
        if nbytes:
            preallocate(f.fileno(), offset, nbytes, path.parent, flag, what)
    return np.load(path, mmap_mode="r+", allow_pickle=False)
