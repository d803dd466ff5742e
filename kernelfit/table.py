"""The kernel table of Zhang et al. (2017), Section 5: exact kernel interpolation with better features.

``kernelfit table`` (this module's ``main(argv)``) runs the rows

    mnist-pixels     Gaussian kernel on pixels / 255
    mnist-gabor      Gaussian kernel on Gabor wavelet magnitudes (kernelfit.features.gabor)
    cifar-pixels     Gaussian kernel on pixels / 255           -- CIFAR-10 (JPEG q75 copy) here
    cifar-randconv   Gaussian kernel on standardized Coates-Ng random-conv features, the Gram
                     accumulated filter block by filter block (kernelfit.features.randconv);
                     --randconv-kernel linear uses the linear kernel of the features instead

each with the true training labels and with random labels (kernelfit.randomize, seed given; the test
labels stay true), and reports for the interpolant (lambda = 0) and for the best ridge
(lambda chosen by exact leave-one-out error on the training set, never on the test set): test error,
training error and RKHS norm, next to the paper's numbers.

Two solvers:
* n <= --eigh-max-n (default 12,000): one dense float64 Gram, one eigendecomposition
  (kernelfit.ridge) gives the interpolant, the whole ridge path and the LOO errors for both label sets;
* larger n: the lead's tiled Cholesky (kernelfit.solve.run_interpolation / solve_gram) for the
  interpolant only; the ridge columns are then left empty (marked "not run") -- no eigh at that size.

Writes ``<out-dir>/table_<tag>.json`` (full record with provenance) and ``table_<tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .kernels import (
    check_bandwidth,
    check_kernel_informative,
    check_kernel_on_data,
    median_bandwidth,
    median_of_pairs,
    median_sample,
    squared_distances,
)

__all__ = ["PAPER", "ROWS", "main", "run_table", "markdown_table"]

ROWS = ("mnist-pixels", "mnist-gabor", "cifar-pixels", "cifar-randconv")

# Zhang, Bengio, Hardt, Recht, Vinyals, "Understanding deep learning requires rethinking
# generalization", ICLR 2017, Section 5 ("Implicit regularization: an appeal to linear models"),
# numbers stated in the text (also in the CACM 2021 version, Section 5). Only true labels: the paper
# gives no kernel numbers for random labels. Norms are as the paper states them ("approximately").
PAPER = {
    "mnist-pixels": {"test_error": 0.012, "norm": 220.0, "ridge_test_error": None,
                     "source": "Zhang et al. 2017, Sec. 5 text: 1.2% test error, norm ~220, no preprocessing"},
    "mnist-gabor": {"test_error": 0.006, "norm": 390.0, "ridge_test_error": None,
                    "source": "Zhang et al. 2017, Sec. 5 text: 0.6% with a Gabor wavelet transform, norm ~390"},
    "cifar-pixels": {"test_error": 0.46, "norm": None, "ridge_test_error": None,
                     "source": "Zhang et al. 2017, Sec. 5 text: 46% with a Gaussian kernel on pixels"},
    "cifar-randconv": {"test_error": 0.17, "norm": None, "ridge_test_error": 0.15,
                       "source": "Zhang et al. 2017, Sec. 5 text: 17% with a random conv net of 32,000 "
                                 "random filters, 15% with l2 regularization (kernel on the features: "
                                 "not stated precisely in the paper)"},
}

DEFAULT_LAMBDAS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


# ------------------------------------------------------------------------------------- helpers
def _parse_bandwidth(text: str, flag: str = "bandwidth") -> tuple[str, float]:
    """'5' -> ('abs', 5.0); '0.5*median' / 'median' -> ('median', factor)."""
    t = str(text).replace(" ", "")
    if t == "median":
        return "median", 1.0
    kind, number = ("median", t[: -len("*median")]) if t.endswith("*median") else ("abs", t)
    try:
        v = float(number)
    except ValueError:
        raise InputError(f"{flag} must be a number or 'F*median' (e.g. 0.5*median); got {text!r}.") from None
    try:
        check_bandwidth(v)   # finite, > 0, 1 / (2 sigma^2) finite and nonzero (a factor: the same range)
    except InputError as e:
        raise InputError(f"{flag} {text!r}: {e}") from None
    return kind, v


def _median_distance_from_sqd(D: np.ndarray, max_points: int = 2000, seed: int = 0) -> float:
    idx = median_sample(D.shape[0], max_points, seed)
    return median_of_pairs(D[np.ix_(idx, idx)])


def _sampled_sqd_from_gram(G, diag: np.ndarray, max_points: int = 2000, seed: int = 0) -> np.ndarray:
    """Squared feature distances among the seeded sample of ``median_sample`` (the sample of
    ``_median_distance_from_sqd``), from a Gram without building the n x n distance matrix.
    ``G``: a dense Gram or its ``SymmetricPanels``."""
    idx = median_sample(len(diag), max_points, seed)
    d = diag[idx]
    sub = G[np.ix_(idx, idx)] if isinstance(G, np.ndarray) else G.submatrix(idx)
    return d[:, None] + d[None, :] - 2.0 * sub


def _median_distance_from_gram(G, diag: np.ndarray, max_points: int = 2000, seed: int = 0) -> float:
    """The same sample and median as ``_median_distance_from_sqd`` of the Gram's squared distances."""
    return median_of_pairs(_sampled_sqd_from_gram(G, diag, max_points, seed))


