"""The norm measures registered by name and paper (``MEASURES``) and ``compute_norm_measures``, which
folds the per-layer statistics, path norms and Lipschitz constants into each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from kernelfit.errors import InputError

from .graph import analyse_graph
from .layers import fold_batchnorm, layer_statistics
from .margin_stats import check_xy, margin
from .path import path_norm


@dataclass(frozen=True)
class Measure:
    """A registered norm measure ``function(layer_stats, path_norms, lipschitz) -> complexity``.

    ``kind``: "product" (a product over the layers of a chain; needs :func:`analyse_graph` to find
    a chain) or "path" (defined on any DAG of the supported layers). ``power``: the paper's figure
    plots ``(complexity / margin) ** power`` (:attr:`convention` says so in words).
    """

    function: Callable
    paper: str
    description: str
    kind: str
    power: int
    convention: str


def _prod(xs: Iterable[float]) -> float:
    return float(math.prod(xs))


def _l2(stats, paths, lip):
    return _prod(s["frobenius"] for s in stats)


def _spectral(stats, paths, lip):
    return lip * _prod(s["spectral"] for s in stats)


def _bartlett(stats, paths, lip):
    spec = [s["spectral"] for s in stats]
    if any(v == 0 for v in spec):
        return 0.0
    return lip * _prod(spec) * sum((s["l21"] / s["spectral"]) ** (2.0 / 3.0) for s in stats) ** 1.5


def _neyshabur2018(stats, paths, lip):
    spec = [s["spectral"] for s in stats]
    if any(v == 0 for v in spec):
        return 0.0
    return lip * _prod(spec) * math.sqrt(sum((s["frobenius"] / s["spectral"]) ** 2 for s in stats))


_SQUARED = ("Neyshabur et al. 2017, Fig. 1: capacity = {what}^2 / margin^2; the architecture-only constants "
            "({const}) are dropped: they cancel between networks of one architecture")

MEASURES: dict[str, Measure] = {
    "l2": Measure(_l2, "Neyshabur et al. 2017 (Sec. 2.1)", "product over layers of the Frobenius norm of the weights",
                  "product", 2, _SQUARED.format(what="prod_i ||W_i||_F", const="4^d")),
    "l1-path": Measure(lambda st, pn, lip: pn[1], "Neyshabur et al. 2015/2017",
                       "sum over input-to-output paths of the product of |w| (bias paths included)",
                       "path", 2, _SQUARED.format(what="(sum_paths prod |w|)", const="2^(2d)")),
    "l2-path": Measure(lambda st, pn, lip: pn[2], "Neyshabur et al. 2015/2017",
                       "square root of the sum over paths of the product of w^2 (average-pool edges 1/k included)",
                       "path", 2, _SQUARED.format(what="sqrt(sum_paths prod w^2)", const="prod_i 4 h_i")),
    "spectral": Measure(_spectral, "Neyshabur et al. 2017; Bartlett et al. 2017",
                        "product over layers of the operator (spectral) norm, convs on their true input shape, times the "
                        "Lipschitz constant of each pool (max: sqrt(max window overlap); average: its operator norm)",
                        "product", 2, _SQUARED.format(what="prod_i ||W_i||_2", const="prod_i h_i")),
    "spectral-complexity": Measure(_bartlett, "Bartlett, Foster, Telgarsky 2017",
                                   "prod rho_i ||A_i||_2 * (sum (||A_i^T||_{2,1} / ||A_i||_2)^(2/3))^(3/2), reference "
                                   "matrices 0, rho_i the Lipschitz constants of the pools",
                                   "product", 1, "Bartlett et al. 2017, Fig. 1: margin-normalised spectral complexity "
                                   "R_A / margin (not squared)"),
    "neyshabur2018": Measure(_neyshabur2018, "Neyshabur, Bhojanapalli, Srebro 2018",
                             "prod ||W_i||_2 * sqrt(sum ||W_i||_F^2 / ||W_i||_2^2) (PAC-Bayes spectral bound), times the "
                             "pools' Lipschitz constants",
                             "product", 2, "Neyshabur et al. 2018, Thm. 1: the bound's complexity term "
                             "prod ||W_i||_2^2 sum ||W_i||_F^2/||W_i||_2^2 / margin^2; constants (B^2 d^2 h ln(dh)) dropped"),
}

PATH_MEASURES = [n for n, m in MEASURES.items() if m.kind == "path"]
PRODUCT_MEASURES = [n for n, m in MEASURES.items() if m.kind == "product"]


def _not_a_chain(reason: str) -> str:
    return (f"the per-layer product is neither the paper's quantity nor a bound on this network: {reason}. "
            f"Measures that apply to any wiring of these layers: {', '.join(PATH_MEASURES)} (path norms).")


def compute_norm_measures(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, names: Sequence[str] | None = None,
                          percentile: float = 5.0, seed: int = 0) -> dict:
    """Every applicable norm measure, raw, divided by the margin and in its paper's convention.

    Returns ``{"margin", "margin_percentile", "measures": {name: {"value", "normalized", "capacity",
    "convention", "paper", "exact"}}, "not_applicable": {name: reason}, "layers": [...],
    "pool_lipschitz": [...]}``. ``normalized`` is ``value / margin`` and ``capacity`` is
    ``normalized ** power`` (the quantity the paper plots); both are ``nan`` when the margin is
    <= 0 (the network does not fit that percentile of the training set). Product measures need a
    chain of layers (:func:`analyse_graph`); on other wirings they are listed in
    ``not_applicable`` with the reason, or, when asked for by ``names``, raise InputError.
    """
    explicit = names is not None
    names = list(MEASURES) if names is None else list(names)
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise InputError(f"unknown measure(s) {unknown}; registered: {list(MEASURES)}.")
    check_xy(X, y)
    example = X[:1]
    folded = fold_batchnorm(model, example)
    graph = analyse_graph(folded, example)
    skipped: dict[str, str] = {}
    if not graph.chain:
        for n in names:
            if MEASURES[n].kind == "product":
                skipped[n] = _not_a_chain(graph.reason)
        if explicit and skipped:
            raise InputError(f"cannot compute {', '.join(skipped)}: {_not_a_chain(graph.reason)}")
    paths, exacts = {}, {}
    for n in names:   # each path norm on its own: l1 stays when l2 is refused (e.g. functional average pools)
        if MEASURES[n].kind != "path":
            continue
        p = int(n[1])
        try:
            paths[p], exacts[p] = path_norm(folded, example, p, fold_bn=False)
        except InputError as e:
            if explicit:
                raise
            skipped[n] = str(e)
    gamma = margin(folded, X, y, percentile)
    stats = []
    if any(MEASURES[n].kind == "product" and n not in skipped for n in names):
        try:
            stats = layer_statistics(folded, example, seed=seed, fold_bn=False)
        except InputError as e:
            if explicit:
                raise
            for n in names:
                if MEASURES[n].kind == "product":
                    skipped.setdefault(n, str(e))
    lip = _prod(m["factor"] for m in graph.pool_lipschitz)
    out = {}
    for n in names:
        if n in skipped:
            continue
        m = MEASURES[n]
        v = float(m.function(stats, paths, lip))
        normalized = (v / gamma) if gamma > 0 else float("nan")
        out[n] = dict(value=v, normalized=normalized, capacity=normalized ** m.power, power=m.power,
                      convention=m.convention, paper=m.paper, description=m.description,
                      exact=(exacts[int(n[1])] if m.kind == "path" else True))
    if gamma <= 0:
        for v in out.values():
            v["note"] = (f"normalized and capacity are undefined: the margin ({gamma:.4g}) is <= 0, so the network "
                         f"misclassifies at least {percentile:g}% of the training set")
    return dict(margin=gamma, margin_percentile=percentile, measures=out, not_applicable=skipped, layers=stats,
                pool_lipschitz=graph.pool_lipschitz, chain=graph.chain)
