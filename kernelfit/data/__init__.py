"""The data layer: named datasets, a user's own arrays, one ``Dataset`` type for all of them.

Modules
-------
``dataset``       ``Dataset`` (train/test arrays + labels or targets + where they came from),
                  ``to_features``, ``describe`` (what a record says was loaded)
``registry``      named datasets (``REGISTRY``: files, canonical URLs, checksums, shape, classes):
                  mnist-subset (shipped), mnist, fashion-mnist, kmnist, cifar10; ``load_dataset``
``user``          ``load_arrays``: a user's .npz, or x / y files (.npy memory-mapped, HDF5, zarr)
``arrays``        ``open_array("F.h5:/dset")``: one spec syntax for array files
``idx``           IDX files (the MNIST family), plain or gzip
``npz``           Keras-layout .npz
``cifar``         CIFAR-10 python batches (restricted unpickling)
``image_folder``  ``train/<class>/*``, ``test/<class>/*`` folders or archives (Pillow; decoded cache)
``download``      fetching canonical files: sha256 / md5 verification, size cap, atomic rename
                  (``registry.download(name)`` names the files of a dataset)
``paths``         data directory: option > ``$KERNELFIT_DATA`` > ``$XDG_CACHE_HOME/kernelfit``
                  (or ``~/.cache/kernelfit``); decoded cache under ``kernelfit.catalog.cache_root()`` (``$KERNELFIT_CACHE``)

Images are kept in their natural layout and dtype ((N, H, W) or (N, H, W, C), any size and channel
count); randomizations live in ``kernelfit.randomize``.
"""

from __future__ import annotations

from .arrays import open_array, parse_spec, sha256_file
from .cifar import CIFAR10_ARCHIVE, CIFAR10_BATCH_DIR, read_cifar10_batches
from .dataset import Dataset, describe, to_features
from .download import RemoteFile
from .idx import read_idx
from .image_folder import read_image_folder
from .npz import read_keras_npz
from .paths import _resolve_with_origin, resolve_data_dir
from .registry import (
    BASE_URLS,
    CIFAR10_CLASSES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    IDX_DATASETS,
    IDX_FILES,
    KMNIST_CLASSES,
    MNIST_CLASSES,
    MNIST_IDX_FILES,
    MNIST_NPZ,
    REGISTRY,
    REMOTE_FILES,
    DatasetInfo,
    _image_folder_candidates,
    _search_dirs,
    download,
    load_dataset,
    normalize_name,
)
from .user import load_arrays, peek_arrays, peek_outputs

__all__ = [
    "BASE_URLS", "CIFAR10_ARCHIVE", "CIFAR10_BATCH_DIR", "CIFAR10_CLASSES", "DATASETS",
    "FASHION_MNIST_CLASSES", "IDX_DATASETS", "IDX_FILES", "KMNIST_CLASSES", "MNIST_CLASSES",
    "MNIST_IDX_FILES", "MNIST_NPZ", "REGISTRY", "REMOTE_FILES", "Dataset", "DatasetInfo", "RemoteFile",
    "_image_folder_candidates", "_resolve_with_origin", "_search_dirs",
    "describe", "download", "load_arrays", "load_dataset", "normalize_name",
    "open_array", "parse_spec", "peek_arrays", "peek_outputs", "read_cifar10_batches", "read_idx", "read_image_folder",
    "read_keras_npz", "resolve_data_dir", "sha256_file", "to_features",
]
