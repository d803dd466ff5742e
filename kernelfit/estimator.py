"""scikit-learn estimators for exact kernel interpolation.

``KernelInterpolator`` (classifier) and ``KernelInterpolationRegressor`` solve ``K alpha = Y``
exactly (no ridge unless ``jitter > 0``) with kernelfit's solver and predict ``k(x, X) alpha``.
The classifier one-hot encodes the labels (one output column per class, as in Zhang et al.,
Section 5) and predicts the class of the largest score.

``kernel="precomputed"`` works as in ``sklearn.svm.SVC``: ``fit(K, y)`` takes the training Gram
(n x n), ``predict(K_test)`` the test Gram k(X_test, X_train) (m x n). Fitted estimators pickle and
joblib-dump; ``save_model`` / ``from_model`` use kernelfit's safe model file instead (no pickle).

Contract as in ``sklearn.kernel_ridge.KernelRidge``: ``__init__`` only stores parameters; all
validation happens in ``fit``; fitted attributes end in ``_``; ``predict`` starts with
``check_is_fitted``. Both estimators work in ``Pipeline`` and ``GridSearchCV``.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, MultiOutputMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .catalog import KERNELS, MAX_REFINE, MODES
from .errors import InputError
from .validate import (
    bandwidth_rule,
    check_bandwidth_spec,
    check_choice,
    check_int,
    check_jitter,
    check_optional_positive_int,
    check_params,
)

__all__ = ["KernelInterpolator", "KernelInterpolationRegressor"]


def _solver():
    # Imported at fit time so that importing the estimator module stays cheap and its error
    # (if the solver is broken) surfaces where it matters, with the solver's own traceback.
    from .solve import SolveOptions, fit_interpolant

    return SolveOptions, fit_interpolant


def _placement(block_size):
    from .linalg.options import FactorOptions

    return FactorOptions(block_size=block_size, progress=False)


def _check_finite_y(y) -> None:
    """NaN / inf targets: an InputError naming the first bad row (sklearn's own check names none)."""
    from .validate import check_finite_targets

    try:
        arr = np.asarray(y)
    except (TypeError, ValueError):   # ragged input: left to sklearn's validation
        return
    if arr.ndim >= 1 and len(arr):
        check_finite_targets(arr, "y")


# jitter="auto": exact first, then the smallest ridge of this ladder that factors. The Gaussian and
# Laplacian kernels have k(x, x) = 1, so these are relative to the diagonal (as GPyTorch's retries).
JITTER_LADDER = (1e-10, 1e-8, 1e-6, 1e-4)


def _solve_with_jitter_ladder(solve):
    """(model, jitter): ``solve(0.0)``, or on a matrix that is not positive definite the first ladder
    value that factors, with a warning that says the fit is then a ridge, not an exact interpolant."""
    import warnings

    from .errors import NotPositiveDefiniteError

    try:
        return solve(0.0), 0.0
    except NotPositiveDefiniteError as first:
        failure = first
    for jitter in JITTER_LADDER:
        try:
            model = solve(jitter)
        except NotPositiveDefiniteError as e:
            failure = e
            continue
        warnings.warn(f"the kernel matrix is not positive definite in this precision ({failure.dtype}, leading "
                      f"minor {failure.minor} of {failure.n}); fitted with jitter = {jitter:g} on the diagonal "
                      f"(the smallest of {JITTER_LADDER} that factors), so the training targets are fitted up to "
                      f"that ridge, not exactly. Pass jitter=0 to get an error instead, or mode='float64'.",
                      RuntimeWarning, stacklevel=5)
        return model, jitter
    raise failure


def _merge_duplicates(X: np.ndarray, Y: np.ndarray):
    """(X, Y, merged): equal rows of X with equal targets kept once (they are one interpolation
    condition); equal rows with different targets cannot be interpolated: an InputError naming them."""
    from .data.rows import find_duplicate_rows

    if find_duplicate_rows(X) is None:   # the common case: one hashing pass, no copy
        return X, Y, 0
    _, first, inverse = np.unique(X, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rep = first[inverse]                         # for each row, the first row equal to it
    clash = np.flatnonzero(np.any(Y != Y[rep], axis=1))
    if clash.size:
        i = int(clash[0])
        raise InputError(f"X rows {int(rep[i])} and {i} are equal but their targets differ; no function "
                         f"interpolates both. Fix: remove or relabel the conflicting rows, or fit a ridge "
                         f"(e.g. jitter=1e-6), which then fits neither exactly.")
    keep = np.sort(first)
    import warnings

    warnings.warn(f"merged {len(X) - len(keep)} duplicate row(s) of X that have the same targets (each is one "
                  f"interpolation condition); X_fit_ holds the {len(keep)} distinct rows.", RuntimeWarning, stacklevel=5)
    return X[keep], Y[keep], int(len(X) - len(keep))


class _KernelInterpolationBase(BaseEstimator):
    """Shared parameters, validation and solve for the classifier and the regressor."""

    # scikit-learn's ``_parameter_constraints`` idea with kernelfit.validate's checkers: each
    # hyper-parameter -> checker(value, name); checked in fit (never in __init__), one message style
    _parameter_checks = {
        "kernel": lambda v, name: check_choice(v, (*KERNELS, "precomputed"), name),
        "bandwidth": check_bandwidth_spec,
        "mode": lambda v, name: check_choice(v, MODES, name),
        "jitter": lambda v, name: check_jitter(v, name, allow_auto=True),
        "block_size": check_optional_positive_int,
        "max_refine": lambda v, name: check_int(v, name, minimum=0),
        "n_jobs": check_optional_positive_int,
    }

    def __init__(self, kernel="gaussian", bandwidth="median", mode="mixed", jitter="auto",
                 block_size=None, max_refine=MAX_REFINE, n_jobs=None):
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.mode = mode
        self.jitter = jitter
        self.block_size = block_size
        self.max_refine = max_refine
        self.n_jobs = n_jobs

    def _checked_params(self) -> dict:
        """The hyper-parameters through ``_parameter_checks`` (bandwidth as a float or 'F*median')."""
        return check_params(self.get_params(deep=False), self._parameter_checks)

    def _threads(self, n_jobs):
        """n_jobs threads for BLAS, torch and the kernel pool (``parallel.limit_threads``); None: as is."""
        if n_jobs is None:
            return nullcontext()
        from .parallel import limit_threads

        return limit_threads(n_jobs)

    def _fit_targets(self, X: np.ndarray, Y: np.ndarray):
        """Validate options, solve K alpha = Y (on ``n_jobs`` threads) and store the fitted attributes."""
        p = self._checked_params()
        with self._threads(p["n_jobs"]):
            if p["kernel"] == "precomputed":
                self._fit_precomputed(X, Y, p)
            else:
                self._fit_points(X, Y, p)
        self.fit_stats_["n_jobs"] = p["n_jobs"]
        return self

    def _fit_points(self, X: np.ndarray, Y: np.ndarray, p: dict):
        if bandwidth_rule(p["bandwidth"]).is_median and X.shape[0] < 2:
            raise InputError(
                f"bandwidth={p['bandwidth']!r} needs at least 2 samples; got n_samples = {X.shape[0]}. "
                f"Pass an explicit bandwidth (e.g. bandwidth=1.0) or more samples."
            )
        from .solve import check_distinct

        auto = p["jitter"] == "auto"
        merged = 0
        if auto:   # equal rows with equal targets are one point; with different targets, say so
            X, Y, merged = _merge_duplicates(X, Y)
        else:      # duplicates make K singular: found by hashing the rows, before the O(n^3) solve
            check_distinct(X, p["jitter"], "X")
        SolveOptions, fit_interpolant = _solver()
        Y = np.ascontiguousarray(Y, dtype=np.float64)

        def solve(jitter: float):
            opts = SolveOptions(kernel=p["kernel"], bandwidth=p["bandwidth"], mode=p["mode"], jitter=jitter,
                                max_refine=p["max_refine"], placement=_placement(p["block_size"]))
            return fit_interpolant(X, Y, opts)

        if not auto:
            model, used = solve(p["jitter"]), p["jitter"]
        else:
            model, used = _solve_with_jitter_ladder(solve)
        self.model_ = model
        self.jitter_ = used
        self.X_fit_ = model.X_fit  # the solver's float64 copy (no second copy of X is kept)
        self.dual_coef_ = np.asarray(model.alpha)
        self.bandwidth_ = float(model.bandwidth)
        self.rkhs_norm_ = float(model.rkhs_norm)
        self.fit_stats_ = dict(getattr(model, "stats", {}) or {})
        self.fit_stats_.update(jitter=used, jitter_rule="auto" if auto else "given", merged_duplicates=merged)

    def _fit_precomputed(self, K: np.ndarray, Y: np.ndarray, p: dict):
        # A precomputed Gram has no kernel function to rebuild float64 products from, so "mixed"
        # (the default) solves it in float64; "float32" halves the memory at float32 accuracy.
        from .solve import SolveOptions, fit_precomputed

        mode = "float64" if p["mode"] == "mixed" else p["mode"]
        Y = np.ascontiguousarray(Y, dtype=np.float64)

        def solve(jitter: float):
            opts = SolveOptions(mode=mode, jitter=jitter, placement=_placement(p["block_size"]))
            return fit_precomputed(K, Y, opts, what="K (kernel='precomputed')")

        auto = p["jitter"] == "auto"
        model, used = _solve_with_jitter_ladder(solve) if auto else (solve(p["jitter"]), p["jitter"])
        self.model_ = model
        self.jitter_ = used
        self.X_fit_ = None
        self.dual_coef_ = np.asarray(model.alpha)
        self.bandwidth_ = None
        self.rkhs_norm_ = float(model.rkhs_norm)
        self.fit_stats_ = dict(model.stats)
        self.fit_stats_.update(jitter=used, jitter_rule="auto" if auto else "given", merged_duplicates=0)

    def _scores(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        with self._threads(check_optional_positive_int(self.n_jobs, "n_jobs")):
            return np.asarray(self.model_.predict(X), dtype=np.float64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.pairwise = self.kernel == "precomputed"   # cross-validation slices K[train][:, train]
        return tags

    # -- model files ---------------------------------------------------------------------------
    def save_model(self, path, overwrite: bool = False):
        """Write the fitted interpolant to a kernelfit model file (safetensors; see kernelfit.model)."""
        from .model import save_model

        check_is_fitted(self)
        alpha = self.model_.alpha
        classes = getattr(self, "classes_", None)
        return save_model(path, self.model_, task="classification" if classes is not None else "regression",
                          targets={"true": (0, alpha.shape[1])},
                          num_classes=None if classes is None else len(classes), classes=classes,
                          preprocessing={"kind": "none", "dtype": "float64"}, overwrite=overwrite)

    @classmethod
    def from_model(cls, path):
        """A fitted estimator from a model file (written by ``save_model`` or ``kernelfit solve --save-model``).

        Predictions take the rows the model's kernel sees (its preprocessing is not applied here:
        use ``kernelfit.model.load_model(path).predict`` for raw inputs such as images)."""
        from .model import load_model

        saved = load_model(path)
        meta = saved.metadata
        want = "classification" if issubclass(cls, ClassifierMixin) else "regression"
        if meta["task"] != want:
            raise InputError(f"{path} holds a {meta['task']} model; load it with "
                             f"{'KernelInterpolator' if meta['task'] == 'classification' else 'KernelInterpolationRegressor'}.")
        model = saved.interpolant
        cols = saved._target(None)
        est = cls(kernel=meta["kernel"], bandwidth="median" if meta["bandwidth"] is None else meta["bandwidth"],
                  mode=meta["mode"], jitter=meta.get("jitter", 0.0))
        if cols != slice(0, model.alpha.shape[1]):   # keep only the first target set (e.g. "true")
            from dataclasses import replace

            model = replace(model, alpha=model.alpha[:, cols], Y=model.Y[:, cols],
                            train_scores=model.train_scores[:, cols])
        est.model_ = model
        est.X_fit_ = model.X_fit
        est.dual_coef_ = np.asarray(model.alpha)
        est.bandwidth_ = None if meta["bandwidth"] is None else float(meta["bandwidth"])
        est.rkhs_norm_ = float(model.rkhs_norm)
        est.fit_stats_ = dict(model.stats)
        est.n_features_in_ = meta["n_train"] if saved.precomputed else meta["n_features"]
        if want == "classification":
            est.classes_ = np.arange(meta["num_classes"]) if meta.get("classes") is None else np.asarray(meta["classes"])
        else:
            est._y_1d = model.alpha.shape[1] == 1
            if est._y_1d:
                est.dual_coef_ = est.dual_coef_[:, 0]
        return est


class KernelInterpolator(ClassifierMixin, _KernelInterpolationBase):
    """Exact kernel interpolation classifier (minimum-RKHS-norm interpolant of one-hot labels).

    Parameters
    ----------
    kernel : {"gaussian", "laplacian", "precomputed"}, default="gaussian"
        gaussian: exp(-|x-z|^2 / (2 sigma^2)); laplacian: exp(-|x-z| / sigma) (Euclidean norm).
        precomputed: ``fit(K, y)`` with the training Gram K (n x n), ``predict(K_test)`` with
        K_test = k(X_test, X_train) (m x n), as in ``sklearn.svm.SVC``; bandwidth is ignored.
    bandwidth : float > 0, "median" or "F*median", default="median"
        sigma. "median" uses the median pairwise distance of (a seeded sample of) the training
        points, "0.5*median" half of it; the value used is ``bandwidth_``.
    mode : {"mixed", "float32", "float64"}, default="mixed"
        Precision of the solve. "mixed" factors in float32 and refines residuals in float64 (with
        kernel="precomputed", which has no kernel function to refine with, "mixed" solves in float64).
    jitter : "auto" or float >= 0, default="auto"
        Ridge added to the diagonal. "auto": exact interpolation, with equal rows of equal targets
        merged (equal rows with different targets are an error); if the kernel matrix does not factor
        in the chosen precision, the smallest ridge of ``JITTER_LADDER`` that does, with a warning
        (the value used is ``jitter_`` and ``fit_stats_["jitter"]``). 0: exact or an error.
    block_size : int or None, default=None
        Tile size of the blocked factorization (None: automatic).
    max_refine : int >= 0, default=10 (``kernelfit.catalog.MAX_REFINE``)
        Maximum iterative-refinement steps in "mixed" mode.
    n_jobs : int >= 1 or None, default=None
        Threads for BLAS, torch and kernelfit's kernel pool during fit and predict
        (``kernelfit.parallel.limit_threads``, threadpoolctl); None leaves the library default.
        Recorded in ``fit_stats_["n_jobs"]``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    dual_coef_ : ndarray of shape (n_samples, n_classes), float64 -- alpha in K alpha = Y.
    X_fit_ : ndarray of shape (n_samples, n_features)
    n_features_in_ : int
    bandwidth_ : float -- the sigma actually used.
    rkhs_norm_ : float -- sqrt(trace(alpha^T K alpha)), the RKHS norm of the interpolant.
    fit_stats_ : dict -- solver statistics (timings, residuals, refinement steps, ...).
    """

    def fit(self, X, y):
        _check_finite_y(y)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=False,
                             multi_output=False)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        Y = np.zeros((y.shape[0], self.classes_.shape[0]), dtype=np.float64)
        Y[np.arange(y.shape[0]), y_idx] = 1.0
        return self._fit_targets(X, Y)

    def decision_function(self, X):
        """Scores k(x, X) alpha, shape (n, n_classes); for two classes, score[1] - score[0]."""
        scores = self._scores(X)
        if self.classes_.shape[0] == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def predict(self, X):
        """Class with the largest score."""
        scores = self._scores(X)
        return self.classes_[np.argmax(scores, axis=1)]


class KernelInterpolationRegressor(MultiOutputMixin, RegressorMixin, _KernelInterpolationBase):
    """Exact kernel interpolation regressor (minimum-RKHS-norm interpolant of y).

    Same parameters as :class:`KernelInterpolator`. ``y`` may be 1-D or 2-D (multi-output);
    ``predict`` returns the same shape. Attributes: ``dual_coef_`` (n_samples,) or
    (n_samples, n_outputs), ``X_fit_``, ``n_features_in_``, ``bandwidth_``, ``rkhs_norm_``,
    ``fit_stats_``.
    """

    def fit(self, X, y):
        _check_finite_y(y)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=True,
                             multi_output=True)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        self._fit_targets(X, y.reshape(y.shape[0], -1))
        if self._y_1d:
            self.dual_coef_ = self.dual_coef_[:, 0]
        return self

    def predict(self, X):
        scores = self._scores(X)
        return scores[:, 0] if self._y_1d else scores
