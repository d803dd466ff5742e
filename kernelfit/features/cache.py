"""On-disk cache of feature matrices, keyed by a hash of the data and of the feature config.

Layout under the cache root (``$KERNELFIT_CACHE`` or the user cache dir, ``~/.cache/kernelfit``,
never inside the repository)::

    features/<key>.npy        the float32 feature matrix (written block by block through a memmap)
    features/<key>.json       metadata: key, data hash, config, shape, dtype, sha256 of the .npy file
    grams/<key>.g<N>/<part>.npy  an accumulated feature Gram (``GramCache``: train panels or dense, train
                              diagonal, test x train block, test diagonal; float64), one directory per save
    grams/<key>.json          metadata: key, layout, shapes, sha256 of every part, and which g<N> is current

``features/`` and ``grams/`` are directories kernelfit owns (``kernelfit.storage``): marked, locked by
the run using them (a second run is refused with the first one's PID), cleaned of our own orphan
temporaries on the next use; a foreign non-empty directory there is refused. Memmapped files are
preallocated, so a full disk is a clear error before any byte is written, not a SIGBUS.

``key = sha256(data hash, config, format version)``. On every load the metadata must match the key,
the shape and the dtype, and the sha256 of the .npy bytes must match the one recorded when it was
written. Anything else (stale, truncated, corrupt, half-written) is reported with a warning, deleted and
rebuilt: a cache entry is never silently reused unless its content hash checks out.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..catalog import cache_root
from ..errors import InputError
from ..results import atomic_file
from ..storage import OwnedDir, StorageError, create_npy_memmap, file_digest

__all__ = ["FeatureCache", "GramCache", "hash_array", "config_hash", "cached_transform",
           "StaleCacheWarning"]

FORMAT_VERSION = 1


class StaleCacheWarning(UserWarning):
    """A cache entry was stale or corrupt and has been rebuilt."""


def hash_array(x: np.ndarray, chunk_rows: int = 4096) -> str:
    """sha256 of an array's dtype, shape and bytes (streamed by rows, so memmaps are fine)."""
    x = np.asarray(x)
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}|{x.shape}".encode())
    if x.ndim == 0:
        h.update(x.tobytes())
        return h.hexdigest()
    for start in range(0, x.shape[0], chunk_rows):
        h.update(np.ascontiguousarray(x[start : start + chunk_rows]).tobytes())
    return h.hexdigest()


def config_hash(config: Any) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else config
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


_KEY = r"[0-9a-f]{32}"


def _write_failed(e: OSError, what: str, directory: Path, kept: str) -> StorageError:
    return StorageError(e.errno or errno.EIO, f"could not write {what} in {directory} ({e.strerror or e}). {kept} "
                                              f"Fix: free space, or choose another --cache-dir.")


class FeatureCache:
    """A directory of feature matrices keyed by (data hash, config)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else cache_root()
        self.dir = self.root / "features"
        # ours: <key>.npy / <key>.json; temporaries: .<key>.npy.XXXXXXXX.tmp (and <key>.tmp<pid>.npy of
        # kernelfit before markers, whose orphan filled the disk for the next run)
        self.owned = OwnedDir(self.dir, "feature cache", "--cache-dir", rf"{_KEY}\.(?:npy|json)", adopt=True,
                              temporaries=rf"{_KEY}\.tmp\d+\.npy")

    def claim(self) -> "FeatureCache":
        """Mark and lock the directory for this run (done by every load / build that finds or makes it)."""
        self.owned.claim()
        return self

    def close(self) -> None:
        self.owned.release()

    def key(self, data_hash: str, config: Any) -> str:
        payload = json.dumps({"data": data_hash, "config": config_hash(config), "v": FORMAT_VERSION})
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npy", self.dir / f"{key}.json"

    def load(self, key: str, shape: tuple[int, ...] | None = None, mmap: bool = True
             ) -> np.ndarray | None:
        """The cached matrix, or None when absent. Stale or corrupt entries are deleted (with a
        ``StaleCacheWarning``) and None is returned, so the caller rebuilds."""
        if not self.dir.is_dir():
            return None
        self.claim()
        npy, meta_path = self.paths(key)
        if not npy.exists() and not meta_path.exists():
            return None
        problem = None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
                problem = "metadata key/version mismatch"
            elif shape is not None and tuple(meta["shape"]) != tuple(shape):
                problem = f"shape {tuple(meta['shape'])} != expected {tuple(shape)}"
            elif file_digest(npy, "sha256") != meta["sha256"]:
                problem = "content hash mismatch (file modified or truncated)"
            else:
                arr = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
                if tuple(arr.shape) != tuple(meta["shape"]) or arr.dtype.str != meta["dtype"]:
                    problem = "array header does not match metadata"
                else:
                    return arr
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        warnings.warn(f"feature cache entry {key} in {self.dir} is stale or corrupt ({problem}); "
                      f"deleting and rebuilding it.", StaleCacheWarning, stacklevel=2)
        self.delete(key)
        return None

    def delete(self, key: str) -> None:
        for p in self.paths(key):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def build(self, key: str, shape: tuple[int, int], fill: Callable[[np.ndarray], None],
              meta_extra: dict | None = None) -> np.ndarray:
        """Create the entry: ``fill(memmap)`` writes the rows; then hash and publish atomically.
        The file's blocks are reserved first: a full disk is a StorageError before ``fill`` runs."""
        self.claim()
        npy, meta_path = self.paths(key)
        fd, name = tempfile.mkstemp(prefix=f".{npy.name}.", suffix=".tmp", dir=self.dir)
        os.close(fd)
        tmp = Path(name)
        try:
            mm = create_npy_memmap(tmp, np.float32, shape, "--cache-dir", f"the feature cache entry {key}")
            fill(mm)
            mm.flush()
            del mm
            digest = file_digest(tmp, "sha256")
            meta = {"key": key, "version": FORMAT_VERSION, "shape": list(shape),
                    "dtype": np.dtype(np.float32).str, "sha256": digest, **(meta_extra or {})}
            os.replace(tmp, npy)
            with atomic_file(meta_path, "w") as f:
                json.dump(meta, f, indent=1, default=str)
        except StorageError:
            tmp.unlink(missing_ok=True)
            raise
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_failed(e, f"the feature cache entry {key}", self.dir,
                                "Nothing of it was kept; the other cache entries are untouched.") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return np.load(npy, mmap_mode="r", allow_pickle=False)


