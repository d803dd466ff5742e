"""Typed errors. Every message says what was expected, what was found, and how to fix it."""

from __future__ import annotations


class KernelfitError(Exception):
    """Base class for all kernelfit errors."""


class InputError(KernelfitError, ValueError):
    """Bad user input (shapes, NaN/inf, labels, bandwidth, options)."""


class NotPositiveDefiniteError(KernelfitError, ArithmeticError):
    """The Gram matrix is not (numerically) positive definite.

    ``minor`` is the 1-based order of the first leading minor that failed, as LAPACK reports it.
    """

    def __init__(self, minor: int, n: int, dtype: str, jitter: float = 0.0):
        self.minor, self.n, self.dtype, self.jitter = int(minor), int(n), str(dtype), float(jitter)
        hint = 1e-6 if self.jitter == 0 else self.jitter * 100
        precision = "" if self.dtype == "float64" else ", use mode 'float64' or 'mixed'"
        super().__init__(
            f"Gram matrix is not positive definite in {self.dtype}: the leading minor of order "
            f"{self.minor} (of n = {self.n}) failed (jitter = {self.jitter:g}). Duplicate or "
            f"near-duplicate points, or a bandwidth too large for this precision, cause this. "
            f"Fix: add a tiny ridge, e.g. --jitter {hint:g} (KernelInterpolator(jitter={hint:g})){precision}, "
            f"or remove duplicate points."
        )


class MemoryPlanError(KernelfitError, MemoryError):
    """A solve would not fit in available memory; raised before anything large is allocated."""

    def __init__(self, message: str, plan=None):
        self.plan = plan
        super().__init__(message)


class DataError(KernelfitError, OSError):
    """A dataset is missing, unreadable or corrupt."""


class ChecksumError(DataError):
    """A downloaded or cached file does not match its expected sha256."""


class ModelFileError(DataError):
    """A model file is missing, corrupt, of another format version, or cannot be rebuilt."""


class OutputError(KernelfitError, OSError):
    """The work finished but a result file could not be written; the message says what was kept and where."""


class StorageError(KernelfitError, OSError):
    """A directory kernelfit writes to (checkpoints, caches) is in use by another run, full, or holds a
    corrupt manifest. ``errno`` is kept (ENOSPC, EBUSY, ...); the message is the whole text."""

    def __str__(self) -> str:
        return str(self.strerror)
