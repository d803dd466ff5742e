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
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from kernelfit.errors import DataError, InputError

from .bounds import npz_members, read_npz_member

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
        return _open_npz_member(s, what)
    if kind == "hdf5":
        return _open_hdf5(s, what)
    _check_store_inside(s.path, what)
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


def _open_npz_member(s: ArraySpec, what: str) -> np.ndarray:
    # read through bounds.read_npz_member: size and dtype from the member's .npy header before inflating
    try:
        with zipfile.ZipFile(s.path) as zf:
            names = list(npz_members(zf))
            member = s.member
            if not member:
                if len(names) != 1:
                    raise InputError(f"{what}: {s.path} holds several arrays ({_members_hint(names)}); "
                                     f"name one as {s.path}:NAME.")
                member = names[0]
            if member not in names:
                raise InputError(f"{what}: {s.path} has no array {member!r}; it holds {_members_hint(names)}.")
            return read_npz_member(zf, member, f"{what} {s.path}")
    except (zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{what}: {s.path} is not a readable .npz archive (corrupt or truncated?): {e}") from None


def _hdf5_refusal(f, member: str, h5py) -> str | None:
    """Why reading dataset ``member`` of the open file ``f`` would read another file, or None.

    External links and soft links are resolved one path component at a time (an external link names
    another file; a soft link may lead to one); the dataset itself must keep its bytes in this file
    (no external raw storage, no virtual dataset mapping other files' datasets).
    """
    parts = [p for p in member.split("/") if p]
    path, hops = "", 0
    while parts:
        name = parts.pop(0)
        group = f[path or "/"]
        if not isinstance(group, h5py.Group):
            return None
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            return f"{path}/{name} is an external link to {link.filename}:{link.path}"
        if isinstance(link, h5py.SoftLink):
            hops += 1
            if hops > 32:
                return f"{path}/{name}: soft links nest more than 32 deep (a cycle?)"
            target = link.path
            parts = [p for p in target.split("/") if p] + parts
            path = "" if target.startswith("/") else path
            continue
        if link is None:
            return None    # no such member: the caller says what the file holds
        if not isinstance(link, h5py.HardLink):
            return f"{path}/{name} is a {type(link).__name__} (a user-defined link)"
        path = f"{path}/{name}"
    obj = f[path or "/"]
    if not isinstance(obj, h5py.Dataset):
        return None
    if obj.is_virtual:
        sources = sorted({src.file_name for src in obj.virtual_sources()})
        return f"{path} is a virtual dataset mapping data from {', '.join(sources) or 'other datasets'}"
    if obj.external:
        files = sorted({str(e[0]) for e in obj.external})
        return f"{path} keeps its raw data in external file(s) {', '.join(files)}"
    return None


def _open_hdf5(s: ArraySpec, what: str):
    h5py = _require("h5py", "hdf5")
    f = h5py.File(s.path, "r")
    try:
        datasets = []
        f.visititems(lambda name, obj: datasets.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        member = s.member
        if member is None:
            if len(datasets) != 1:
                raise InputError(f"{what}: {s.path} holds {len(datasets)} datasets "
                                 f"({_members_hint(datasets)}); name one as {s.path}:/NAME.")
            member = datasets[0]
        why = _hdf5_refusal(f, member, h5py)   # before `member in f`, which would follow an external link
        if why is not None:
            raise DataError(f"{what}: {s.path}:{member} refused: {why}. Reading it would read a file other than "
                            f"the one given (local file disclosure), so kernelfit reads only datasets stored "
                            f"inside the file. Fix: copy the data into a regular dataset, e.g. "
                            f"h5py: f2.create_dataset(name, data=f[name][...]).")
        if member not in f or not isinstance(f[member], h5py.Dataset):
            raise InputError(f"{what}: {s.path} has no dataset {member!r}; it holds {_members_hint(datasets)}.")
        return f[member]
    except BaseException:
        f.close()
        raise


def _check_store_inside(root: Path, what: str) -> None:
    """Refuse a directory store holding a symlink that resolves outside it (it would read that file)."""
    top = root.resolve()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                target = p.resolve()
                if target != top and top not in target.parents:
                    raise DataError(
                        f"{what}: {root} holds {p.relative_to(top)}, a symbolic link to {target} outside the store; "
                        f"reading it would read a file other than the store given (local file disclosure). "
                        f"Fix: replace the link by a copy of the data inside the store.")


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
