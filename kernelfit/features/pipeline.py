"""Feature matrices of a dataset, one place for ``kernelfit solve --features`` and ``kernelfit table``.

``dataset_features(ds, "pixels")``   ``x / ds.scale`` (pixels / 255 for images, values as stored for
                                     a user's arrays), not cached (it is one pass over the data)
``dataset_features(ds, "gabor", gabor=GaborConfig(...), cache_dir=...)``
                                     Gabor magnitudes through ``features.cache.cached_transform``:
                                     keyed by the images' hash and the config, so the table and a
                                     solve on the same images share one cache entry

Random-conv features are not materialized here: at the paper's 32,000 filters they are 256,000
columns per image, so ``kernelfit table`` accumulates their Gram filter block by filter block
(``RandConvFeatures.accumulate_gram``) instead.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = ["FEATURE_KINDS", "dataset_features"]

FEATURE_KINDS = ("pixels", "gabor")


def dataset_features(ds, kind: str = "pixels", *, gabor=None, cache_dir=None, dtype=np.float32,
                     with_test: bool = True):
    """``(F_train, F_test or None, info)`` for ``ds`` (a ``kernelfit.data.Dataset``).

    ``info`` is what a record says about the features: kind, config, n_features, cache key.
    """
    from ..data import to_features

    if kind not in FEATURE_KINDS:
        raise InputError(f"unknown feature kind {kind!r}; expected one of {', '.join(FEATURE_KINDS)}.")
    if kind == "pixels":
        Ftr = to_features(ds.x_train, dtype=dtype, scale=ds.scale)
        Fte = to_features(ds.x_test, dtype=dtype, scale=ds.scale) if with_test else None
        what = "pixels / 255" if ds.scale == 255 else f"x / {ds.scale:g}"
        return Ftr, Fte, {"kind": what, "n_features": int(Ftr.shape[1])}
    from .cache import FeatureCache, cached_transform
    from .gabor import GaborBank, GaborConfig

    if ds.x_train.ndim not in (3, 4) or (ds.x_train.ndim == 4 and ds.x_train.shape[-1] != 1):
        raise InputError(f"Gabor features need grayscale images (N, H, W) or (N, H, W, 1); {ds.name} holds "
                         f"{ds.x_train.shape[1:]} per example. Fix: use --features pixels, or pass images.")
    cfg = gabor if gabor is not None else GaborConfig()
    bank = GaborBank(cfg)
    cache = FeatureCache(cache_dir)
    Ftr = np.asarray(cached_transform(bank, ds.x_train, cache), dtype=dtype)
    Fte = np.asarray(cached_transform(bank, ds.x_test, cache), dtype=dtype) if with_test and len(ds.x_test) else None
    return Ftr, Fte, {**cfg.to_dict(), "n_features": int(Ftr.shape[1]), "cache_dir": str(cache.root)}
