"""Array files a user brings: ``.npy`` (memory-mapped), ``.npz`` members, HDF5 and zarr datasets.

One place that turns an array *spec* into an array-like that supports ``shape``, ``dtype``, ``ndim``
and slicing, without reading it whole:

``open_array("X.npy")``                  ``np.load(mmap_mode="r")``: a read-only memory map
``open_array("data.npz:x_train")``       one member of an .npz (read into memory: npz members are
                                         zip entries and cannot be memory-mapped)
``open_array("file.h5:/group/dset")``    an ``h5py.Dataset`` (optional extra ``kernelfit[hdf5]``)
``open_array("store.zarr:/array")``      a ``zarr.Array`` (optional extra ``kernelfit[zarr]``)

HDF5 and zarr handles stay open as long as the returned object lives. ``sha256_file`` digests a
file (or every file of a zarr directory store, in sorted order) for provenance records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from kernelfit.errors import DataError, InputError

__all__ = ["ArraySpec", "open_array", "parse_spec", "sha256_file"]

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
_ZARR_SUFFIXES = (".zarr",)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class ArraySpec:
    """``path[:member]`` parsed: the file or store, and the dataset / member inside it (or None)."""

    def __init__(self, path: Path, member: str | None, text: str):
        self.path, self.member, self.text = path, member, text

    def __repr__(self) -> str:
        return f"ArraySpec({self.text!r})"


def parse_spec(text) -> ArraySpec:
    """Split ``"FILE.h5:/dset"`` into the file and the member; a plain path has no member.

    The split is at the last ``:`` that follows a known container suffix (.h5/.hdf5/.zarr/.npz), so
    Windows drive letters and colons elsewhere in a path are left alone.
    """
    text = str(text)
    lowered = text.lower()
    for suffix in (*_HDF5_SUFFIXES, *_ZARR_SUFFIXES, ".npz"):
        i = lowered.rfind(suffix + ":")
        if i >= 0:
            cut = i + len(suffix)
            member = text[cut + 1:]
            return ArraySpec(Path(text[:cut]), member or None, text)
    return ArraySpec(Path(text), None, text)


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError:
        return b""


def _kind(path: Path) -> str:
    if path.is_dir():
        if path.suffix.lower() in _ZARR_SUFFIXES or (path / ".zgroup").exists() or (path / ".zarray").exists() \
                or (path / "zarr.json").exists():
            return "zarr"
        raise DataError(
            f"{path} is a directory, expected an array file (.npy, .npz, .h5) or a zarr store "
            f"(a directory with zarr.json / .zarray). Fix: name the file, or the store as STORE.zarr:/array."
        )
    head = _magic(path)
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    suffix = path.suffix.lower()
    raise DataError(
        f"{path}: format not recognised (first bytes {head!r}, suffix {suffix!r}). Expected a .npy "
        f"file (magic \\x93NUMPY), an .npz archive (PK zip), an HDF5 file (\\x89HDF) or a zarr store. "
        f"Fix: save the array with numpy.save / numpy.savez, h5py or zarr."
    )


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise InputError(
            f"reading this file needs the optional package {module!r}, which is not installed ({exc}). "
            f"Fix: pip install 'kernelfit[{extra}]' (or pip install {module})."
        ) from None


def _members_hint(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return shown or "(none)"


def open_array(spec, *, what: str = "array"):
    """Open ``spec`` (see the module docstring) without reading it into memory where the format
    allows. ``what`` names the array in error messages (e.g. ``"--x-train"``)."""
    s = spec if isinstance(spec, ArraySpec) else parse_spec(spec)
    if not s.path.exists():
        raise DataError(f"{what}: {s.path} does not exist. Fix: check the path.")
    kind = _kind(s.path)
    if kind == "npy":
        if s.member:
            raise InputError(f"{what}: {s.path} is a .npy file with one array; drop ':{s.member}'.")
        try:
            return np.load(s.path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{what}: {s.path} could not be memory-mapped ({exc}). Object arrays are "
                            f"not supported; save a numeric array.") from None
    if kind == "npz":
        with np.load(s.path, allow_pickle=False) as z:
            if not s.member:
                if len(z.files) == 1:
                    return z[z.files[0]]
                raise InputError(f"{what}: {s.path} holds several arrays ({_members_hint(z.files)}); "
                                 f"name one as {s.path}:NAME.")
            if s.member not in z.files:
                raise InputError(f"{what}: {s.path} has no array {s.member!r}; it holds "
                                 f"{_members_hint(z.files)}.")
            return z[s.member]
    if kind == "hdf5":
        h5py = _require("h5py", "hdf5")
        f = h5py.File(s.path, "r")
        datasets = []
        f.visititems(lambda name, obj: datasets.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        member = s.member
        if member is None:
            if len(datasets) != 1:
                f.close()
                raise InputError(f"{what}: {s.path} holds {len(datasets)} datasets "
                                 f"({_members_hint(datasets)}); name one as {s.path}:/NAME.")
            member = datasets[0]
        if member not in f or not isinstance(f[member], h5py.Dataset):
            f.close()
            raise InputError(f"{what}: {s.path} has no dataset {member!r}; it holds {_members_hint(datasets)}.")
        return f[member]
    zarr = _require("zarr", "zarr")
    node = zarr.open(str(s.path), mode="r")
    if s.member and s.member.strip("/"):
        try:
            node = node[s.member.strip("/")]
        except KeyError:
            names = list(node.array_keys()) if hasattr(node, "array_keys") else []
            raise InputError(f"{what}: zarr store {s.path} has no array {s.member!r}; it holds "
                             f"{_members_hint(names)}.") from None
    if not hasattr(node, "dtype"):
        names = list(node.array_keys()) if hasattr(node, "array_keys") else []
        raise InputError(f"{what}: {s.path} is a zarr group; name an array in it as {s.path}:/NAME "
                         f"(it holds {_members_hint(names)}).")
    return node


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory store's files (relative names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()
