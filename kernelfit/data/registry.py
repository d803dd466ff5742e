"""Named datasets: what each is (files, canonical URLs, checksums, shape, classes) and how it is found.

``REGISTRY[name]`` is a ``DatasetInfo``; ``load_dataset(name, data_dir, download)`` finds its files in
the data directory (or fetches them, ``kernelfit.data.download``) and reads them with the format
modules (``idx``, ``npz``, ``cifar``, ``image_folder``). The shapes here describe the canonical
release; files of another image size are read as they are (the record states the shapes found).
"""

from __future__ import annotations

import hashlib
import struct
import tarfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from kernelfit import catalog
from kernelfit.errors import ChecksumError, DataError, InputError

from .cifar import CIFAR10_ARCHIVE, CIFAR10_BATCH_DIR, read_cifar10_batches
from .dataset import Dataset
from .download import RemoteFile, fetch_files
from .idx import read_idx
from .image_folder import read_image_folder
from .npz import _as_labels, _as_uint8_images, read_keras_npz
from .paths import _resolve_with_origin, resolve_data_dir

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
KMNIST_CLASSES: tuple[str, ...] = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: the IDX file names every MNIST-family release uses (each may also be gzipped, ``<name>.gz``)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_IDX_FILES = IDX_FILES
MNIST_NPZ = "mnist.npz"


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset.

    name         registry key (``kernelfit solve --dataset NAME``)
    title        its usual name
    format       ``"idx"`` (the four IDX files), ``"cifar10"`` (python batches or an image folder),
                 ``"shipped"`` (inside the package)
    image_shape  per-image shape of the canonical release
    classes      class names; label k is ``classes[k]``
    n_train, n_test  canonical split sizes
    base_url     canonical download location (None: nothing to download)
    files        the canonical files with their sizes and checksums
    subdirs      subdirectories of the data directory also searched (torchvision's layout included)
    """

    name: str
    title: str
    format: str
    image_shape: tuple[int, ...]
    classes: tuple[str, ...]
    n_train: int
    n_test: int
    base_url: str | None = None
    files: tuple[RemoteFile, ...] = ()
    subdirs: tuple[str, ...] = ()
    content_md5: dict[str, str] | None = None   # md5 of each uncompressed IDX file (x_train, ...)

    @property
    def dim(self) -> int:
        return int(np.prod(self.image_shape))


def _md5_only(names_md5: dict[str, str]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(n, None, None, m) for n, m in names_md5.items())


# MNIST md5: torchvision's MNIST resources; sha256 + sizes: tensorflow_datasets' url_checksums/mnist.txt.
# content_md5: md5 of the uncompressed IDX files as published with the releases (the MNIST values
# were also recomputed here from the exact MNIST pixels); a re-gzipped copy keeps them.
# Fashion-MNIST and KMNIST md5: torchvision's FashionMNIST / KMNIST resources (the files their
# authors publish). CIFAR-10 md5: https://www.cs.toronto.edu/~kriz/cifar.html; sha256: Keras.
REGISTRY: dict[str, DatasetInfo] = {
    "mnist-subset": DatasetInfo(
        "mnist-subset", "MNIST, first 5,000 train / 1,000 test images (shipped)", "shipped", (28, 28),
        MNIST_CLASSES, 5000, 1000),
    "mnist": DatasetInfo(
        "mnist", "MNIST", "idx", (28, 28), MNIST_CLASSES, 60000, 10000,
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            RemoteFile("train-images-idx3-ubyte.gz", 9912422,
                       "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                       "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", 28881,
                       "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                       "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", 1648877,
                       "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                       "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", 4542,
                       "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                       "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        ("mnist", "MNIST/raw"),
        {"x_train": "6bbc9ace898e44ae57da46a324031adb", "y_train": "a25bea736e30d166cdddb491f175f624",
         "x_test": "2646ac647ad5339dbf082846283269ea", "y_test": "27ae3e4e09519cfbb04c329615203637"}),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "Fashion-MNIST", "idx", (28, 28), FASHION_MNIST_CLASSES, 60000, 10000,
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        _md5_only({
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        }),
        ("fashion-mnist", "FashionMNIST/raw"),
        {"x_train": "f4a8712d7a061bf5bd6d2ca38dc4d50a", "y_train": "9018921c3c673c538a1fc5bad174d6f9",
         "x_test": "8181f5470baa50b63fa0f6fddb340f0a", "y_test": "15d484375f8d13e6eb1aabb0c3f46965"}),
    "kmnist": DatasetInfo(
        "kmnist", "Kuzushiji-MNIST", "idx", (28, 28), KMNIST_CLASSES, 60000, 10000,
        "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
        _md5_only({
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        }),
        ("kmnist", "KMNIST/raw")),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10", "cifar10", (32, 32, 3), CIFAR10_CLASSES, 50000, 10000,
        "https://www.cs.toronto.edu/~kriz/",
        (RemoteFile(CIFAR10_ARCHIVE, 170498071,
                    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                    "c58f30108f718f92721af3b95e74349a"),),
        ("cifar10", "cifar-10")),
}

DATASETS = tuple(REGISTRY)
if set(DATASETS) != set(catalog.DATASET_NAMES):   # the catalog's names and shapes are the one list
    raise ImportError(f"kernelfit.catalog.DATASETS {sorted(catalog.DATASET_NAMES)} and the dataset registry "
                      f"{sorted(DATASETS)} name different datasets")
IDX_DATASETS = tuple(n for n, i in REGISTRY.items() if i.format == "idx")

_FIX_HINT = (
    "Fix: pass --data-dir DIR (load_dataset(..., data_dir=DIR)) naming a directory that holds "
    "them, or set the environment variable KERNELFIT_DATA=DIR, or fetch them from the canonical "
    "source with --download (load_dataset(..., download=True) / kernelfit.data.download(name)). "
    "'mnist-subset' (5,000 train / 1,000 test MNIST images) ships with kernelfit and needs no data."
)


def normalize_name(name) -> str:
    """``"Fashion_MNIST"`` -> ``"fashion-mnist"``; unknown names raise ``InputError`` listing the known ones."""
    if not isinstance(name, str):
        raise InputError(f"dataset name must be a string, one of {DATASETS}; got {name!r}.")
    n = name.strip().lower().replace("_", "-")
    n = {"cifar-10": "cifar10", "mnistsubset": "mnist-subset", "fashionmnist": "fashion-mnist",
         "fmnist": "fashion-mnist", "kuzushiji-mnist": "kmnist"}.get(n, n)
    if n not in REGISTRY:
        raise InputError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}. For your own "
                         f"arrays use kernelfit.data.load_arrays (CLI: --data FILE.npz or --x-train FILE).")
    return n


_normalize_name = normalize_name


def _find_idx(d: Path) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for key, base in IDX_FILES.items():
        alt = base.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some unzip tools name it
        for cand in (base, base + ".gz", alt, alt + ".gz"):
            if (d / cand).is_file():
                found[key] = d / cand
                break
        else:
            missing.append(base)
    return found, missing


def _load_mnist_subset() -> Dataset:
    ref = resources.files("kernelfit").joinpath("datasets", "mnist_subset.npz")
    with resources.as_file(ref) as p:
        arrays = read_keras_npz(p)
        source = str(p)
    return _make_dataset("mnist-subset", arrays, MNIST_CLASSES, source, (source,))


def _make_dataset(name, arrays, classes, source, files=()) -> Dataset:
    x_tr, y_tr, x_te, y_te = arrays
    try:
        return Dataset(name, x_tr, y_tr, x_te, y_te, tuple(classes), str(source),
                       files=tuple(str(f) for f in files))
    except InputError as e:
        raise DataError(f"{source}: {e}") from e


def _search_dirs(name: str, root: Path) -> list[Path]:
    return [root, *(root / s for s in REGISTRY[name].subdirs)]


def _idx_md5(a: np.ndarray) -> str:
    """md5 of the uncompressed IDX file of a uint8 array (magic 0x0000080N, big-endian dims, bytes)."""
    h = hashlib.md5(struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape),
                    usedforsecurity=False)
    h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _check_not_another_dataset(name: str, found: dict[str, Path], x_train: np.ndarray) -> None:
    """The MNIST family shares its file names: refuse training images that are another dataset's."""
    digest = _idx_md5(x_train)
    for other, info in REGISTRY.items():
        if other != name and info.content_md5 and info.content_md5["x_train"] == digest:
            raise DataError(
                f"{found['x_train']}: these are {info.title}'s training images (md5 of the IDX content "
                f"{digest}), but dataset {name!r} was asked for. Fix: pass --dataset {other}, or point "
                f"--data-dir at the directory holding the {REGISTRY[name].title} files.")


def _try_idx(name: str, d: Path):
    found, missing = _find_idx(d)
    if not missing:
        arrays = {k: read_idx(f) for k, f in found.items()}
        for k, a in arrays.items():
            images = k.startswith("x")
            if (images and a.ndim not in (3, 4)) or (not images and a.ndim != 1):
                want = "(N, H, W) or (N, H, W, C) images" if images else "(N,) labels"
                raise DataError(f"{found[k]}: expected IDX {want}, found shape {a.shape}.")
            if not np.issubdtype(a.dtype, np.integer):
                raise DataError(f"{found[k]}: expected unsigned-byte IDX data, found {a.dtype}.")
        for split in ("train", "test"):
            nx, ny = len(arrays["x_" + split]), len(arrays["y_" + split])
            if nx != ny:
                raise DataError(f"{found['y_' + split]}: {ny} labels for {nx} images in "
                                f"{found['x_' + split].name}; they must match one to one.")
        if arrays["x_train"].dtype == np.uint8:
            _check_not_another_dataset(name, found, arrays["x_train"])
        x_tr = _as_uint8_images(arrays["x_train"], found["x_train"], "images")
        x_te = _as_uint8_images(arrays["x_test"], found["x_test"], "images")
        y_tr = _as_labels(arrays["y_train"], len(x_tr), found["y_train"], "labels")
        y_te = _as_labels(arrays["y_test"], len(x_te), found["y_test"], "labels")
        files = [found[k] for k in IDX_FILES]
        return _make_dataset(name, (x_tr, y_tr, x_te, y_te), REGISTRY[name].classes, d, files), None
    if name == "mnist" and (d / MNIST_NPZ).is_file():
        return _make_dataset("mnist", read_keras_npz(d / MNIST_NPZ), MNIST_CLASSES, d / MNIST_NPZ,
                             (d / MNIST_NPZ,)), None
    note = f"only {sorted(p.name for p in found.values())} of the IDX files" if found else None
    return None, note


def _tar_has_cifar_batches(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tf:
            for i, m in enumerate(tf):
                if CIFAR10_BATCH_DIR in PurePosixPath(m.name).parts or PurePosixPath(m.name).name.startswith("data_batch_"):
                    return True
                if i >= 8:
                    return False
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read archive (corrupt or truncated?): {e}") from e
    return False


def _cifar_image_folder(p: Path) -> Dataset:
    x_tr, y_tr, x_te, y_te, classes = read_image_folder(p, classes=CIFAR10_CLASSES)
    counts = np.bincount(y_tr, minlength=10)
    if (counts == 0).any():
        raise DataError(f"{p}: CIFAR-10 image folder lacks train images for classes "
                        f"{[CIFAR10_CLASSES[i] for i in np.flatnonzero(counts == 0)]}.")
    return _make_dataset("cifar10", (x_tr, y_tr, x_te, y_te), classes, p, (p,))


def _image_folder_candidates(d: Path) -> list[Path]:
    skip = {CIFAR10_ARCHIVE, "cifar-10-binary.tar.gz", CIFAR10_BATCH_DIR}
    cands = []
    for pat in ("cifar10*", "cifar-10*"):
        for p in sorted(d.glob(pat)):
            if p.name in skip or p in cands:
                continue
            archive = p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar"))
            folder = p.is_dir() and ((p / "train").is_dir() or any((q / "train").is_dir() for q in p.iterdir() if q.is_dir()))
            if archive or folder:
                cands.append(p)
    if (d / "train" / CIFAR10_CLASSES[0]).is_dir() and (d / "test").is_dir():
        cands.insert(0, d)
    return cands


def _cifar_batches(src: Path) -> Dataset:
    return _make_dataset("cifar10", read_cifar10_batches(src), CIFAR10_CLASSES, src, (src,))


def _try_cifar10(name: str, d: Path):
    if (d / CIFAR10_BATCH_DIR).is_dir() or (d / "data_batch_1").is_file():
        return _cifar_batches(d / CIFAR10_BATCH_DIR if (d / CIFAR10_BATCH_DIR).is_dir() else d), None
    if (d / CIFAR10_ARCHIVE).is_file():
        return _cifar_batches(d / CIFAR10_ARCHIVE), None
    cands = _image_folder_candidates(d)
    if cands:
        return _cifar_image_folder(cands[0]), None
    return None, None


def _load_file(name: str, p: Path) -> Dataset:
    """``data_dir`` given as a file: read it according to its format."""
    info = REGISTRY[name]
    if info.format == "idx":
        if p.suffix == ".npz":
            return _make_dataset(name, read_keras_npz(p), info.classes, p, (p,))
        raise DataError(f"{p}: for {name!r} a file path must be a Keras-layout .npz (x_train, y_train, "
                        f"x_test, y_test); for the IDX files pass the directory that holds them. For your "
                        f"own arrays drop --dataset and pass --x-train {p} --y-train LABELS.npy "
                        f"(load_arrays(x_train=..., y_train=...)).")
    if _tar_has_cifar_batches(p):
        return _cifar_batches(p)
    return _cifar_image_folder(p)


def _expected(name: str) -> str:
    info = REGISTRY[name]
    if info.format == "idx":
        npz = f" or {MNIST_NPZ} (Keras layout)" if name == "mnist" else ""
        return f"the four {info.title} IDX files {list(IDX_FILES.values())} (each plain or .gz){npz}"
    return (f"{CIFAR10_BATCH_DIR}/ or {CIFAR10_ARCHIVE} (CIFAR-10 python version), or an image "
            f"folder / archive named cifar10*.tar.gz with train/<class>/ and test/<class>/ "
            f"(e.g. cifar10-jpeg-q75.tar.gz)")


def _not_found(name: str, root: Path, origin: str, dirs, notes, extra: str = "") -> DataError:
    lines = []
    for d in dirs:
        state = "" if d.is_dir() else " (does not exist)"
        note = notes.get(d)
        lines.append(f"  {d}{state}{'; found ' + note if note else ''}")
    return DataError(
        f"dataset {name!r} not found. Expected {_expected(name)}.\n"
        f"Data directory: {root} ({origin}). Searched:\n" + "\n".join(lines) + "\n"
        + (extra + "\n" if extra else "") + _FIX_HINT
    )


def load_dataset(name: str = "mnist-subset", data_dir=None, download: bool = False) -> Dataset:
    """Load a registered dataset by name (``DATASETS``).

    ``"mnist-subset"``  the first 5,000 train / 1,000 test MNIST images, shipped with kernelfit
                        (always offline; ``data_dir`` and ``download`` are ignored)
    ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"``   the four IDX files (plain or .gz); MNIST also
                        from ``mnist.npz`` (Keras layout)
    ``"cifar10"``       ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``, else an image folder or
                        ``cifar10*.tar.gz`` with train/<class>/ (decoded once, then cached)

    The data directory comes from :func:`resolve_data_dir`; it is searched together with the
    dataset's subdirectories (``REGISTRY[name].subdirs``, e.g. ``fashion-mnist/`` and
    ``FashionMNIST/raw/``). ``data_dir`` may also name a file directly (an .npz, a CIFAR archive,
    an image-folder archive). With ``download=True`` missing files are fetched into the data
    directory. Raises ``DataError`` listing the expected files, the directories searched and how to fix it.
    """
    name = normalize_name(name)
    if name == "mnist-subset":
        return _load_mnist_subset()
    root, origin = _resolve_with_origin(data_dir)
    if root.is_file():
        return _load_file(name, root)
    dirs = _search_dirs(name, root)
    try_fn = _try_idx if REGISTRY[name].format == "idx" else _try_cifar10
    notes = {}
    for d in dirs:
        if d.is_dir():
            ds, note = try_fn(name, d)
            if ds is not None:
                return ds
            if note:
                notes[d] = note
    if not download:
        raise _not_found(name, root, origin, dirs, notes)
    try:
        target = _download(name, root)
    except ChecksumError:
        raise
    except DataError as e:
        raise _not_found(name, root, origin, dirs, notes, extra=f"Download failed: {e}") from e
    ds, _ = try_fn(name, target)
    if ds is None:
        raise _not_found(name, root, origin, dirs, notes, extra="Downloaded files were not usable.")
    return ds


#: canonical base URLs and expected files, from the registry (``download(..., base_url=...)``
#: overrides the URL for mirrors)
BASE_URLS = {n: i.base_url for n, i in REGISTRY.items() if i.base_url}
REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {n: i.files for n, i in REGISTRY.items() if i.files}


def download(name: str, data_dir=None, base_url: str | None = None, *, force: bool = False,
             timeout: float = 60.0, progress: bool = False) -> Path:
    """Download a dataset's canonical files into the data directory and return that directory.

    ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"``: the four IDX .gz files; ``"cifar10"``:
    ``cifar-10-python.tar.gz``; from ``REGISTRY[name].base_url``.
    ``base_url`` replaces the base URL (a mirror holding the same file names; ``file://`` works).
    Each file goes to a temporary file in the target directory, is checked against its sha256 and
    md5, then atomically renamed; a mismatch raises ``ChecksumError`` (attributes ``expected``,
    ``found``, ``path``, ``url``) and leaves no partial file. Files already present with the right
    checksum are not downloaded again unless ``force=True``. Network failures raise ``DataError``.
    """
    return _download(name, data_dir, base_url, force=force, timeout=timeout, progress=progress)


def _download(name, data_dir=None, base_url=None, *, force=False, timeout=60.0, progress=False) -> Path:
    name = normalize_name(name)
    if name == "mnist-subset":
        raise InputError("'mnist-subset' ships with kernelfit; there is nothing to download. "
                         "Use download('mnist') for the full MNIST.")
    base = base_url if base_url is not None else BASE_URLS[name]
    return fetch_files(REMOTE_FILES[name], base, resolve_data_dir(data_dir), force=force, timeout=timeout,
                       progress=progress)
