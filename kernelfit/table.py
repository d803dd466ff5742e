"""The kernel table of Zhang et al. (2017), Section 5: exact kernel interpolation with better features.

``kernelfit table`` (``kernelfit.cli.table``; here :func:`write_table` with a :class:`TableOptions`) runs the rows

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
* larger n: the tiled Cholesky (kernelfit.experiment.run_interpolation / solve.fit_feature_gram) for the
  interpolant only; the ridge columns are then left empty (marked "not run") -- no eigh at that size.

Writes ``<out-dir>/table_<tag>.json`` (full record with provenance) and ``table_<tag>.md``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .catalog import DEFAULT_BANDWIDTH, MAX_REFINE
from .errors import InputError
from .gram import linear_from_gram_inplace, sampled_sqd_from_gram
from .kernels import (
    check_kernel_informative,
    check_kernel_on_data,
    median_bandwidth,
    median_of_pairs,
    median_sample,
    squared_distances,
)
from .validate import bandwidth_rule

__all__ = ["PAPER", "ROWS", "TableOptions", "run_table", "write_table", "markdown_table"]

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


@dataclass(frozen=True)
class TableOptions:
    """What a table run does (``kernelfit table``'s arguments; the record keeps them under ``args``).

    rows: comma list among ``ROWS``; ``*_data``: a registered dataset or a user's .npz; sizes per
    dataset; the Gabor and random-conv feature maps; one bandwidth per row (sigma, 'median' or
    'F*median'); the ridge path (must include 0, the interpolant), chosen by leave-one-out error;
    ``eigh_max_n``: largest n for the dense eigendecomposition, above it the tiled Cholesky (no ridge).
    """

    rows: str = ",".join(ROWS)
    data_dir: str | None = None
    mnist_data: str = "mnist"
    cifar_data: str = "cifar10"
    n_train_mnist: int = 5000
    n_train_cifar: int = 5000
    n_test: int = 2000
    gabor_frequencies: tuple[float, ...] = (0.15, 0.25, 0.35)
    gabor_orientations: int = 8
    gabor_pool: int = 4
    filters: int = 1000
    filter_block: int = 250
    patch_size: int = 6
    filter_kind: str = "patches"
    randconv_bias: float = 0.25
    randconv_pool_grid: int = 2
    randconv_zca_eps: float = 0.1
    randconv_kernel: str = "gaussian"
    # MNIST pixels: Zhang et al.'s sigma = 5, the paper's row this table reproduces; the others are the
    # measured rule per feature map, shared with `kernelfit solve --features` (catalog.DEFAULT_BANDWIDTH)
    bandwidth_mnist_pixels: str = "5"
    bandwidth_mnist_gabor: str = DEFAULT_BANDWIDTH["gabor"]
    bandwidth_cifar_pixels: str = DEFAULT_BANDWIDTH["pixels"]
    bandwidth_cifar_randconv: str = DEFAULT_BANDWIDTH["randconv"]
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    eigh_max_n: int = 12000
    mode: str = "mixed"
    max_refine: int = MAX_REFINE
    progress: bool = False
    device: str | None = None
    no_random_labels: bool = False
    seed: int = 0
    cache_dir: str | None = None
    no_gram_cache: bool = False
    gram_checkpoint_minutes: float = 30.0
    out_dir: str = "."
    tag: str | None = None
    overwrite: bool = False


# ------------------------------------------------------------------------------------- helpers
def _median_distance_from_sqd(D: np.ndarray, max_points: int = 2000, seed: int = 0) -> float:
    idx = median_sample(D.shape[0], max_points, seed)
    return median_of_pairs(D[np.ix_(idx, idx)])


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


def check_sizes(rows, opts) -> None:
    """Every row's --n-train-* and --n-test against its data's split sizes, before any row runs:
    asking for more examples than there are is an error, never silently the whole split."""
    seen = set()
    for row in rows:
        mnist = row.startswith("mnist")
        name = opts.mnist_data if mnist else opts.cifar_data
        flag = "--n-train-mnist" if mnist else "--n-train-cifar"
        if (name, flag) in seen:
            continue
        seen.add((name, flag))
        full_train, full_test = _split_sizes(name)
        _check_size(flag, opts.n_train_mnist if mnist else opts.n_train_cifar, full_train, "training", name)
        _check_size("--n-test", opts.n_test, full_test, "test", name)


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


def _cholesky_rows_features(Ftr, Fte, sigma, label_sets, y_test, k, mode, max_refine=MAX_REFINE, progress=False,
                            device=None):
    """Interpolant only, with the tiled solver (data too large for eigh)."""
    from .experiment import run_interpolation
    from .linalg.options import FactorOptions
    from .solve import SolveOptions

    opts = SolveOptions(kernel="gaussian", bandwidth=float(sigma), mode=mode, max_refine=max_refine,
                        placement=FactorOptions(progress=progress, device=device))
    rec = run_interpolation(Ftr, label_sets, Fte, y_test, k, opts)
    out = {}
    for name, r in rec["results"].items():
        out[name] = {"interp": {"test_error": r["test_error"], "train_error": r["train_error"],
                                "norm": r["rkhs_norm"], "residual_relative": r["residual_relative"]},
                     "ridge": None}
    info = {"solver": f"kernelfit.experiment.run_interpolation (tiled Cholesky, mode={mode})",
            "stats": rec.get("stats")}
    return out, info


def feature_gram_rows(g, bw, label_sets, y_test, k, seed, device=None, max_refine=MAX_REFINE,
                      kernel="gaussian"):
    """Interpolant only, from a feature Gram accumulated in panel storage (large n, no dense n x n):
    ``solve.fit_feature_gram`` on every label set at once, as the table's per-label-set rows.
    Returns (rows, solver info, sigma or None, the sampled median distance)."""
    from .experiment import classification_errors
    from .linalg.options import FactorOptions
    from .solve import SolveOptions, fit_feature_gram

    Y = np.hstack([np.eye(k)[y] for y in label_sets.values()])
    bandwidth = bw.value if bw.kind == "given" else f"{bw.value!r}*median"
    model, scores = fit_feature_gram(g, Y, SolveOptions(bandwidth=bandwidth, max_refine=max_refine,
                                                        placement=FactorOptions(device=device)),
                                     linear=kernel == "linear", seed=seed)
    fit, alpha, R = model.train_scores, model.alpha, model.Y - model.train_scores
    out = {}
    for i, (name, y) in enumerate(label_sets.items()):
        c = slice(i * k, (i + 1) * k)
        out[name] = {"interp": {"test_error": classification_errors(scores[:, c], y_test),
                                "train_error": classification_errors(fit[:, c], y),
                                "norm": float(np.sqrt(max(np.sum(alpha[:, c] * fit[:, c]), 0.0))),
                                "residual_relative": float(np.linalg.norm(R[:, c]) / np.linalg.norm(Y[:, c]))},
                     "ridge": None}
    st = model.stats
    info = {"solver": st["solver"], "factorization": st["factorization"], "refinement": st["refinement"],
            "timings_s": st["timings_s"]}
    return out, info, st["bandwidth"], st["median_distance"]

def _randconv_row(row, opts, ds, rec, bw, label_sets, lambdas, use_eigh, timings, t):
    """cifar-randconv: the standardized random-conv Gram, accumulated block by block (cached)."""
    from .features.pipeline import randconv_gram
    from .features.randconv import RandConvConfig

    k = ds.num_classes
    cfg = RandConvConfig(n_filters=opts.filters, patch_size=opts.patch_size, filters=opts.filter_kind,
                         bias=opts.randconv_bias, pool_grid=opts.randconv_pool_grid,
                         zca_eps=opts.randconv_zca_eps, seed=opts.seed)
    g, fmap, cache_info = randconv_gram(
        ds, cfg, panels=not use_eigh, cache_dir=None if opts.no_gram_cache else opts.cache_dir,
        use_cache=not opts.no_gram_cache, filter_block=opts.filter_block, device=opts.device,
        progress=_progress(opts, "features + Gram"), checkpoint_minutes=opts.gram_checkpoint_minutes,
        timings=timings, label=rec["dataset"], log_prefix="[table]")
    if cache_info is not None:
        rec["gram_cache"] = cache_info
    timings["features_and_gram_s"] = time.perf_counter() - t
    kernel = opts.randconv_kernel
    rec["features"] = {**cfg.to_dict(), "n_features": fmap.n_features, "standardized": True,
                       "kernel_on_features": kernel}
    if use_eigh:
        t = time.perf_counter()
        sqd = sampled_sqd_from_gram(g.train, g.train_diag, seed=opts.seed)
        median = median_of_pairs(sqd)
        if kernel != "linear":   # K = I or all ones: refused before the eigendecomposition
            check_kernel_informative(sqd, "gaussian", bw.resolve(median), f"{row} features")
        del sqd
        if kernel == "linear":   # no distance matrices: the median is recorded only
            sigma = None
            K, Kt = linear_from_gram_inplace(g.train, g.n_features), linear_from_gram_inplace(g.cross, g.n_features)
        else:
            sigma = bw.resolve(median)
            Dtr, Dte = g.squared_distances()
            K, Kt = _gaussian(Dtr, Dte, sigma)
            del Dtr, Dte
        del g
        res, info = _eigh_rows(K, Kt, label_sets, ds.y_test, lambdas, k, t_gram=time.perf_counter() - t)
    else:
        res, info, sigma, median = feature_gram_rows(g, bw, label_sets, ds.y_test, k, opts.seed,
                                                         device=opts.device, max_refine=opts.max_refine,
                                                         kernel=kernel)
    return res, info, sigma, median


def _feature_row(row, opts, ds, rec, bw, label_sets, lambdas, use_eigh, timings, t):
    """pixels / Gabor rows: explicit features, then eigh (small n) or the tiled Cholesky."""
    from .features.gabor import GaborConfig
    from .features.pipeline import dataset_features

    k = ds.num_classes
    gcfg = GaborConfig(frequencies=tuple(opts.gabor_frequencies), n_orientations=opts.gabor_orientations,
                       pool=opts.gabor_pool)
    Ftr, Fte, rec["features"] = dataset_features(ds, "gabor" if row.endswith("gabor") else "pixels",
                                                 gabor=gcfg, cache_dir=opts.cache_dir)
    timings["features_s"] = time.perf_counter() - t

    median = median_bandwidth(Ftr, seed=opts.seed)
    sigma = bw.resolve(median)
    check_kernel_on_data(Ftr, "gaussian", sigma, f"{row} features", seed=opts.seed)   # before the Gram
    if use_eigh:
        t = time.perf_counter()
        Dtr, Dte = _sqd(Ftr, Ftr), _sqd(Fte, Ftr)
        timings["distances_s"] = time.perf_counter() - t
        t = time.perf_counter()
        K, Kt = _gaussian(Dtr, Dte, sigma)
        del Dtr, Dte
        res, info = _eigh_rows(K, Kt, label_sets, ds.y_test, lambdas, k, t_gram=time.perf_counter() - t)
    else:
        res, info = _cholesky_rows_features(Ftr, Fte, sigma, label_sets, ds.y_test, k, opts.mode,
                                            opts.max_refine, opts.progress, device=opts.device)
    return res, info, sigma, median


def run_row(row: str, opts) -> dict:
    t_row = time.perf_counter()
    is_mnist = row.startswith("mnist")
    n_train = opts.n_train_mnist if is_mnist else opts.n_train_cifar
    n_test = opts.n_test
    source = opts.mnist_data if is_mnist else opts.cifar_data
    ds = _load(source, opts.data_dir, n_train, n_test, opts.seed, "--n-train-mnist" if is_mnist else "--n-train-cifar")
    label_sets = {"true": ds.y_train}
    if not opts.no_random_labels:
        label_sets["random"] = _random_labels(ds, opts.seed)
    bw = bandwidth_rule(getattr(opts, f"bandwidth_{row.replace('-', '_')}"), f"--bandwidth-{row}")
    from .data import describe

    default_name = {"mnist": "MNIST", "cifar10": "CIFAR-10 (JPEG q75 copy)"}
    rec = {"row": row, "dataset": default_name.get(source, ds.name), "data": describe(ds, checksums=False),
           "n_train": int(len(ds.y_train)), "n_test": int(len(ds.y_test)), "paper": PAPER[row]}
    timings = {}
    lambdas = np.asarray(opts.lambdas, dtype=np.float64)
    n = len(ds.y_train)
    use_eigh = n <= opts.eigh_max_n

    t = time.perf_counter()
    row_fn = _randconv_row if row == "cifar-randconv" else _feature_row
    res, info, sigma, median = row_fn(row, opts, ds, rec, bw, label_sets, lambdas, use_eigh, timings, t)
    linear = row == "cifar-randconv" and opts.randconv_kernel == "linear"
    rec.update({"kernel": "linear (phi.phi' + 1) / n_features" if linear else "gaussian",
                "bandwidth": None if linear else float(sigma),
                "bandwidth_rule": None if linear else args_bw_text(bw),
                "median_distance": float(median), "results": res, "solver": info})
    timings["row_s"] = time.perf_counter() - t_row
    rec["timings"] = timings
    return rec


def _progress(opts, what):
    """Progress callback (done, total) on stderr when --progress, else None."""
    if not opts.progress:
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
    return f"{bw.value:g}" if bw.kind == "given" else f"{bw.value:g} x median pairwise distance"


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


def run_table(opts, argv=None) -> dict:
    rows = [r.strip() for r in opts.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise InputError(f"unknown rows {bad}; expected a comma list among {', '.join(ROWS)}.")
    if 0.0 not in opts.lambdas:   # each one >= 0: checked by the parser's type
        raise InputError("--lambdas must be >= 0 and include 0 (the interpolant).")
    for row in rows:   # every row's bandwidth and sizes, before the first row runs
        bandwidth_rule(getattr(opts, f"bandwidth_{row.replace('-', '_')}"), f"--bandwidth-{row}")
    check_sizes(rows, opts)
    from .provenance import machine_info, provenance

    record = {"kind": "kernelfit.table", "command": "kernelfit table " + " ".join(argv or []),
              "opts": {k: v for k, v in vars(opts).items()}, "rows": []}
    record["machine"] = machine_info()
    record["provenance"] = provenance(argv)   # at the start: the code that runs, not what HEAD is hours later
    for row in rows:
        print(f"[table] running {row} ...", file=sys.stderr, flush=True)
        r = run_row(row, opts)
        record["rows"].append(r)
        for name, res in r["results"].items():
            brief = {"row": row, "labels": name, "n_train": r["n_train"], "sigma": r["bandwidth"],
                     "interp": res.get("interp"), "ridge": res.get("ridge"), "seconds": r["timings"]["row_s"]}
            print(json.dumps(brief, default=float), flush=True)
    return record


def default_tag(opts) -> str:
    """A table run is named after what it ran: its rows and the sizes that apply to them."""
    rows = [r.strip() for r in opts.rows.split(",") if r.strip()]
    parts = ["-".join(rows)]
    if any(r.startswith("mnist") for r in rows):
        parts.append(f"mnist{opts.n_train_mnist}")
    if any(r.startswith("cifar") for r in rows):
        parts.append(f"cifar{opts.n_train_cifar}")
    if any("randconv" in r for r in rows):
        parts.append(f"f{opts.filters}")
    return "_".join(parts)


def output_paths(opts) -> tuple[Path, Path]:
    """The record and markdown paths; refused before any work when they exist (no --overwrite) or
    cannot be written, so a long run never ends in a refusal."""
    tag = opts.tag or default_tag(opts)
    out = Path(opts.out_dir)
    paths = (out / f"table_{tag}.json", out / f"table_{tag}.md")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not opts.overwrite:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or choose "
                         f"another --out-dir / --tag.")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise InputError(f"--out-dir {out}: {ancestor} is not a writable directory; choose another --out-dir.")
    return paths


def write_table(opts: TableOptions, argv=None) -> tuple[dict, str, tuple[Path, Path]]:
    """Run the table and write ``table_<tag>.json`` (the record) and ``table_<tag>.md`` atomically; the
    output paths are checked before any row runs. Returns (record, markdown, paths)."""
    json_path, md_path = output_paths(opts)
    record = run_table(opts, argv)
    from .results import atomic_file, write_json_atomic

    json_path.parent.mkdir(parents=True, exist_ok=True)
    md = markdown_table(record)
    write_json_atomic(json_path, record, overwrite=True)
    with atomic_file(md_path, "w") as fh:
        fh.write(md)
    return record, md, (json_path, md_path)
