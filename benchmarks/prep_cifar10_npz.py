"""Pack the CIFAR-10 (JPEG q75 copy) image-folder archive into one compact .npz that travels with the
working tree to a GPU machine (device check 2, ``benchmarks/device_check_deepfit.py``).

The .npz holds the JPEG files' bytes as they are (no re-encoding, nothing lost: ~20 MiB compressed
for all 60,000 images, against 176 MiB of decoded pixels), concatenated per split, with offsets and labels:
``train_jpeg`` / ``test_jpeg`` (uint8), ``train_offsets`` / ``test_offsets`` (int64, N + 1),
``y_train`` / ``y_test`` (uint8, label = index in ``classes``), ``classes`` (unicode). Images are in
the order ``kernelfit.data.read_image_folder`` gives them (class-balanced prefixes). Plain arrays only: it
loads with ``allow_pickle=False``.

    python benchmarks/prep_cifar10_npz.py                      # -> runs/data/cifar10-jpeg.npz (git-ignored)
    python benchmarks/prep_cifar10_npz.py --src ARCHIVE --out FILE.npz [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "runs" / "data" / "cifar10-jpeg.npz"     # /runs/ is git-ignored
ARCHIVE = "cifar10-jpeg-q75.tar.gz"
CARRY_LIMIT = 64 * 2**20                                        # what a device run can carry in all


def default_source() -> Path:
    for d in (os.environ.get("KERNELFIT_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"):
        if d and (Path(d) / ARCHIVE).is_file():
            return Path(d) / ARCHIVE
    raise SystemExit(f"{ARCHIVE} not found in $KERNELFIT_DATA, <repo>/../shared/data or /work/shared/data; "
                     "pass --src ARCHIVE.")


def pack(src: Path, out: Path) -> dict:
    """Read the archive's train/<class>/*.jpg and test/<class>/*.jpg and write the .npz; returns counts."""
    from kernelfit.data.image_folder import _iter_image_folder, _natural_key
    from kernelfit.data.registry import CIFAR10_CLASSES
    from kernelfit.errors import DataError
    from kernelfit.results import atomic_file

    items = {"train": [], "test": []}
    for split, cls, fname, data, name in _iter_image_folder(Path(src)):
        if cls not in CIFAR10_CLASSES:
            raise DataError(f"{name}: class folder {cls!r} is not a CIFAR-10 class ({', '.join(CIFAR10_CLASSES)}).")
        items[split].append((CIFAR10_CLASSES.index(cls), fname, data))
    arrays = {"classes": np.array(CIFAR10_CLASSES)}
    for split, rows in items.items():
        if not rows:
            raise DataError(f"{src}: no {split}/<class>/ images found; expected the CIFAR-10 image-folder layout.")
        # kernelfit.data.read_image_folder's order: natural file-name order within a class, round-robin over
        # classes (file i of every class, then file i + 1, ...), so any prefix of a split is class-balanced
        groups = [sorted((r for r in rows if r[0] == c), key=lambda r: _natural_key(r[1]))
                  for c in range(len(CIFAR10_CLASSES))]
        rows = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
        sizes = np.array([len(r[2]) for r in rows], dtype=np.int64)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.uint8)
        arrays[f"y_{split}"] = np.array([r[0] for r in rows], dtype=np.uint8)
    with atomic_file(out, "wb") as fh:
        np.savez_compressed(fh, **arrays)   # the JPEG headers repeat: 53 MiB -> ~20
    return {"train": len(items["train"]), "test": len(items["test"]), "bytes": out.stat().st_size}


def load_packed(path, n_train=None, n_test=None):
    """(x_train, y_train, x_test, y_test, classes) decoded from a packed .npz: uint8 (N, 32, 32, 3).
    ``n_train`` / ``n_test``: the first images of each split only (class-balanced)."""
    from kernelfit.data.image_folder import _decode

    with np.load(path, allow_pickle=False) as z:
        out = []
        for split, n in (("train", n_train), ("test", n_test)):
            jpeg, off, y = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"y_{split}"]
            idx = np.arange(len(y) if n is None else min(n, len(y)))
            def one(i, jpeg=jpeg, off=off, split=split):
                return _decode(jpeg[off[i]:off[i + 1]].tobytes(), f"{path}:{split}[{i}]")

            with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:   # Pillow decodes without the GIL
                x = np.stack(list(ex.map(one, idx, chunksize=256)))
            out += [x, y[idx].astype(np.int64)]
        return (*out, tuple(str(c) for c in z["classes"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=None, help=f"the image-folder archive (default: {ARCHIVE} in the data folder)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the .npz to write (default runs/data/cifar10-jpeg.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    from kernelfit.errors import KernelfitError
    from kernelfit.places import check_output_file

    src = Path(args.src) if args.src else default_source()
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        check_output_file(out, "--out", args.overwrite, example="cifar10-jpeg.npz")
        counts = pack(src, out)
    except KernelfitError as exc:
        raise SystemExit(f"prep_cifar10_npz: {exc}") from None
    print(f"{out}: {counts['train']} train + {counts['test']} test images, {counts['bytes'] / 2**20:.1f} MiB")
    if counts["bytes"] > CARRY_LIMIT:
        print(f"warning: larger than the {CARRY_LIMIT // 2**20} MiB a device run carries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
