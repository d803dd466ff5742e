"""Output places, checked before any work: a directory files can be created in (proved by a real
probe write), an output file that is not a directory and not overwritten unasked, enough free space."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_writable_dir", "check_output_file", "check_free_space", "free_bytes", "existing_ancestor"]

PROBE_PREFIX = ".kernelfit-probe-"


# Relative residual above which a backward-stable solve is still worth a warning: past sqrt(eps) the
def existing_ancestor(path: str | os.PathLike) -> Path:
    """The nearest existing directory at or above ``path`` (where it would be created)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(directory: str | os.PathLike, flag: str, shown: str | os.PathLike | None = None) -> Path:
    """Prove that files can be created in ``directory`` (or, when it does not exist yet, in the
    nearest existing directory above it) by creating, writing, fsyncing and deleting a probe file of
    our own naming. Raises :class:`~kernelfit.errors.InputError` naming ``flag`` otherwise; returns the
    directory probed. Catches read-only mounts, /proc, permission bits that ``os.access`` misreads
    (root), and a path component that is a file, before any heavy work."""
    from .errors import InputError

    directory = Path(directory).expanduser()
    target = existing_ancestor(directory)
    directory = shown if shown is not None else directory  # the path as the user gave it, for messages
    if not target.is_dir():
        raise InputError(f"{flag} {directory}: {target} is a file, not a directory; expected a directory "
                         f"that can hold the output. Fix: choose another path.")
    try:
        fd, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=str(target))
    except OSError as e:
        raise InputError(f"{flag} {directory}: cannot create files in {target} ({e.strerror or e}). "
                         f"Fix: choose a writable directory.") from None
    try:
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        except OSError as e:
            raise InputError(f"{flag} {directory}: cannot write to {target} ({e.strerror or e}; disk full "
                             f"or read-only?). Fix: free space or choose another directory.") from None
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    return target


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool = False,
                      example: str = "result.json") -> None:
    """Refuse an output file path before any work: a directory, an existing file without
    ``overwrite``, or a place where no file can be created (probed). Raises InputError."""
    from .errors import InputError

    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; expected a file path such as {path / example}")
    if path.exists() and not overwrite:
        raise InputError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose a new path")
    check_writable_dir(path.parent if str(path.parent) else Path("."), flag, shown=path)


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes free to an unprivileged writer on the filesystem holding ``directory`` (or its nearest
    existing ancestor)."""
    st = os.statvfs(str(existing_ancestor(directory)))
    return int(st.f_bavail) * int(st.f_frsize)


def check_free_space(directory: str | os.PathLike, needed: int, flag: str, what: str) -> None:
    """Refuse, before work, to write ``needed`` bytes of ``what`` where fewer are free."""
    from .errors import InputError

    free = free_bytes(directory)
    if needed > free:
        raise InputError(f"{flag} {directory}: {what} needs {needed / 2**30:.2f} GiB but only "
                         f"{free / 2**30:.2f} GiB are free on that filesystem. Fix: free space or choose "
                         f"a directory on a larger disk.")
