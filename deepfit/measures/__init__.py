"""Norm, margin, sharpness and PAC-Bayes complexity measures for trained networks.

Modules: ``layers`` (tracing, batch-norm folding, per-layer norms), ``margin_stats`` (margins),
``graph`` (is it a chain; Lipschitz constants between layers), ``path`` (path norms), ``registry``
(``MEASURES``, ``compute_norm_measures``), ``flatness`` (sharpness, PAC-Bayes). Import from
``deepfit.measures``.

The measures follow Neyshabur, Bhojanapalli, McAllester and Srebro, "Exploring generalization in
deep learning" (NeurIPS 2017), with the spectral bounds of Bartlett, Foster and Telgarsky (2017)
and Neyshabur, Bhojanapalli and Srebro (ICLR 2018). They work on any ``nn.Module`` built from
``Linear``, ``Conv2d``, ``ReLU`` (module or ``torch.relu``), ``MaxPool2d``/``AvgPool2d``/
``AdaptiveAvgPool2d``, ``BatchNorm1d/2d`` (folded when directly after a Linear/Conv2d, else an affine
layer of its own), LeakyReLU/ELU/Tanh/GELU/Sigmoid/Softplus (product measures), ``Flatten``, ``Unflatten``,
``Dropout`` and ``Identity``; path norms in any wiring where branches are concatenated or added,
per-layer products on chains of layers (see Conventions).

Conventions
-----------
* Batch norm is folded into the preceding Linear/Conv2d (eval-mode statistics) before the norms are
  measured (:func:`fold_batchnorm`); one that cannot be folded is an affine layer with operator norm
  ``max |gamma / sqrt(var + eps)|``. Sharpness and PAC-Bayes perturb the model's own parameters.
  Every measure works on a copy in eval mode; the caller's model
  keeps its mode, weights and ``requires_grad`` flags.
* Every norm measure is a per-layer statistic folded by an operator (product or sum), registered
  in :data:`MEASURES` as ``name -> Measure(function, paper, description, kind, power, convention)``.
  Each is reported three ways: ``value`` (the norm itself), ``normalized = value / margin`` and
  ``capacity = normalized ** power``, the quantity the paper plots: ``gamma^-2 prod ||W_i||_F^2``
  and the like for Neyshabur et al. 2017/2018 (power 2), ``R_A / gamma`` for Bartlett et al.
  (power 1). ``margin`` is the 5th percentile of ``f_y(x) - max_{j != y} f_j(x)`` over the
  training set (:func:`margin`). Architecture-only constants (``4^d``, widths ``h_i``, log factors,
  input norm) are left out: they cancel in every comparison between networks of one architecture
  (true vs random labels, growing training sets).
* Product measures (``kind="product"``) are defined for a *chain* of layers: each Linear/Conv2d
  fed by the one before through ReLU, pooling and reshapes. :func:`analyse_graph` checks this on
  the autograd graph of one forward pass; on branched networks (concatenation, residual addition,
  shared layers) or with other operations between layers (e.g. LocalResponseNorm) the product over
  all layers is neither the paper's quantity nor a bound, so those measures are not computed and
  the reason is returned. Pools can enlarge distances: an overlapping max pool has Lipschitz
  constant ``sqrt(max number of windows covering one input)`` (2 for 3x3 windows of stride 2), an
  average pool its operator norm, which exceeds 1 for an adaptive pool that upsamples or a divisor
  below the window size (``count_include_pad=False``, ``divisor_override``). The spectral measures
  multiply by each pool's constant (Bartlett et al.'s ``rho_i``), so they stay Lipschitz bounds. A
  discontinuous activation (``nn.Threshold`` with value != threshold, ``nn.Hardshrink``) has no
  Lipschitz constant: the product measures are refused with the module named.
* Path norms (``kind="path"``) count every path from an input unit or a bias (a constant-1 unit)
  to an output unit through the dense operator each layer applies, on any DAG of the supported
  layers. Average pools are edges of weight ``1/window``, raised to the power p like every other
  edge. A max-pool forwards one input per window, chosen by the data; the path norm here replaces
  it by a *sum* over its window and so is an upper bound (``exact=False`` is recorded).
* Per-layer norms of a conv layer: Frobenius norm of its kernel (as in the papers' code);
  spectral norm = the true operator norm of the convolution on the input shape it actually
  receives (power iteration with ``conv2d`` / ``conv_transpose2d``), not the norm of the reshaped
  kernel; the (2,1) norm of Bartlett et al. is computed on the dense operator too.
* Stochastic estimates return ``(estimate, stderr, n_samples)``; every random choice takes a seed
  and uses its own ``torch.Generator``; nothing is seeded globally.
"""

# The public face of deepfit.measures: every name users import lives in one module below and is
# imported here (layers -> margin_stats -> graph -> path -> registry, flatness beside).
from .flatness import (
    SHARPNESS_STEPS,
    cross_entropy_loss,
    pac_bayes_at_sharpness,
    pac_bayes_kl,
    pac_bayes_noise,
    pac_bayes_sweep,
    sharpness,
)
from .graph import GraphInfo, analyse_graph, gelu_lipschitz
from .layers import LayerInfo, conv_operator_norm, fold_batchnorm, layer_statistics, trace_layers
from .margin_stats import check_xy, margin, margins, margins_from_logits
from .path import path_norm
from .registry import MEASURES, PATH_MEASURES, PRODUCT_MEASURES, Measure, compute_norm_measures

__all__ = [
    "LayerInfo",
    "Measure",
    "MEASURES",
    "PATH_MEASURES",
    "PRODUCT_MEASURES",
    "SHARPNESS_STEPS",
    "GraphInfo",
    "analyse_graph",
    "gelu_lipschitz",
    "trace_layers",
    "fold_batchnorm",
    "check_xy",
    "margins",
    "margins_from_logits",
    "margin",
    "conv_operator_norm",
    "layer_statistics",
    "path_norm",
    "compute_norm_measures",
    "sharpness",
    "pac_bayes_kl",
    "pac_bayes_noise",
    "pac_bayes_sweep",
    "pac_bayes_at_sharpness",
    "cross_entropy_loss",
]
