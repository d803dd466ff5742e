"""The one validation module: hyper-parameters checked once, the same way everywhere.

Bandwidths (a number, ``'median'`` or ``'F*median'``), jitter (a number >= 0, or ``'auto'`` where the
caller allows it), probabilities, sizes, bounded floats, named choices, and the input arrays of a solve
(features X, targets Y). Used by ``SolveOptions``,
the estimators (their ``_parameter_checks`` table), the CLI's argument types and deepfit.

numpy-free at import (``--help`` and argument parsing import it); numpy scalars are accepted through
the ``numbers`` ABCs they register with. Every error is an ``InputError`` whose message says what was
expected, what was found and how to fix it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:   # annotations only: numpy is imported inside the array checks
    import numpy as np


def _fail(what: str, expected: str, found, fix: str) -> InputError:
    return InputError(f"{what}: expected {expected}; found {found!r}. {fix}")


def _is_bool(value) -> bool:
    return type(value).__name__ in ("bool", "bool_")   # bool and numpy.bool_ (not numbers.Integral)


def _real(value, what: str, expected: str, fix: str) -> float:
    """float(value) for a real number or a numeric string; refuses bools, None, containers."""
    if _is_bool(value) or not isinstance(value, (numbers.Real, str)):
        raise _fail(what, expected, value, fix)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _fail(what, expected, value, fix) from None


# --------------------------------------------------------------------------------------------
# bandwidth
# --------------------------------------------------------------------------------------------

_BANDWIDTH_EXPECTED = "a finite number > 0 (sigma), 'median', or 'F*median' with F > 0 (e.g. '0.5*median')"
_BANDWIDTH_FIX = "Pass e.g. bandwidth=5.0 (MNIST pixels / 255), 'median' or '0.5*median' (--bandwidth 0.5*median)."


def check_bandwidth(bandwidth, what: str = "bandwidth") -> float:
    """A bandwidth sigma: a finite number > 0 whose kernel scales 1 / (2 sigma^2) and 1 / sigma are
    finite and nonzero in float64 (1e-300 or 1e300 would turn every kernel value into NaN, 0 or 1)."""
    value = _real(bandwidth, what, "a finite number > 0 or 'median'", _BANDWIDTH_FIX)
    if not math.isfinite(value) or value <= 0:
        raise _fail(what, "a finite number > 0", value, "Pass e.g. bandwidth=5.0, or bandwidth='median' to use "
                                                        "the median heuristic.")
    two_s2 = 2.0 * value * value
    scale = 1.0 / two_s2 if two_s2 > 0 else math.inf
    if not (0.0 < scale < math.inf):
        raise InputError(
            f"{what} {value!r} is outside what float64 can use: 2 sigma^2 = {two_s2!r}, so the Gaussian "
            f"scale 1 / (2 sigma^2) is {'infinite' if scale == math.inf else 'zero'} and every kernel value would be "
            f"NaN, 0 or 1. Use a sigma between 1e-150 and 1e150 on the data's scale, e.g. bandwidth='median' "
            f"(--bandwidth median)."
        )
    return value


@dataclass(frozen=True)
class BandwidthRule:
    """A parsed bandwidth: ``kind="given"`` (``value`` is sigma) or ``kind="median"`` (sigma =
    ``value`` x the median pairwise distance of the data)."""

    kind: str
    value: float

    @property
    def is_median(self) -> bool:
        return self.kind == "median"

    def resolve(self, median: float | None = None) -> float:
        """sigma for this rule; a median rule needs the data's median pairwise distance."""
        if not self.is_median:
            return self.value
        if median is None:
            raise InputError("a median bandwidth rule needs the median pairwise distance of the data.")
        return check_bandwidth(self.value * float(median), f"bandwidth {self} (= {self.value:g} x median {median:g})")

    def describe(self) -> str:
        """The record's ``bandwidth_rule``: 'median heuristic', '0.5 x median heuristic' or 'given'."""
        if not self.is_median:
            return "given"
        return "median heuristic" if self.value == 1.0 else f"{self.value:g} x median heuristic"

    def __str__(self) -> str:
        if not self.is_median:
            return f"{self.value:g}"
        return "median" if self.value == 1.0 else f"{self.value:g}*median"


def bandwidth_rule(bandwidth, what: str = "bandwidth") -> BandwidthRule:
    """Parse a bandwidth: 5.0 / '5' -> given sigma; 'median' -> 1 x median; '0.5*median' -> 0.5 x median."""
    if isinstance(bandwidth, BandwidthRule):
        return bandwidth
    if isinstance(bandwidth, str):
        text = bandwidth.strip().lower().replace(" ", "")
        if text == "median":
            return BandwidthRule("median", 1.0)
        if text.endswith("*median"):
            factor = text[: -len("*median")]
            value = _real(factor, what, _BANDWIDTH_EXPECTED, _BANDWIDTH_FIX)
            if not math.isfinite(value) or value <= 0:
                raise _fail(what, "a factor F > 0 in 'F*median'", bandwidth, _BANDWIDTH_FIX)
            check_bandwidth(value, f"{what} factor")   # the same float64 range as a sigma
            return BandwidthRule("median", value)
        try:
            float(text)
        except ValueError:
            raise _fail(what, _BANDWIDTH_EXPECTED, bandwidth, _BANDWIDTH_FIX) from None
    return BandwidthRule("given", check_bandwidth(bandwidth, what))


def check_bandwidth_spec(bandwidth, what: str = "bandwidth"):
    """Validate and normalise a bandwidth for storing in options: a float sigma, or the rule's string
    ('median', '0.5*median'), so records and ``SolveOptions`` keep their plain types."""
    rule = bandwidth_rule(bandwidth, what)
    return str(rule) if rule.is_median else rule.value


