"""A real data set larger than memory for an exact solve: MNIST train plus a one-pixel-shifted copy.

Writes, as a user would hand them to ``kernelfit solve``, four .npy files under --out-dir:

    x_train.npy   (120,000, 784) float64 pixels / 255: the 60,000 training images, then each image
                  shifted one pixel to the right (the column that leaves is dropped, a zero column enters)
    y_train.npy   (120,000,) int64 labels (the copy keeps its image's label)
    x_test.npy    (10,000, 784) float64 pixels / 255, the MNIST test set
    y_test.npy    (10,000,) int64

Pixels / 255 stay on the integer grid, so kernelfit's float64 residuals are exact from float32 GEMMs.
A shifted image equals no training image (checked here), so the Gram is positive definite in exact
arithmetic. Existing files are never replaced (--overwrite replaces only these four names).

    python benchmarks/make_shifted_mnist.py --data-dir ../shared/data --out-dir runs/mnist120k
    kernelfit solve --x-train runs/mnist120k/x_train.npy --y-train runs/mnist120k/y_train.npy \\
        --x-test runs/mnist120k/x_test.npy --y-test runs/mnist120k/y_test.npy --bandwidth 5 \\
        --out-of-core disk --scratch-dir /var/tmp/kf-scratch --memory-budget 8 --out mnist120k.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

NAMES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")


def shifted_right(images: np.ndarray, pixels: int = 1) -> np.ndarray:
    """(n, h, w) images moved ``pixels`` columns to the right, zeros entering on the left."""
    out = np.zeros_like(images)
    out[:, :, pixels:] = images[:, :, :-pixels]
    return out


def build(data_dir, copies: int = 1):
    from kernelfit.data import load_dataset

    ds = load_dataset("mnist", data_dir=data_dir)
    parts = [ds.x_train] + [shifted_right(ds.x_train, s) for s in range(1, copies + 1)]
    x = np.concatenate(parts).reshape(len(parts) * len(ds.x_train), -1)
    y = np.concatenate([ds.y_train] * len(parts)).astype(np.int64)
    # no shifted image may equal another image: duplicate rows make K singular
    keys = {row.tobytes() for row in x[: len(ds.x_train)]}
    clash = sum(row.tobytes() in keys for row in x[len(ds.x_train):])
    if clash:
        raise SystemExit(f"{clash} shifted images equal an original image; choose another shift")
    return (x.astype(np.float64) / 255.0, y, ds.x_test.reshape(len(ds.x_test), -1).astype(np.float64) / 255.0,
            ds.y_test.astype(np.int64))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("KERNELFIT_DATA"), help="holds mnist.npz (or the IDX files)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--copies", type=int, default=1, help="shifted copies (1, 2, ... pixels): n = 60,000 x (1 + copies)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.copies < 1:
        p.error(f"--copies must be >= 1; got {args.copies}")
    out = Path(args.out_dir)
    existing = [str(out / n) for n in NAMES if (out / n).exists()]
    if existing and not args.overwrite:
        p.error(f"{', '.join(existing)} exist; pass --overwrite to replace them or choose another --out-dir")
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(NAMES, build(args.data_dir, args.copies)):
        np.save(out / name, arr)
        print(f"{out / name}: {arr.shape} {arr.dtype}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
