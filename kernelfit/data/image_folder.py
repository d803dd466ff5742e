"""Image folders ``train/<class>/*``, ``test/<class>/*`` (a directory or a .tar(.gz)), decoded with Pillow
and cached as .npz keyed by content."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from kernelfit.catalog import cache_root
from kernelfit.errors import DataError, InputError, KernelfitError, MemoryPlanError
from kernelfit.progress import progress_bar
from kernelfit.results import atomic_file

from .arrays import sha256_file as _sha256_file
from .bounds import memory_limit, read_npz_member
from .npz import _KERAS_KEYS

log = logging.getLogger(__name__)


_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
_CACHE_VERSION = "imgfolder-v1"
# bounds checked before an image is read or decoded (a tar member's size or a file's stat; the pixel
# size from the image header): a few-KB file can otherwise decode to gigabytes
IMAGE_FILE_MAX_BYTES = 64 * 2**20
IMAGE_MAX_PIXELS = 89_478_485   # Pillow's own MAX_IMAGE_PIXELS, as a hard limit instead of a warning


def _check_file_size(size: int, name: str) -> None:
    if size > IMAGE_FILE_MAX_BYTES:
        raise DataError(f"{name}: {size} bytes; an image file of an image folder may hold at most "
                        f"{IMAGE_FILE_MAX_BYTES} ({IMAGE_FILE_MAX_BYTES >> 20} MiB). It was not read. Fix: remove it "
                        f"(or, for genuinely huge images, save the arrays as .npy and pass --x-train/--y-train).")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _IMAGE_EXTS


def _split_parts(parts: tuple[str, ...]):
    """(prefix, split, class, file) when ``parts`` ends in train|test/<class>/<file>."""
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[:-3], parts[-3], parts[-2], parts[-1]
    return None


def _iter_image_folder(path: Path):
    """Yield (split, class, filename, bytes, display name) for every image in the folder/archive."""
    if path.is_dir():
        roots = [path] if (path / "train").is_dir() else [
            p for p in sorted(path.iterdir()) if p.is_dir() and (p / "train").is_dir()]
        if len(roots) != 1:
            raise DataError(
                f"{path}: not an image folder: expected train/<class>/<image> and "
                f"test/<class>/<image> in it (or in exactly one subdirectory); found "
                f"{'none' if not roots else [str(r) for r in roots]}."
            )
        root = roots[0]
        for split in ("train", "test"):
            sdir = root / split
            if not sdir.is_dir():
                continue
            for cdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
                for f in sorted(cdir.iterdir()):
                    if f.is_file() and _is_image_name(f.name):
                        _check_file_size(f.stat().st_size, str(f))
                        yield split, cdir.name, f.name, f.read_bytes(), str(f)
        return
    try:
        with tarfile.open(path, "r:*") as tf:
            prefix = None
            for m in tf:
                if not m.isfile():
                    continue
                sp = _split_parts(tuple(q for q in m.name.split("/") if q not in ("", ".")))
                if sp is None or not _is_image_name(sp[3]):
                    continue
                if prefix is None:
                    prefix = sp[0]
                elif sp[0] != prefix:
                    raise DataError(
                        f"{path}: image folder archive has two roots, {'/'.join(prefix) or '.'} and "
                        f"{'/'.join(sp[0]) or '.'}; expected one train/ and test/ pair."
                    )
                _check_file_size(m.size, f"{path}:{m.name}")   # from the tar header, before inflating
                yield sp[1], sp[2], sp[3], tf.extractfile(m).read(), f"{path}:{m.name}"
    except KernelfitError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the image archive (corrupt or truncated?): {e}") from e


def _decode(data: bytes, name: str, first=None):
    """Decode one image; its pixel size (from the header) is checked before any pixel is decoded:
    at most ``IMAGE_MAX_PIXELS``, and equal to the first image's (``first`` = (size, name))."""
    from PIL import Image  # Pillow comes with matplotlib / scikit-image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > IMAGE_MAX_PIXELS:
                raise DataError(f"{name}: {w} x {h} pixels by its header, more than the {IMAGE_MAX_PIXELS} an "
                                f"image of an image folder may have; not decoded (a decompression bomb, or an "
                                f"image far too large for a kernel's features). Fix: resize the images.")
            if first is not None and (w, h) != first[0]:
                raise DataError(f"{name}: image of {w} x {h} pixels but {first[1]} has {first[0][0]} x "
                                f"{first[0][1]}; all images must have the same size (resize them first).")
            im.load()
            mode = "L" if im.mode in _GRAY_MODES else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im, dtype=np.uint8)
    except KernelfitError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode image (corrupt or truncated?): {e}") from e


