"""``kernelfit data``: where data is looked for (``path``), what is found (``info``), ``download``.

MNIST, Fashion-MNIST and KMNIST publish files under the same four names, so ``info`` cannot attribute
IDX files by name: it identifies the training images by checksum (the published file's md5, else the
md5 of the uncompressed IDX content, as the loader does) and lists them only under their own dataset.
"""

from __future__ import annotations

from pathlib import Path

from ..catalog import DATASET_NAMES
from ..errors import KernelfitError
from .args import EXIT_OK, add_common, dataset, eprint, refuse
from .output import print_json


def register(sub) -> None:
    d = sub.add_parser("data", help="where data is looked for, what is found, downloads")
    dsub = d.add_subparsers(dest="data_command", metavar="{info,path,download}")
    dsub.required = True
    di = dsub.add_parser("info", help="the data directory and the datasets found in it")
    di.add_argument("--data-dir", default=None, metavar="DIR")
    di.add_argument("--load", action="store_true",
                    help="also load each dataset found and report its shapes (slow for an "
                         "undecoded CIFAR-10 image folder)")
    add_common(di)
    dp = dsub.add_parser("path", help="print the resolved data directory")
    dp.add_argument("--data-dir", default=None, metavar="DIR")
    add_common(dp, threads=False)
    dd = dsub.add_parser("download", help="download a dataset with checksum verification")
    dd.add_argument("dataset", type=dataset, metavar="NAME", help="mnist, fashion-mnist, kmnist or cifar10")
    dd.add_argument("--data-dir", default=None, metavar="DIR")
    dd.add_argument("--base-url", default=None, metavar="URL", help="mirror with the same file names")
    dd.add_argument("--force", action="store_true", help="download again even if verified files exist")
    add_common(dd, threads=False)
    for q, run in ((di, _info), (dp, _path), (dd, _download)):
        q.set_defaults(run=run)


def _md5(path: Path, opener=open) -> str:
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    with opener(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _idx_owner(train_images: Path, cache: dict) -> str | None:
    """The registered dataset whose training images these are, or None when no checksum says so."""
    if train_images in cache:
        return cache[train_images]
    from ..data import REGISTRY

    owner = None
    file_md5 = _md5(train_images)
    for name, info in REGISTRY.items():
        if any(rf.filename == train_images.name and rf.md5 == file_md5 for rf in info.files):
            owner = name
    if owner is None:   # a re-compressed or unpacked copy: the content's md5
        with open(train_images, "rb") as fh:
            packed = fh.read(2) == b"\x1f\x8b"
        import gzip

        content = _md5(train_images, gzip.open if packed else open)
        owner = next((name for name, info in REGISTRY.items()
                      if info.content_md5 and info.content_md5["x_train"] == content), None)
    cache[train_images] = owner
    return owner


def _idx_files(name: str, d: Path, cache: dict) -> list[str]:
    """The IDX files in ``d`` the loader would take for ``name`` (not another family member's)."""
    from ..data import MNIST_NPZ
    from ..data.registry import _find_idx

    found, _ = _find_idx(d)
    owner = _idx_owner(found["x_train"], cache) if "x_train" in found else None
    files = [] if owner not in (None, name) else [str(p) for p in found.values()]
    if name == "mnist" and (d / MNIST_NPZ).is_file():
        files.append(str(d / MNIST_NPZ))
    return files


def _found_files(name: str, root: Path, cache: dict) -> list[str]:
    """Candidate files for a dataset under the data directory, found without decoding them."""
    from .. import data
    from ..data.registry import _image_folder_candidates, _search_dirs

    found: list[str] = []
    for d in _search_dirs(name, root):   # the loader's own search order, so that info and load agree
        if not d.is_dir():
            continue
        if name in data.IDX_DATASETS:
            found += _idx_files(name, d, cache)
            continue
        found += [str(c) for c in (d / data.CIFAR10_BATCH_DIR, d / data.CIFAR10_ARCHIVE) if c.exists()]
        try:
            found.extend(str(p) for p in _image_folder_candidates(d))
        except OSError:
            pass
    return found


def _path(args) -> int:
    from ..data.paths import _resolve_with_origin

    root, origin = _resolve_with_origin(args.data_dir)
    print(root)
    eprint(f"({origin}; exists: {root.exists()})")
    return EXIT_OK


def _download(args) -> int:
    from .. import data

    if args.dataset in (None, "mnist-subset"):
        refuse(args, "mnist-subset ships with kernelfit; nothing to download (use 'mnist')")
    path = data.download(args.dataset, args.data_dir, base_url=args.base_url, force=args.force, progress=True)
    eprint(f"{args.dataset}: files verified in {path}")
    print(path)
    return EXIT_OK


def _info(args) -> int:
    from .. import data
    from ..data.paths import _resolve_with_origin

    root, origin = _resolve_with_origin(args.data_dir)
    info = {"data_dir": str(root), "origin": origin, "exists": root.exists(), "datasets": {}}
    cache: dict = {}
    for name in DATASET_NAMES:
        entry: dict = {}
        if name == "mnist-subset":
            entry["found"] = ["shipped with kernelfit"]
        else:
            entry["found"] = [] if root.is_file() else _found_files(name, root, cache)
        if args.load and (entry["found"] or name == "mnist-subset" or root.is_file()):
            try:
                ds = data.load_dataset(name, data_dir=args.data_dir)
                entry.update({"source": ds.source, "x_train": list(ds.x_train.shape),
                              "x_test": list(ds.x_test.shape), "classes": list(ds.classes)})
            except KernelfitError as e:
                entry["error"] = str(e)
        info["datasets"][name] = entry
    print_json(info)
    for name, entry in info["datasets"].items():
        eprint(f"{name:>13}: {', '.join(entry['found']) if entry['found'] else 'not found'}")
    eprint(f"data directory: {root} ({origin})")
    return EXIT_OK