def _resolve_sigma(spec: tuple[str, float], median: float) -> float:
    sigma = spec[1] if spec[0] == "abs" else spec[1] * median
    return check_bandwidth(sigma)


def _random_labels(ds, seed: int) -> np.ndarray:
    from .randomize import Randomization, apply_randomization

    rds, _ = apply_randomization(ds, Randomization(variant="random-labels", seed=seed))
    if not np.array_equal(rds.y_test, ds.y_test):  # never corrupt the test set silently
        raise RuntimeError("random-labels randomization changed the test labels")
    return rds.y_train


def _split_sizes(name: str) -> tuple[int, int]:
    """(training, test) examples of a registered dataset or a user's .npz, from headers (no data read)."""
    from .data import DATASETS, REGISTRY, peek_arrays

    if name in DATASETS:
        return REGISTRY[name].n_train, REGISTRY[name].n_test
    shapes = peek_arrays(data=name)
    if "x_test" not in shapes or shapes["x_test"][0][0] == 0:
        raise InputError(f"{name}: the table needs a test split; add x_test and y_test to the .npz.")
    return shapes["x_train"][0][0], shapes["x_test"][0][0]


def _check_size(flag: str, n: int | None, full: int, split: str, name: str) -> None:
    if n is not None and n > full:
        raise InputError(f"{flag} {n} exceeds the {full} {split} examples of {name}; use at most {full} "
                         f"(= the whole split).")


def check_sizes(rows, args) -> None:
    """Every row's --n-train-* and --n-test against its data's split sizes, before any row runs:
    asking for more examples than there are is an error, never silently the whole split."""
    seen = set()
    for row in rows:
        mnist = row.startswith("mnist")
        name = args.mnist_data if mnist else args.cifar_data
        flag = "--n-train-mnist" if mnist else "--n-train-cifar"
        if (name, flag) in seen:
            continue
        seen.add((name, flag))
        full_train, full_test = _split_sizes(name)
        _check_size(flag, args.n_train_mnist if mnist else args.n_train_cifar, full_train, "training", name)
        _check_size("--n-test", args.n_test, full_test, "test", name)


def _load(name: str, data_dir, n_train: int | None, n_test: int | None, seed: int, flag: str = "--n-train"):
    """A registered dataset by name, or a user's .npz (x_train, y_train, x_test, y_test) by path."""
    from .data import DATASETS, load_arrays, load_dataset

    if name in DATASETS:
        ds = load_dataset(name, data_dir=data_dir)
    else:
        ds = load_arrays(data=name)
        if len(ds.y_test) == 0:
            raise InputError(f"{name}: the table needs a test split; add x_test and y_test to the .npz.")
    _check_size(flag, n_train, len(ds.y_train), "training", name)   # the data found may differ from its header
    _check_size("--n-test", n_test, len(ds.y_test), "test", name)
    full_train = n_train is None or n_train == len(ds.y_train)
    full_test = n_test is None or n_test == len(ds.y_test)
    if not (full_train and full_test):
        ds = ds.subset(None if full_train else n_train, None if full_test else n_test, seed=seed)
    return ds