def _decode_image_folder(path: Path, classes):
    per_split: dict[str, dict[str, list]] = {"train": {}, "test": {}}
    budget, held = memory_limit(), 0
    # decoding 60,000 JPEGs takes tens of seconds: say so while it runs
    bar = progress_bar(total=None, desc=f"decode images ({path})", unit="img", logger="kernelfit.data")
    try:
        per_split = _decode_all(path, bar, per_split, budget, held)
    finally:
        bar.close()
    return _stack_splits(path, classes, per_split)


def _decode_all(path: Path, bar, per_split, budget: int, held: int):
    first_shape = first_name = first = None
    for split, cls, fname, data, name in _iter_image_folder(path):
        img = _decode(data, name, first)
        bar.update(1)
        if first_shape is None:
            first_shape, first_name = img.shape, name
            first = ((img.shape[1], img.shape[0]), name)
        elif img.shape != first_shape:
            if img.ndim == 2 and len(first_shape) == 3 and img.shape == first_shape[:2]:
                img = np.repeat(img[:, :, None], 3, axis=2)  # a gray image among color ones
            else:
                raise DataError(
                    f"{name}: image of shape {img.shape} but {first_name} has shape {first_shape}; "
                    f"all images must have the same size and number of channels (resize or "
                    f"convert them first)."
                )
        held += img.nbytes
        if 2 * held > budget:   # the decoded images, then their stacked copy
            raise MemoryPlanError(
                f"{path}: the decoded images reach {2 * held / 2**30:.2f} GiB (images and their stacked copy) "
                f"at {name}, more than this machine's {budget / 2**30:.2f} GiB of memory; stopped decoding. "
                f"Fix: use fewer or smaller images, or a machine with more memory.")
        per_split[split].setdefault(cls, []).append((_natural_key(fname), img))
    return per_split


def _stack_splits(path: Path, classes, per_split):
    if not per_split["train"]:
        raise DataError(f"{path}: no images found under train/<class>/ (image extensions: "
                        f"{sorted(_IMAGE_EXTS)}).")
    if not per_split["test"]:
        raise DataError(f"{path}: no images found under test/<class>/.")
    found = set(per_split["train"]) | set(per_split["test"])
    if classes is None:
        classes = tuple(sorted(per_split["train"]))
        extra = sorted(set(per_split["test"]) - set(classes))
        if extra:
            raise DataError(f"{path}: test/ has classes {extra} that train/ lacks; pass classes=... to fix the label set.")
    else:
        classes = tuple(str(c) for c in classes)
        unknown = sorted(found - set(classes))
        if unknown:
            raise DataError(f"{path}: class folders {unknown} are not among classes={list(classes)}.")
    out = []
    for split in ("train", "test"):
        groups = [sorted(per_split[split].get(c, []), key=lambda t: t[0]) for c in classes]
        # round-robin over classes (file i of every class, then file i+1, ...) so that any prefix
        # of the split is class-balanced; within a class, natural file-name order
        order = [(c, i) for i in range(max(map(len, groups))) for c in range(len(classes))
                 if i < len(groups[c])]
        x = np.stack([groups[c][i][1] for c, i in order])
        y = np.array([c for c, _ in order], dtype=np.int64)
        out += [x, y]
    return (*out, classes)


