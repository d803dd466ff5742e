"""The data a command works on: a named dataset or the user's own arrays (``solve`` and ``plan``).

Conflicting options are refused before anything is read; shapes for planning come from the catalog
(named datasets) or from the arrays' headers, so that a plan never loads the data.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ..catalog import DATASET_NAMES, DATASETS
from .args import dataset, refuse

USER_KEYS = ("data", "x_train", "y_train", "x_test", "y_test")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data: a named dataset, or your own arrays")
    g.add_argument("--dataset", type=dataset, default=None, metavar="NAME",
                   help=f"one of {', '.join(DATASET_NAMES)} (default: mnist-subset, shipped "
                        f"with kernelfit: 5,000 train / 1,000 test MNIST images)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory (or file) holding the named --dataset; default $KERNELFIT_DATA, else "
                        "~/.cache/kernelfit")
    g.add_argument("--download", action="store_true",
                   help="fetch missing files of --dataset from the canonical source (checksum-verified)")
    g.add_argument("--data", default=None, metavar="FILE.npz",
                   help="your arrays in one .npz: x_train, y_train and optionally x_test, y_test (any "
                        "shape, any real dtype; used as stored, no scaling)")
    for split in ("train", "test"):
        g.add_argument(f"--x-{split}", default=None, metavar="FILE",
                       help=f"{split} inputs: X.npy (memory-mapped), F.npz:NAME, F.h5:/DATASET (h5py) or "
                            f"S.zarr:/ARRAY (zarr)" if split == "train" else "test inputs (same formats)")
        g.add_argument(f"--y-{split}", default=None, metavar="FILE",
                       help=f"{split} targets, same formats: integer labels >= 0, or float targets (n,) / (n, k) "
                            f"with --task regression (also the targets of --gram / --gram-test)")


def _user_arrays(args) -> dict | None:
    """The user-array options given, or None when a named dataset is meant."""
    given = {k: getattr(args, k, None) for k in USER_KEYS}
    return given if any(v is not None for v in given.values()) else None


def _check_user_arrays(args, user: dict) -> None:
    flags = [f"--{k.replace('_', '-')}" for k, v in user.items() if v is not None]
    if args.dataset is not None:
        refuse(args, f"--dataset {args.dataset} conflicts with {' '.join(flags)}: name a dataset or give your "
                     f"own arrays, not both")
    if getattr(args, "data_dir", None) is not None:
        refuse(args, f"--data-dir applies to a named --dataset, not to {' '.join(flags)} (which name their files "
                     f"themselves); drop --data-dir")
    if getattr(args, "download", False):
        refuse(args, f"--download fetches a named --dataset; it does not apply to {' '.join(flags)}")
    if user["data"] is not None and len(flags) > 1:
        refuse(args, f"--data FILE.npz conflicts with {' '.join(f for f in flags if f != '--data')}: give one .npz "
                     f"holding x_train, y_train (x_test, y_test), or the separate files")
    if user["data"] is None:
        if (user["x_train"] is None) != (user["y_train"] is None):
            refuse(args, "your own arrays need both --x-train FILE and --y-train FILE")
        if (user["x_test"] is None) != (user["y_test"] is None):
            refuse(args, "a test split needs both --x-test FILE and --y-test FILE")
        if user["x_train"] is None:
            refuse(args, f"{' '.join(flags)} given without --x-train FILE and --y-train FILE")


def check_data_source(args) -> dict | None:
    """Refuse conflicting data options before anything is read. Returns the user-array options
    (or None, and then ``args.dataset`` is set to the named dataset to load)."""
    user = _user_arrays(args)
    if user is not None:
        _check_user_arrays(args, user)
        return user
    if getattr(args, "data_dir", None) is not None and args.dataset in (None, "mnist-subset"):
        refuse(args, f"--data-dir {args.data_dir} needs a dataset it can serve: add --dataset NAME (one of "
                     f"{', '.join(n for n in DATASET_NAMES if n != 'mnist-subset')}); mnist-subset ships with "
                     f"kernelfit. For your own arrays use --data FILE.npz or --x-train/--y-train")
    if args.dataset is None:
        args.dataset = "mnist-subset"
    return None


def data_shape(args, user: dict | None) -> dict:
    """d, num_classes, n_train, n_test of the selected data, without loading it."""
    if user is None:
        return asdict(DATASETS[args.dataset])
    return user_shape(user, getattr(args, "task", "classification"))


def user_shape(user: dict, task: str = "classification") -> dict:
    """d, classes (regression: target columns) and split sizes of a user's arrays, for planning: from their
    headers, and for classification the distinct labels (read and checked, as the loader will count them)."""
    import numpy as np

    from ..data import peek_arrays, peek_outputs

    shapes = peek_arrays(**user)
    k = peek_outputs(**user, task=task)
    x = shapes["x_train"][0]
    return {"d": int(np.prod(x[1:], dtype=np.int64)), "image_shape": x[1:], "num_classes": max(k, 1), "n_train": x[0],
            "n_test": shapes["x_test"][0][0] if "x_test" in shapes else 0}


def load_data(args, user: dict | None):
    from ..data import load_arrays, load_dataset

    if user is not None:
        return load_arrays(**user, task=getattr(args, "task", "classification"))
    return load_dataset(args.dataset, data_dir=args.data_dir, download=getattr(args, "download", False))