def cached_transform(feature_map, images, cache: FeatureCache | str | None = None,
                     block_size: int = 1024, data_hash: str | None = None) -> np.ndarray:
    """``feature_map.transform(images)`` through the disk cache (read-only memmap result).

    ``feature_map`` needs ``.config`` (with ``to_dict``), ``.n_features(h, w)`` and
    ``.iter_blocks(images, block_size)``. The key hashes the images' bytes (or ``data_hash`` when the
    caller already has one) and the config, so changing either gives a new entry.
    """
    if not isinstance(cache, FeatureCache):
        cache = FeatureCache(cache)
    x = np.asarray(images)
    if x.ndim < 3:
        raise InputError(f"cached_transform expects a batch of images (N, H, W[, C]); got shape {x.shape}.")
    dh = data_hash or hash_array(x)
    key = cache.key(dh, feature_map.config)
    shape = (x.shape[0], feature_map.n_features(x.shape[1], x.shape[2]))
    hit = cache.load(key, shape=shape)
    if hit is not None:
        return hit

    def fill(mm):
        for sl, block in feature_map.iter_blocks(x, block_size=block_size):
            mm[sl] = block

    return cache.build(key, shape, fill, meta_extra={"data_hash": dh,
                                                     "config": feature_map.config.to_dict()})