def _image_folder_key(path: Path, classes) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        content = "dir-" + h.hexdigest()
    else:
        content = _sha256_file(path)
    params = hashlib.sha256(repr((_CACHE_VERSION, None if classes is None else tuple(map(str, classes))))
                            .encode()).hexdigest()[:12]
    return f"{content}-{params}"


def _load_cache(cache_file: Path, key: str):
    try:
        with zipfile.ZipFile(cache_file) as zf:   # members sized from their headers (bounds.read_npz_member)
            def z(name):
                return read_npz_member(zf, name, cache_file)

            if str(z("key")) != key or str(z("version")) != _CACHE_VERSION:
                raise ValueError("key/version mismatch")
            x_tr, y_tr, x_te, y_te = (z(k) for k in _KERAS_KEYS)  # zip CRC checked on full read
            classes = tuple(str(c) for c in z("classes"))
        if (x_tr.dtype != np.uint8 or x_te.dtype != np.uint8 or len(x_tr) != len(y_tr)
                or len(x_te) != len(y_te) or x_tr.shape[1:] != x_te.shape[1:]
                or y_tr.min() < 0 or y_te.min() < 0 or max(y_tr.max(), y_te.max()) >= len(classes)):
            raise ValueError("inconsistent arrays")
        return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64), classes
    except Exception as e:  # noqa: BLE001 - any problem with a cache file means: rebuild it
        warnings.warn(f"kernelfit: decoded-image cache {cache_file} is unreadable ({type(e).__name__}: "
                      f"{e}); rebuilding it.", RuntimeWarning, stacklevel=3)
        return None


def _save_cache(cache_file: Path, key: str, arrays) -> None:
    x_tr, y_tr, x_te, y_te, classes = arrays
    try:
        with atomic_file(cache_file, "wb") as f:
            np.savez(f, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                     classes=np.array(classes, dtype=str), key=np.array(key),
                     version=np.array(_CACHE_VERSION))
    except OSError as e:
        warnings.warn(f"kernelfit: could not write the decoded-image cache {cache_file}: {e}. "
                      f"Set KERNELFIT_CACHE to a writable directory to speed up later loads.",
                      RuntimeWarning, stacklevel=3)


def read_image_folder(path, classes=None, *, cache: bool = True):
    """Read ``train/<class>/<image>`` and ``test/<class>/<image>`` from a directory (or its single
    subdirectory) or from a ``.tar`` / ``.tar.gz`` archive, decoding with Pillow.

    ``classes`` fixes the label order (label k = classes[k]); by default the sorted class-folder
    names of train/. Gray images give (N, H, W), color images (N, H, W, 3); all images must share
    one size. Within a split, images are ordered round-robin over classes (file i of each class,
    then file i+1, ...; files in natural name order), so any prefix is class-balanced.

    With ``cache=True`` the decoded arrays are stored as .npz under
    ``kernelfit.catalog.cache_root()/decoded/``, keyed by the archive's sha256 (for a directory: by the
    names, sizes and mtimes of its files); an unreadable cache is rebuilt.

    Returns ``(x_train, y_train, x_test, y_test, classes)``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (expected an image folder or .tar.gz).")
    if classes is not None:
        if isinstance(classes, str):
            raise InputError(f"read_image_folder: classes must be a sequence of names, got the string {classes!r}.")
        classes = tuple(str(c) for c in classes)
    cache_file = key = None
    if cache:
        key = _image_folder_key(path, classes)
        cache_file = cache_root() / "decoded" / f"{path.name}-{key}.npz"
        if cache_file.is_file():
            hit = _load_cache(cache_file, key)
            if hit is not None:
                log.info("loaded decoded images of %s from cache %s", path, cache_file)
                return hit
    log.info("decoding images of %s (cached afterwards at %s)", path, cache_file)
    arrays = _decode_image_folder(path, classes)
    if cache:
        _save_cache(cache_file, key, arrays)
    return arrays