# --------------------------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------------------------

def check_jitter(jitter, what: str = "jitter", allow_auto: bool = False):
    """A ridge on the diagonal: a finite number >= 0 (0 = exact interpolation), or 'auto' where allowed
    (exact first, then the smallest ridge of a short ladder that factors)."""
    expected = "a finite number >= 0" + (" or 'auto'" if allow_auto else "")
    fix = "Pass e.g. jitter=0 (exact interpolation) or jitter=1e-8 (a tiny ridge)" + \
        (", or jitter='auto'." if allow_auto else ".")
    if isinstance(jitter, str) and jitter.strip().lower() == "auto":
        if allow_auto:
            return "auto"
        raise _fail(what, expected, jitter, fix + " 'auto' is not accepted here.")
    value = _real(jitter, what, expected, fix)
    if not math.isfinite(value) or value < 0:
        raise _fail(what, expected, jitter, fix)
    return value


def check_probability(p, what: str = "probability") -> float:
    """A probability: a number in [0, 1]."""
    fix = "Pass a number between 0 and 1, e.g. 0.2."
    value = _real(p, what, "a probability in [0, 1]", fix)
    if not (0.0 <= value <= 1.0):   # also refuses NaN
        raise _fail(what, "a probability in [0, 1]", p, fix)
    return value


def check_int(value, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (int, numpy integer, or a float / string with an integral value) within [minimum, maximum]."""
    lo = "" if minimum is None else f" >= {minimum}"
    hi = "" if maximum is None else f" <= {maximum}"
    expected = f"an integer{lo}{' and' if lo and hi else ''}{hi}"
    fix = f"Pass a whole number{lo}{' and' if lo and hi else ''}{hi}."
    if _is_bool(value):
        raise _fail(what, expected, value, fix)
    if isinstance(value, numbers.Integral):
        out = int(value)
    else:
        f = _real(value, what, expected, fix)
        if not math.isfinite(f) or f != int(f):
            raise _fail(what, expected, value, fix)
        out = int(f)
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise _fail(what, expected, value, fix)
    return out


def check_positive_int(value, what: str = "size") -> int:
    """A size or count: an integer >= 1."""
    return check_int(value, what, minimum=1)


def check_optional_positive_int(value, what: str = "size") -> int | None:
    """None (the library picks) or an integer >= 1."""
    return None if value is None else check_positive_int(value, what)


def check_float(value, what: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite float in the range [low, high] (an end is excluded with ``low_open`` / ``high_open``)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")
    fix = f"Pass {expected}."
    f = _real(value, what, expected, fix)
    ok = math.isfinite(f)
    if ok and low is not None:
        ok = f > low if low_open else f >= low
    if ok and high is not None:
        ok = f < high if high_open else f <= high
    if not ok:
        raise _fail(what, expected, value, fix)
    return f


def check_choice(value, choices, what: str):
    """One of the named ``choices`` (a tuple of strings from ``kernelfit.catalog``)."""
    if not isinstance(value, str) or value not in choices:
        raise _fail(what, f"one of {', '.join(map(str, choices))}", value, f"Pass e.g. {what}={choices[0]!r}.")
    return value


# --------------------------------------------------------------------------------------------
# input arrays (numpy imported inside: this module stays numpy-free at import)
# --------------------------------------------------------------------------------------------

def check_features(X, name="X") -> "np.ndarray":
    """X as a 2-D, non-empty array of finite real numbers (n_samples, n_features)."""
    import numpy as np

    X = np.asarray(X)
    if X.ndim != 2:
        hint = " Reshape your data using X.reshape(-1, 1) for one feature or X.reshape(len(X), -1) for images." \
            if X.ndim in (1, 3, 4) else ""
        raise InputError(f"expected {name} as a 2-D array (n_samples, n_features); got {X.ndim}-D shape {X.shape}.{hint}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {X.shape}); need at least one sample and one feature.")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise InputError(f"{name} must be real numbers; got dtype {X.dtype}.")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise InputError(f"{name} contains NaN or inf in {bad} row(s); clean or impute them first.")
    return X


def check_targets(Y, n) -> "np.ndarray":
    """Targets as a float64 (n, k) array of finite numbers, one row per sample."""
    import numpy as np

    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise InputError(f"expected targets Y as (n,) or (n, k); got shape {Y.shape}.")
    if Y.shape[0] != n:
        raise InputError(f"X has {n} rows but Y has {Y.shape[0]}; they must match.")
    check_finite_targets(Y, "targets Y")
    return Y


def check_finite_targets(y, what: str = "targets") -> None:
    """Refuse NaN / inf targets, naming the first bad row (a NaN target would poison alpha silently)."""
    import numpy as np

    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.integer):
        return
    bad = ~np.isfinite(y)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(y), -1).any(axis=1)) if y.ndim else np.array([0])
        raise InputError(f"{what} contain NaN or inf in {len(rows)} row(s), the first at index {int(rows[0])} "
                         f"(value {y.reshape(len(y), -1)[rows[0]].tolist() if y.ndim else y.item()}); targets must be "
                         f"finite numbers. Remove or fix those rows first.")


def check_params(params: dict, checks: dict) -> dict:
    """Validate ``params`` by a table ``name -> checker(value, what)`` (scikit-learn's
    ``_parameter_constraints`` idea, with this module's checkers); returns the checked values."""
    return {name: checks[name](value, name) if name in checks else value for name, value in params.items()}