def _sqd(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Float64 squared distances (``squared_distances`` already clamps rounding negatives at 0)."""
    return squared_distances(np.asarray(A, np.float64), np.asarray(B, np.float64))


# ------------------------------------------------------------------------------------- solving
def _gaussian(Dtr, Dte, sigma):
    """(train, test x train) Gaussian-kernel matrices from squared distances."""
    return np.exp(-Dtr / (2.0 * sigma * sigma)), np.exp(-Dte / (2.0 * sigma * sigma))


def _linear_from_gram_inplace(A, n_features: int):
    """A (a Gram block of standardized features) becomes the linear kernel (phi.phi' + 1) / n_features.

    The features are centred over the training set, so their Gram is singular (G 1 = 0); the constant
    feature (an intercept) makes it invertible, and dividing by the feature count puts the diagonal
    near 1, like the Gaussian kernel's, so the same ridge lambdas mean the same thing.
    """
    A += 1.0
    A /= float(n_features)
    return A


def _eigh_rows(K, Kt, label_sets, y_test, lambdas, k, t_gram=0.0):
    """Interpolant + LOO-chosen ridge for every label set, from one eigendecomposition of K (consumed)."""
    from .ridge import EigenRidge

    t = time.perf_counter()
    er = EigenRidge(K, overwrite=True)
    del K
    t_eigh = time.perf_counter() - t
    out = {}
    for name, y in label_sets.items():
        Y = np.eye(k)[y]
        t = time.perf_counter()
        path = er.path(Y, lambdas, K_test=Kt, y_train=y, y_test=y_test)
        i0 = int(np.flatnonzero(path.lambdas == 0.0)[0]) if np.any(path.lambdas == 0.0) else None
        ib = path.best_by_loo()
        rec = {"path": path.to_records(), "best_lambda_by_loo": float(path.lambdas[ib]),
               "ridge": {"lambda": float(path.lambdas[ib]), "test_error": path.test_error[ib],
                         "train_error": path.train_error[ib], "norm": path.norm[ib],
                         "loo_error": path.loo_error[ib]},
               "path_s": time.perf_counter() - t}
        if i0 is not None:
            rec["interp"] = {"test_error": path.test_error[i0], "train_error": path.train_error[i0],
                             "norm": path.norm[i0], "loo_error": path.loo_error[i0]}
        out[name] = rec
    info = {"solver": "eigh (kernelfit.ridge, float64)", "gram_s": t_gram, "eigh_s": t_eigh,
            "min_eigenvalue": er.min_eigenvalue, "max_eigenvalue": er.max_eigenvalue, "n_null": er.n_null}
    return out, info


def _cholesky_rows_features(Ftr, Fte, sigma, label_sets, y_test, k, mode, max_refine=10, progress=False,
                            device=None):
    """Interpolant only, with the lead's tiled solver (data too large for eigh)."""
    from .solve import SolveOptions, run_interpolation

    opts = SolveOptions(kernel="gaussian", bandwidth=float(sigma), mode=mode, max_refine=max_refine,
                        progress=progress, device=device)
    rec = run_interpolation(Ftr, label_sets, Fte, y_test, k, opts)
    out = {}
    for name, r in rec["results"].items():
        out[name] = {"interp": {"test_error": r["test_error"], "train_error": r["train_error"],
                                "norm": r["rkhs_norm"], "residual_relative": r["residual_relative"]},
                     "ridge": None}
    info = {"solver": f"kernelfit.solve.run_interpolation (tiled Cholesky, mode={mode})",
            "stats": rec.get("stats")}
    return out, info


def _gaussian_from_gram_inplace(A, row_sq, col_sq, sigma):
    """A (a Gram block g_ij) becomes exp(-(g_ii + g_jj - 2 g_ij) / (2 sigma^2)) in place."""
    A *= -2.0
    A += row_sq[:, None]
    A += col_sq[None, :]
    np.maximum(A, 0.0, out=A)
    A *= -1.0 / (2.0 * sigma * sigma)
    np.exp(A, out=A)


def _cholesky_rows_panels(g, sigma_spec, label_sets, y_test, k, seed, device=None, max_refine=10,
                          kernel="gaussian"):
    """Interpolant only, from a feature Gram accumulated in panel storage (large n, no dense n x n).

    The float64 panels of the feature Gram and the test x train block become Gaussian-kernel (or, with
    ``kernel="linear"``, linear-kernel) blocks in place; a float32 copy is factored (CPU, or ``device``)
    and the solution refined with float64 residuals ``K @ V`` from the float64 panels
    (``linalg.mixed.solve_refined``); if that cannot reach float64 level, a float64 copy is factored
    instead when memory allows. The test block is kept in
    float32 (predictions only). Memory: n^2/2 x 12 bytes + m x n x 4: 17 GB at n = 50,000, m = 10,000.
    """
    from .linalg.factor import factor
    from .linalg.mixed import solve_refined
    from .linalg.options import FactorOptions
    from .linalg.panels import SymmetricPanels
    from .planning import available_bytes

    P64 = g.train
    d = g.train_diag
    sqd = _sampled_sqd_from_gram(P64, d, seed=seed)   # the same seeded sample as the dense path
    median = median_of_pairs(sqd)
    if kernel != "linear":
        check_kernel_informative(sqd, "gaussian", _resolve_sigma(sigma_spec, median), "the random-conv features")
    del sqd
    if kernel == "linear":
        sigma = None
        for P in P64.panels:
            _linear_from_gram_inplace(P, g.n_features)
        _linear_from_gram_inplace(g.cross, g.n_features)
    else:
        sigma = _resolve_sigma(sigma_spec, median)
        for s0, P in zip(P64.starts, P64.panels):
            _gaussian_from_gram_inplace(P, d[s0:], d[s0 : s0 + P.shape[1]], sigma)
        _gaussian_from_gram_inplace(g.cross, g.test_diag, d, sigma)
    Kt = g.cross.astype(np.float32)   # test predictions only: float32 halves the m x n block during the solve
    g.cross = None
    Y = np.hstack([np.eye(k)[y] for y in label_sets.values()])

    def build(dtype):   # the factor's copy of K (the float64 panels stay for the residuals)
        return SymmetricPanels(n=P64.n, block=P64.block, panels=[P.astype(dtype) for P in P64.panels])

    def fallback():
        need, avail = P64.nbytes, available_bytes()
        return None if need < 0.9 * avail else (
            f"a float64 copy of the Gram ({need / 2**30:.1f} GiB) would not fit in the {avail / 2**30:.1f} GiB available")

    timings = {}
    alpha, R, report, factors = solve_refined(build, lambda G: factor(G, FactorOptions(device=device)).to_dict(),
                                              P64.symmetric_matmul, Y, dtype=np.float32, max_refine=max_refine,
                                              fallback=fallback, timings=timings)
    fit = Y - R
    scores = np.vstack([Kt[r : r + 2048].astype(np.float64) @ alpha for r in range(0, len(Kt), 2048)])
    out = {}
    for i, (name, y) in enumerate(label_sets.items()):
        c = slice(i * k, (i + 1) * k)
        out[name] = {"interp": {"test_error": float(np.mean(np.argmax(scores[:, c], 1) != y_test)),
                                "train_error": float(np.mean(np.argmax(fit[:, c], 1) != y)),
                                "norm": float(np.sqrt(max(np.sum(alpha[:, c] * fit[:, c]), 0.0))),
                                "residual_relative": float(np.linalg.norm(R[:, c]) / np.linalg.norm(Y[:, c]))},
                     "ridge": None}
    return out, {"solver": "kernelfit.linalg.mixed.solve_refined (tiled Cholesky float32 + float64 refinement, "
                           "panels)", "factorization": factors[-1], "refinement": report, "timings_s": timings}, \
        sigma, median


# ------------------------------------------------------------------------------------- rows
def run_row(row: str, args) -> dict:
    t_row = time.perf_counter()
    is_mnist = row.startswith("mnist")
    n_train = args.n_train_mnist if is_mnist else args.n_train_cifar
    n_test = args.n_test
    source = args.mnist_data if is_mnist else args.cifar_data
    ds = _load(source, args.data_dir, n_train, n_test, args.seed, "--n-train-mnist" if is_mnist else "--n-train-cifar")
    k = ds.num_classes
    label_sets = {"true": ds.y_train}
    if not args.no_random_labels:
        label_sets["random"] = _random_labels(ds, args.seed)
    bw = _parse_bandwidth(getattr(args, f"bandwidth_{row.replace('-', '_')}"), f"--bandwidth-{row}")
    from .data import describe

    default_name = {"mnist": "MNIST", "cifar10": "CIFAR-10 (JPEG q75 copy)"}
    rec = {"row": row, "dataset": default_name.get(source, ds.name), "data": describe(ds, checksums=False),
           "n_train": int(len(ds.y_train)), "n_test": int(len(ds.y_test)), "paper": PAPER[row]}
    timings = {}
    lambdas = np.asarray(args.lambdas, dtype=np.float64)
    n = len(ds.y_train)
    use_eigh = n <= args.eigh_max_n

    t = time.perf_counter()
    if row == "cifar-randconv":
        from .features.pipeline import randconv_gram
        from .features.randconv import RandConvConfig

        cfg = RandConvConfig(n_filters=args.filters, patch_size=args.patch_size, filters=args.filter_kind,
                             bias=args.randconv_bias, pool_grid=args.randconv_pool_grid,
                             zca_eps=args.randconv_zca_eps, seed=args.seed)
        g, fmap, cache_info = randconv_gram(
            ds, cfg, panels=not use_eigh, cache_dir=None if args.no_gram_cache else args.cache_dir,
            use_cache=not args.no_gram_cache, filter_block=args.filter_block, device=args.device,
            progress=_progress(args, "features + Gram"), checkpoint_minutes=args.gram_checkpoint_minutes,
            timings=timings, label=rec["dataset"], log_prefix="[table]")
        if cache_info is not None:
            rec["gram_cache"] = cache_info
        timings["features_and_gram_s"] = time.perf_counter() - t
        kernel = args.randconv_kernel
        rec["features"] = {**cfg.to_dict(), "n_features": fmap.n_features, "standardized": True,
                           "kernel_on_features": kernel}
        if use_eigh:
            t = time.perf_counter()
            sqd = _sampled_sqd_from_gram(g.train, g.train_diag, seed=args.seed)
            median = median_of_pairs(sqd)
            if kernel != "linear":   # K = I or all ones: refused before the eigendecomposition
                check_kernel_informative(sqd, "gaussian", _resolve_sigma(bw, median), f"{row} features")
            del sqd
            if kernel == "linear":   # no distance matrices: the median is recorded only
                sigma = None
                K, Kt = _linear_from_gram_inplace(g.train, g.n_features), _linear_from_gram_inplace(g.cross, g.n_features)
            else:
                sigma = _resolve_sigma(bw, median)
                Dtr, Dte = g.squared_distances()
                K, Kt = _gaussian(Dtr, Dte, sigma)
                del Dtr, Dte
            del g
            res, info = _eigh_rows(K, Kt, label_sets, ds.y_test, lambdas, k, t_gram=time.perf_counter() - t)
        else:
            res, info, sigma, median = _cholesky_rows_panels(g, bw, label_sets, ds.y_test, k, args.seed,
                                                             device=args.device, max_refine=args.max_refine,
                                                             kernel=kernel)
    else:
        from .features.gabor import GaborConfig
        from .features.pipeline import dataset_features

        gcfg = GaborConfig(frequencies=tuple(args.gabor_frequencies), n_orientations=args.gabor_orientations,
                           pool=args.gabor_pool)
        Ftr, Fte, rec["features"] = dataset_features(ds, "gabor" if row.endswith("gabor") else "pixels",
                                                     gabor=gcfg, cache_dir=args.cache_dir)
        timings["features_s"] = time.perf_counter() - t

        median = median_bandwidth(Ftr, seed=args.seed)
        sigma = _resolve_sigma(bw, median)
        check_kernel_on_data(Ftr, "gaussian", sigma, f"{row} features", seed=args.seed)   # before the Gram
        if use_eigh:
            t = time.perf_counter()
            Dtr, Dte = _sqd(Ftr, Ftr), _sqd(Fte, Ftr)
            timings["distances_s"] = time.perf_counter() - t
            t = time.perf_counter()
            K, Kt = _gaussian(Dtr, Dte, sigma)
            del Dtr, Dte
            res, info = _eigh_rows(K, Kt, label_sets, ds.y_test, lambdas, k, t_gram=time.perf_counter() - t)
        else:
            res, info = _cholesky_rows_features(Ftr, Fte, sigma, label_sets, ds.y_test, k, args.mode,
                                                args.max_refine, args.progress, device=args.device)
    linear = row == "cifar-randconv" and args.randconv_kernel == "linear"
    rec.update({"kernel": "linear (phi.phi' + 1) / n_features" if linear else "gaussian",
                "bandwidth": None if linear else float(sigma),
                "bandwidth_rule": None if linear else args_bw_text(bw),
                "median_distance": float(median), "results": res, "solver": info})
    timings["row_s"] = time.perf_counter() - t_row
    rec["timings"] = timings
    return rec


def _progress(args, what):
    """Progress callback (done, total) on stderr when --progress, else None."""
    if not args.progress:
        return None
    from .progress import progress_bar

    bar = progress_bar(desc=what, unit="feature", mininterval=5.0)

    def update(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def args_bw_text(bw) -> str:
    return f"{bw[1]:g}" if bw[0] == "abs" else f"{bw[1]:g} x median pairwise distance"


# ------------------------------------------------------------------------------------- output
def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _num(v, fmt="{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def markdown_table(record: dict) -> str:
    m = record.get("machine", {})
    lines = [
        f"Kernel table (Zhang et al. 2017, Sec. 5). Machine: {m.get('cpu_model', '?')}, "
        f"{m.get('usable_cores', '?')} usable cores, {'GPU ' + str(m['gpu']) if m.get('gpu') else 'no GPU'}. "
        f"Command: `{record.get('command', '')}`",
        "",
        "| row | labels | n train / test | features | sigma | interp. test err | interp. train err | "
        "interp. RKHS norm | best ridge (LOO) lambda | ridge test err | ridge train err | ridge norm | "
        "paper test err | paper norm | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        for name, res in r["results"].items():
            it, rd = res.get("interp") or {}, res.get("ridge")
            paper = r["paper"] if name == "true" else {}
            ptest = _pct(paper.get("test_error"))
            if paper.get("ridge_test_error") is not None:
                ptest += f" (ridge {_pct(paper['ridge_test_error'])})"
            lines.append(
                f"| {r['row']} | {name} | {r['n_train']} / {r['n_test']} | {r['features']['n_features']} | "
                f"{'linear' if r['bandwidth'] is None else format(r['bandwidth'], '.3g')} | "
                f"{_pct(it.get('test_error'))} | {_pct(it.get('train_error'))} | "
                f"{_num(it.get('norm'))} | "
                + (f"{rd['lambda']:g} | {_pct(rd['test_error'])} | {_pct(rd['train_error'])} | {_num(rd['norm'])}"
                   if rd else "not run | — | — | —")
                + f" | {ptest} | {_num(paper.get('norm'), '~{:.0f}')} | {r['timings']['row_s']:.0f} s |"
            )
    lines += ["", "Paper numbers: Zhang et al., ICLR 2017, Section 5 text (true labels only; the paper "
              "reports no kernel numbers for random labels). Norms depend on the bandwidth, which the paper "
              "does not state, so compare them within a column, not across papers. CIFAR-10 here is the "
              "JPEG q75 copy."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kernelfit table", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list among {', '.join(ROWS)}")
    ap.add_argument("--data-dir", default=None, help="directory with mnist.npz / CIFAR-10 (else $KERNELFIT_DATA ...)")
    ap.add_argument("--mnist-data", default="mnist", metavar="NAME|FILE.npz",
                    help="data of the mnist-* rows: a registered dataset (mnist, fashion-mnist, kmnist, ...) or "
                         "your .npz with x_train, y_train, x_test, y_test (default mnist)")
    ap.add_argument("--cifar-data", default="cifar10", metavar="NAME|FILE.npz",
                    help="data of the cifar-* rows, likewise (default cifar10)")
    from .cli import _nonneg_float, _nonneg_int, _positive_int, add_feature_map_args

    ap.add_argument("--n-train-mnist", type=_positive_int, default=5000, help="MNIST training points (60000 = full)")
    ap.add_argument("--n-train-cifar", type=_positive_int, default=5000, help="CIFAR-10 training points (50000 = full)")
    ap.add_argument("--n-test", type=_positive_int, default=2000, help="test points per dataset (10000 = full)")

    add_feature_map_args(ap)   # the same feature options (and defaults) as kernelfit solve --features
    ap.add_argument("--bandwidth-mnist-pixels", default="5")
    ap.add_argument("--bandwidth-mnist-gabor", default="0.5*median")
    ap.add_argument("--bandwidth-cifar-pixels", default="0.5*median")
    ap.add_argument("--bandwidth-cifar-randconv", default="0.5*median")
    ap.add_argument("--lambdas", type=_nonneg_float, nargs="+", default=list(DEFAULT_LAMBDAS),
                    help="ridge path (0 = interpolant); lambda chosen by leave-one-out error")
    ap.add_argument("--eigh-max-n", type=_nonneg_int, default=12000,
                    help="largest n for the dense eigh path (~32 n^2 bytes); above it: tiled Cholesky, no ridge")
    ap.add_argument("--mode", default="mixed", choices=("mixed", "float32", "float64"),
                    help="precision of the tiled Cholesky (large n only)")
    ap.add_argument("--max-refine", type=_nonneg_int, default=10, help="mixed mode: at most this many refinement steps")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr (large n)")
    ap.add_argument("--device", default=None,
                    help="torch device for random-conv features + Grams and the large-n Cholesky (e.g. cuda); "
                         "default: CPU")
    ap.add_argument("--no-random-labels", action="store_true")
    ap.add_argument("--seed", type=_nonneg_int, default=0)
    ap.add_argument("--cache-dir", default=None,
                    help="cache root for features and random-conv Grams (default: $KERNELFIT_CACHE or the user cache dir)")
    ap.add_argument("--no-gram-cache", action="store_true",
                    help="do not save / reuse the accumulated random-conv Gram (n^2/2 x 8 bytes + test block on disk)")
    ap.add_argument("--gram-checkpoint-minutes", type=_nonneg_float, default=30.0,
                    help="with the Gram cache, save the unfinished random-conv Gram this often so that an interrupted "
                         "run continues where it stopped when rerun (0: never; default 30)")
    ap.add_argument("--out-dir", default=".",
                    help="where table_<tag>.json / .md are written (default: the current directory)")
    ap.add_argument("--tag", default=None,
                    help="file name tag (default: the rows run and their sizes, e.g. mnist-pixels_mnist5000)")
    ap.add_argument("--overwrite", action="store_true", help="allow replacing existing table_<tag> files")
    return ap


def run_table(args, argv=None) -> dict:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise InputError(f"unknown rows {bad}; expected a comma list among {', '.join(ROWS)}.")
    if 0.0 not in args.lambdas:   # each one >= 0: checked by the parser's type
        raise InputError("--lambdas must be >= 0 and include 0 (the interpolant).")
    for row in rows:   # every row's bandwidth and sizes, before the first row runs
        _parse_bandwidth(getattr(args, f"bandwidth_{row.replace('-', '_')}"), f"--bandwidth-{row}")
    check_sizes(rows, args)
    from .results import machine_info, provenance

    record = {"kind": "kernelfit.table", "command": "kernelfit table " + " ".join(argv or []),
              "args": {k: v for k, v in vars(args).items()}, "rows": []}
    record["machine"] = machine_info()
    record["provenance"] = provenance(argv)   # at the start: the code that runs, not what HEAD is hours later
    for row in rows:
        print(f"[table] running {row} ...", file=sys.stderr, flush=True)
        r = run_row(row, args)
        record["rows"].append(r)
        for name, res in r["results"].items():
            brief = {"row": row, "labels": name, "n_train": r["n_train"], "sigma": r["bandwidth"],
                     "interp": res.get("interp"), "ridge": res.get("ridge"), "seconds": r["timings"]["row_s"]}
            print(json.dumps(brief, default=float), flush=True)
    return record


def default_tag(args) -> str:
    """A table run is named after what it ran: its rows and the sizes that apply to them."""
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    parts = ["-".join(rows)]
    if any(r.startswith("mnist") for r in rows):
        parts.append(f"mnist{args.n_train_mnist}")
    if any(r.startswith("cifar") for r in rows):
        parts.append(f"cifar{args.n_train_cifar}")
    if any("randconv" in r for r in rows):
        parts.append(f"f{args.filters}")
    return "_".join(parts)


def output_paths(args) -> tuple[Path, Path]:
    """The record and markdown paths; refused before any work when they exist (no --overwrite) or
    cannot be written, so a long run never ends in a refusal."""
    tag = args.tag or default_tag(args)
    out = Path(args.out_dir)
    paths = (out / f"table_{tag}.json", out / f"table_{tag}.md")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.overwrite:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or choose "
                         f"another --out-dir / --tag.")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise InputError(f"--out-dir {out}: {ancestor} is not a writable directory; choose another --out-dir.")
    return paths


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    json_path, md_path = output_paths(args)
    record = run_table(args, argv)
    from .results import atomic_file, write_json_atomic

    json_path.parent.mkdir(parents=True, exist_ok=True)
    md = markdown_table(record)
    write_json_atomic(json_path, record, overwrite=True)
    with atomic_file(md_path, "w") as fh:
        fh.write(md)
    print(md)
    print(f"[table] wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
