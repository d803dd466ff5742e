"""Download of canonical files: sha256 / md5 verified, size-capped, atomic rename.

This module knows files, not dataset names: ``registry.download(name)`` hands it the files and base
URL of a named dataset (so the registry imports this module, never the reverse)."""

from __future__ import annotations

import hashlib
import http.client
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kernelfit.errors import ChecksumError, DataError, KernelfitError
from kernelfit.results import atomic_file

from .arrays import sha256_file as _sha256_file

log = logging.getLogger(__name__)

# bytes accepted for a file whose size the registry does not record (md5-only sources); with a recorded
# size, a byte past it already proves the file is not the registered one
UNKNOWN_SIZE_CAP = 1 << 30
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of a canonical source: name, size in bytes, sha256 and md5 (either may be None)."""

    filename: str
    size: int | None
    sha256: str | None
    md5: str | None


def _checksum_error(algo: str, expected: str, found: str, path: Path, url: str, nbytes: int,
                    size: int | None) -> ChecksumError:
    size_note = f"{nbytes} bytes" + (f", expected {size}" if size is not None and size != nbytes else "")
    err = ChecksumError(
        f"checksum mismatch for {path.name} from {url}: expected {algo} {expected}, found {found} "
        f"({size_note}). The download was discarded; nothing was written to {path}. Fix: retry "
        f"(the transfer may have been cut); if it persists the server sends a different file: use "
        f"--base-url with a trusted mirror, or place a verified copy at {path}."
    )
    err.algorithm, err.expected, err.found, err.path, err.url = algo, expected, found, path, url
    return err


def _verify(path: Path, rf: RemoteFile) -> bool:
    if rf.sha256:
        return _sha256_file(path) == rf.sha256
    if rf.md5:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        return h.hexdigest() == rf.md5
    return True


def _too_large(url: str, dest: Path, rf: RemoteFile, cap: int, seen: str) -> DataError:
    expected = f"the {rf.size} bytes the registry records" if rf.size is not None else f"{cap} bytes (the cap for a " \
        f"file of unrecorded size)"
    return DataError(f"{url} sends {seen}, more than {expected} for {dest.name}; the download was stopped and "
                     f"discarded, nothing was written to {dest}. The server does not serve the registered file. "
                     f"Fix: use --base-url with a trusted mirror, or place a verified copy at {dest}.")


def _fetch(url: str, dest: Path, rf: RemoteFile, timeout: float, progress: bool) -> None:
    """Stream url to dest; dest appears (atomically) only once every checksum matches. At most the
    registry's recorded size (``UNKNOWN_SIZE_CAP`` when it records none) is read: a server sending
    more cannot fill the disk."""
    sha, md5, n = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    cap = rf.size if rf.size is not None else UNKNOWN_SIZE_CAP
    bar = None
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "kernelfit-data/1"})
        with atomic_file(dest, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.strip().isdigit() else None
            if total is not None and total > cap:
                raise _too_large(url, dest, rf, cap, f"Content-Length {total}")
            if progress:
                from ..progress import progress_bar

                bar = progress_bar(total=total or rf.size, desc=dest.name, unit="B")
            # one byte past the cap is enough to know the file is wrong
            while chunk := resp.read(min(_CHUNK, cap + 1 - n)):
                if n + len(chunk) > cap:
                    raise _too_large(url, dest, rf, cap, f"more than {cap} bytes")
                out.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                n += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            # raising inside the block discards the temporary file: a mismatch never becomes dest
            if rf.sha256 and sha.hexdigest() != rf.sha256:
                raise _checksum_error("sha256", rf.sha256, sha.hexdigest(), dest, url, n, rf.size)
            if rf.md5 and md5.hexdigest() != rf.md5:
                raise _checksum_error("md5", rf.md5, md5.hexdigest(), dest, url, n, rf.size)
    except KernelfitError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = getattr(e, "reason", None) or e
        raise DataError(
            f"could not download {url}: {reason}. If this machine has no network access, download "
            f"{dest.name} elsewhere and put it in {dest.parent}; or use --base-url to point at a mirror."
        ) from e
    finally:
        if bar is not None:
            bar.close()


def fetch_files(files, base_url: str, target: Path, *, force: bool = False, timeout: float = 60.0,
                progress: bool = False) -> Path:
    """Fetch each ``RemoteFile`` of ``files`` from ``base_url`` into the directory ``target`` (created if
    needed) and return it. Files already present with the right checksum are kept unless ``force``."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {target}: {e}. Choose a writable one with "
                        f"--data-dir or KERNELFIT_DATA.") from e
    base = base_url if base_url.endswith("/") else base_url + "/"
    for rf in files:
        dest = target / rf.filename
        if dest.is_file() and not force:
            if _verify(dest, rf):
                log.info("%s already present and verified", dest)
                continue
            log.warning("%s exists but its checksum does not match; downloading it again", dest)
        url = base + rf.filename
        if rf.size is not None:
            from kernelfit.places import check_free_space

            check_free_space(target, rf.size, "--data-dir", f"downloading {rf.filename}")
        log.info("downloading %s -> %s", url, dest)
        _fetch(url, dest, rf, timeout, progress)
    return target
