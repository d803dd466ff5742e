"""On-disk cache of feature matrices, keyed by a hash of the data and of the feature config.

Layout under the cache root (``$KERNELFIT_CACHE`` or the user cache dir, ``~/.cache/kernelfit``,
never inside the repository)::

    features/<key>.npy        the float32 feature matrix (written block by block through a memmap)
    features/<key>.json       metadata: key, data hash, config, shape, dtype, sha256 of the .npy file
    grams/<key>.<part>.npy    an accumulated feature Gram (``GramCache``: train panels or dense, train
                              diagonal, test x train block, test diagonal; float64)
    grams/<key>.json          metadata: key, layout, shapes, sha256 of every part

``key = sha256(data hash, config, format version)``. On every load the metadata must match the key,
the shape and the dtype, and the sha256 of the .npy bytes must match the one recorded when it was
written. Anything else (stale, truncated, corrupt, half-written) is reported with a warning, deleted and
rebuilt: a cache entry is never silently reused unless its content hash checks out.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..results import atomic_file

__all__ = ["FeatureCache", "GramCache", "default_cache_dir", "hash_array", "config_hash", "cached_transform",
           "StaleCacheWarning"]

FORMAT_VERSION = 1


class StaleCacheWarning(UserWarning):
    """A cache entry was stale or corrupt and has been rebuilt."""


def default_cache_dir() -> Path:
    env = os.environ.get("KERNELFIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kernelfit"


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureCache:
    """A directory of feature matrices keyed by (data hash, config)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.dir = self.root / "features"

    def key(self, data_hash: str, config: Any) -> str:
        payload = json.dumps({"data": data_hash, "config": config_hash(config), "v": FORMAT_VERSION})
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npy", self.dir / f"{key}.json"

    def load(self, key: str, shape: tuple[int, ...] | None = None, mmap: bool = True
             ) -> np.ndarray | None:
        """The cached matrix, or None when absent. Stale or corrupt entries are deleted (with a
        ``StaleCacheWarning``) and None is returned, so the caller rebuilds."""
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
            elif _file_sha256(npy) != meta["sha256"]:
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
        """Create the entry: ``fill(memmap)`` writes the rows; then hash and publish atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        npy, meta_path = self.paths(key)
        tmp = npy.with_suffix(f".tmp{os.getpid()}.npy")
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(shape))
        try:
            fill(mm)
            mm.flush()
            del mm
            digest = _file_sha256(tmp)
            os.replace(tmp, npy)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        meta = {"key": key, "version": FORMAT_VERSION, "shape": list(shape),
                "dtype": np.dtype(np.float32).str, "sha256": digest, **(meta_extra or {})}
        with atomic_file(meta_path, "w") as f:
            json.dump(meta, f, indent=1, default=str)
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
    are entries too, overwritten by the next one; a crash in the middle of such a rewrite leaves an entry
    that fails its hash check, so it is rebuilt, never mixed."""

    PARTS = ("train", "train_diag", "cross", "test_diag")

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.dir = self.root / "grams"

    def key(self, description: dict) -> str:
        payload = json.dumps({"gram": description, "v": FORMAT_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _part(self, key: str, name: str) -> Path:
        return self.dir / f"{key}.{name}.npy"

    def _meta(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def delete(self, key: str) -> None:
        for p in [self._meta(key)] + [self._part(key, n) for n in self.PARTS]:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def save(self, key: str, g, meta_extra: dict | None = None) -> Path:
        """Write ``g`` (GramBlocks; panel storage is written as its panels one after another)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        panels = not isinstance(g.train, np.ndarray)
        parts = {"train": g.train.panels if panels else [g.train], "train_diag": [g.train_diag],
                 "cross": [g.cross], "test_diag": [g.test_diag]}
        files = {}
        for name, arrays in parts.items():
            if arrays[0] is None:
                continue
            path = self._part(key, name)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            total = sum(a.size for a in arrays)
            try:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(total,))
                pos = 0
                for a in arrays:
                    mm[pos : pos + a.size] = a.ravel()
                    pos += a.size
                mm.flush()
                del mm
                files[name] = {"sha256": _file_sha256(tmp), "shape": list(arrays[0].shape) if len(arrays) == 1
                               else [total]}
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        meta = {"key": key, "version": FORMAT_VERSION, "layout": "panels" if panels else "dense",
                "n": int(len(g.train_diag)), "block": int(g.train.block) if panels else None,
                "n_features": int(g.n_features), "filters_done": g.filters_done, "files": files,
                **(meta_extra or {})}
        with atomic_file(self._meta(key), "w") as f:
            json.dump(meta, f, indent=1, default=str)
        return self._meta(key)

    def load(self, key: str):
        """The cached ``GramBlocks`` (in memory, writable), or None when absent or stale (then deleted)."""
        from ..linalg.tiled import SymmetricPanels
        from .randconv import GramBlocks

        if not self._meta(key).exists() and not self._part(key, "train").exists():
            return None
        problem = None
        try:
            meta = json.loads(self._meta(key).read_text())
            if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
                problem = "metadata key/version mismatch"
            else:
                arrays = {}
                for name, info in meta["files"].items():
                    path = self._part(key, name)
                    if _file_sha256(path) != info["sha256"]:
                        problem = f"content hash mismatch in {path.name} (file modified or truncated)"
                        break
                    arrays[name] = np.load(path, allow_pickle=False).reshape(info["shape"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
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