class GramCache:
    """Accumulated feature Grams (``features.randconv.GramBlocks``) on disk, so an hour of feature and
    Gram work survives a crash in the solve and a bandwidth change reuses it. Same rules as
    ``FeatureCache``: every part's sha256 is checked on load; stale or corrupt entries are deleted with a
    ``StaleCacheWarning`` and rebuilt. Checkpoints of an unfinished accumulation (``filters_done`` set)
    are entries too, replaced by the next one as one atomic set: the parts go into a new directory
    ``<key>.g<N>``, and replacing ``<key>.json`` (which names it) is the commit. A kill at any moment
    leaves the previous entry whole; the unfinished directory is an orphan, removed on the next use."""

    PARTS = ("train", "train_diag", "cross", "test_diag")

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else cache_root()
        self.dir = self.root / "grams"
        parts = "|".join(self.PARTS)
        self.owned = OwnedDir(self.dir, "Gram cache", "--cache-dir",
                              rf"{_KEY}\.json|{_KEY}\.g\d+|{_KEY}\.(?:{parts})\.npy", adopt=True,
                              temporaries=rf"{_KEY}\.(?:{parts})\.tmp\d+\.npy")
        self._gen = re.compile(rf"({_KEY})\.g(\d+)")
        self._part_name = re.compile(rf"(?:{parts})\.npy")

    def claim(self) -> "GramCache":
        """Mark and lock the directory for this run; remove generation directories no entry names."""
        first = self.owned._key is None
        self.owned.claim()
        if first:
            for d in self.dir.iterdir():
                m = self._gen.fullmatch(d.name)
                if m and d.is_dir() and self._current(m.group(1)) != d.name:
                    self._remove_generation(d)
        return self

    def close(self) -> None:
        self.owned.release()

    def key(self, description: dict) -> str:
        payload = json.dumps({"gram": description, "v": FORMAT_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _meta(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def _current(self, key: str) -> str | None:
        try:
            d = json.loads(self._meta(key).read_text()).get("dir")
        except (OSError, ValueError, AttributeError):
            return None
        return d if isinstance(d, str) and self._gen.fullmatch(d) else None

    def _part(self, key: str, name: str, meta: dict | None = None) -> Path:
        if meta is not None and meta.get("dir"):
            return self.dir / meta["dir"] / f"{name}.npy"
        return self.dir / f"{key}.{name}.npy"   # entries written before generation directories

    def _remove_generation(self, d: Path) -> None:
        """Our part files, then the directory if that empties it (anything else in it stays)."""
        for f in d.iterdir():
            if self._part_name.fullmatch(f.name) and f.is_file():
                f.unlink()
        try:
            d.rmdir()
        except OSError:
            pass

    def delete(self, key: str) -> None:
        self.claim()
        self._meta(key).unlink(missing_ok=True)
        for name in self.PARTS:
            self._part(key, name).unlink(missing_ok=True)
        for d in self.dir.glob(f"{key}.g*"):
            if self._gen.fullmatch(d.name) and d.is_dir():
                self._remove_generation(d)

    def save(self, key: str, g, meta_extra: dict | None = None) -> Path:
        """Write ``g`` (GramBlocks; panel storage is written as its panels one after another)."""
        self.claim()
        panels = not isinstance(g.train, np.ndarray)
        parts = {"train": g.train.panels if panels else [g.train], "train_diag": [g.train_diag],
                 "cross": [g.cross], "test_diag": [g.test_diag]}
        current = self._current(key)
        gen = 1 + max([int(self._gen.fullmatch(d.name).group(2)) for d in self.dir.glob(f"{key}.g*")
                       if self._gen.fullmatch(d.name)] or [0])
        new = self.dir / f"{key}.g{gen}"
        try:
            new.mkdir()
            files = {}
            for name, arrays in parts.items():
                if arrays[0] is None:
                    continue
                path = new / f"{name}.npy"
                total = sum(a.size for a in arrays)
                mm = create_npy_memmap(path, np.float64, (total,), "--cache-dir",
                                       f"the Gram cache entry {key} ({name})")
                pos = 0
                for a in arrays:
                    mm[pos : pos + a.size] = a.ravel()
                    pos += a.size
                mm.flush()
                del mm
                files[name] = {"sha256": file_digest(path, "sha256"), "shape": list(arrays[0].shape) if len(arrays) == 1
                               else [total]}
            meta = {"key": key, "version": FORMAT_VERSION, "dir": new.name, "layout": "panels" if panels else "dense",
                    "n": int(len(g.train_diag)), "block": int(g.train.block) if panels else None,
                    "n_features": int(g.n_features), "filters_done": g.filters_done, "files": files,
                    **(meta_extra or {})}
            with atomic_file(self._meta(key), "w") as f:   # the commit: the new set replaces the old at once
                json.dump(meta, f, indent=1, default=str)
        except BaseException as e:
            if new.is_dir():
                self._remove_generation(new)
            if isinstance(e, OSError) and not isinstance(e, StorageError):
                kept = ("The previous entry (an earlier checkpoint, if any) is kept whole; a rerun continues "
                        "from it.")
                raise _write_failed(e, f"the Gram cache entry {key}", self.dir, kept) from None
            raise
        if current is not None and current != new.name:
            self._remove_generation(self.dir / current)
        for name in self.PARTS:     # an entry of the flat layout it replaces
            self._part(key, name).unlink(missing_ok=True)
        return self._meta(key)

    def load(self, key: str):
        """The cached ``GramBlocks`` (in memory, writable), or None when absent or stale (then deleted)."""
        from ..linalg.panels import SymmetricPanels
        from .randconv import GramBlocks

        if not self.dir.is_dir():
            return None
        self.claim()
        if not self._meta(key).exists() and not self._part(key, "train").exists():
            return None
        problem = None
        try:
            meta = json.loads(self._meta(key).read_text())
            if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
                problem = "metadata key/version mismatch"
            elif meta.get("dir") is not None and not (isinstance(meta["dir"], str)
                                                      and self._gen.fullmatch(meta["dir"])):
                problem = f"metadata names a directory {meta['dir']!r} that is not one of ours"
            else:
                arrays = {}
                for name, info in meta["files"].items():
                    if name not in self.PARTS:
                        problem = f"metadata lists an unknown part {name!r}"
                        break
                    path = self._part(key, name, meta)
                    if file_digest(path, "sha256") != info["sha256"]:
                        problem = f"content hash mismatch in {path.name} (file modified or truncated)"
                        break
                    arrays[name] = np.load(path, allow_pickle=False).reshape(info["shape"])
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            if meta["layout"] == "panels":
                flat, panels, pos = arrays["train"], [], 0
                n, block = meta["n"], meta["block"]
                for s0 in SymmetricPanels.starts_for(n, block):
                    shape = (n - s0, min(block, n - s0))
                    size = shape[0] * shape[1]
                    panels.append(flat[pos : pos + size].reshape(shape))
                    pos += size
                train = SymmetricPanels(n=n, block=block, panels=panels)
            else:
                train = arrays["train"]
            return GramBlocks(train=train, train_diag=arrays["train_diag"], cross=arrays.get("cross"),
                              test_diag=arrays.get("test_diag"), n_features=meta["n_features"],
                              filters_done=meta.get("filters_done"))
        warnings.warn(f"Gram cache entry {key} in {self.dir} is stale or corrupt ({problem}); deleting and "
                      f"rebuilding it.", StaleCacheWarning, stacklevel=2)
        self.delete(key)
        return None
