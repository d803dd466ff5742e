"""The project's named choices, defined once.

Plain vocabularies only (tuples of strings, small frozen records, constants): no numpy, no I/O, so
that ``--help`` and argument parsing can import this module without loading the numerical stack.
Every layer that accepts one of these choices reads it from here; the objects behind a name (the
``Kernel`` of a kernel name, the ``DatasetInfo`` of a dataset) live with their code and are keyed
by these names.
"""

from __future__ import annotations

from dataclasses import dataclass

# Numerical modes of a solve: factor and refine in float64, in float32, or factor in float32 and
# refine with float64 residuals.
MODES = ("mixed", "float32", "float64")

# What the targets are: class labels (one-hot scores, argmax) or real values.
TASKS = ("classification", "regression")

# Kernel names (kernelfit.kernels maps each to its Kernel object).
KERNELS = ("gaussian", "laplacian")

# Feature maps a kernel can be computed on; randconv gives a Gram, not a feature matrix.
FEATURE_KINDS = ("pixels", "gabor", "randconv")

# Randomization variants of Zhang et al. (kernelfit.randomize implements them).
VARIANTS = ("true", "corrupt", "random-labels", "shuffled-pixels", "random-pixels", "gaussian")
LABEL_VARIANTS = ("corrupt", "random-labels")
PIXEL_VARIANTS = ("shuffled-pixels", "random-pixels", "gaussian")

# Mixed mode: at most this many refinement steps unless the caller says otherwise.
MAX_REFINE = 10


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
