"""On-disk cache of feature matrices, keyed by a hash of the data and of the feature config.

Layout under the cache root (``$KERNELFIT_CACHE`` or the user cache dir, ``~/.cache/kernelfit``,
never inside the repository)::

    features/<key>.npy        the float32 feature matrix (written block by block through a memmap)
    features/<key>.json       metadata: key, data hash, config, shape, dtype, sha256 of the .npy file

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

__all__ = ["FeatureCache", "default_cache_dir", "hash_array", "config_hash", "cached_transform",
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
