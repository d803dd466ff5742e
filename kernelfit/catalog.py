"""The project's named choices, defined once.

Plain vocabularies only (tuples of strings, small frozen records, constants): no numpy, no I/O, so
that ``--help`` and argument parsing can import this module without loading the numerical stack.
Every layer that accepts one of these choices reads it from here; the objects behind a name (the
``Kernel`` of a kernel name, the ``DatasetInfo`` of a dataset) live with their code and are keyed
by these names.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

# Numerical modes of a solve: factor and refine in float64, in float32, or factor in float32 and
# refine with float64 residuals.
MODES = ("mixed", "float32", "float64")

# What the targets are: class labels (one-hot scores, argmax) or real values.
TASKS = ("classification", "regression")

# Kernel names (kernelfit.kernels maps each to its Kernel object).
KERNELS = ("gaussian", "laplacian")

# Feature maps a kernel can be computed on; randconv gives a Gram, not a feature matrix.
FEATURE_KINDS = ("pixels", "gabor", "randconv")

# Default bandwidth rule per feature map, shared by `kernelfit table` and `kernelfit solve --features`
# (kernelfit.validate.bandwidth_rule syntax). Measured by benchmarks/bandwidth_rule.py
# (benchmarks/results/bandwidth_rule.jsonl; test error, F x median): MNIST 5,000 / 1,000 pixels
# 0.25: 4.8%, 0.5: 3.5%, 1: 3.5%, 2: 4.5%; Gabor 2.0 / 1.1 / 1.2 / 1.4%; CIFAR-10 2,000 / 1,000
# pixels 63.3 / 63.0 / 69.2 / 72.5%; randconv 54.5 / 47.0 / 46.2 / 48.9% (0.5 vs 1: 8 of 1,000 test
# points, within one binomial standard deviation). 0.5 x median is best or tied everywhere.
DEFAULT_BANDWIDTH = {"pixels": "0.5*median", "gabor": "0.5*median", "randconv": "0.5*median"}

# Randomization variants of Zhang et al. (kernelfit.randomize implements them).
VARIANTS = ("true", "corrupt", "random-labels", "shuffled-pixels", "random-pixels", "gaussian")
LABEL_VARIANTS = ("corrupt", "random-labels")
PIXEL_VARIANTS = ("shuffled-pixels", "random-pixels", "gaussian")

# Modes a precomputed Gram can be solved in (mixed needs the kernel function to rebuild float64 products).
GRAM_MODES = ("float64", "float32")

# Mixed mode: at most this many refinement steps unless the caller says otherwise.
MAX_REFINE = 10

# The one environment variable naming the cache root (features, random-conv Grams, decoded image
# folders); KERNELFIT_CACHE_DIR is its old name, still read with a notice.
CACHE_ENV = "KERNELFIT_CACHE"
_OLD_CACHE_ENV = "KERNELFIT_CACHE_DIR"


def cache_root() -> Path:
    """The cache root: ``$KERNELFIT_CACHE``, else the deprecated ``$KERNELFIT_CACHE_DIR`` (with a
    FutureWarning: shown to users by default), else ``$XDG_CACHE_HOME/kernelfit`` or ``~/.cache/kernelfit``.
    Only the environment is read; nothing is created."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    old = os.environ.get(_OLD_CACHE_ENV)
    if old:
        warnings.warn(f"${_OLD_CACHE_ENV} is deprecated; set ${CACHE_ENV}={old} instead (one cache root for "
                      f"features, Grams and decoded image folders).", FutureWarning, stacklevel=2)
        return Path(old).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kernelfit"


@dataclass(frozen=True)
class DatasetShape:
    """Feature dimension, classes and full split sizes of a named dataset, for planning a solve
    without loading any data."""

    d: int
    num_classes: int
    n_train: int
    n_test: int


DATASETS: dict[str, DatasetShape] = {
    "mnist-subset": DatasetShape(d=784, num_classes=10, n_train=5000, n_test=1000),
    "mnist": DatasetShape(d=784, num_classes=10, n_train=60000, n_test=10000),
    "fashion-mnist": DatasetShape(d=784, num_classes=10, n_train=60000, n_test=10000),
    "kmnist": DatasetShape(d=784, num_classes=10, n_train=60000, n_test=10000),
    "cifar10": DatasetShape(d=3072, num_classes=10, n_train=50000, n_test=10000),
}
DATASET_NAMES = tuple(DATASETS)
