"""Feature matrices of a dataset, one place for ``kernelfit solve --features`` and ``kernelfit table``.

``dataset_features(ds, "pixels")``   ``x / ds.scale`` (pixels / 255 for images, values as stored for
                                     a user's arrays), not cached (it is one pass over the data)
``dataset_features(ds, "gabor", gabor=GaborConfig(...), cache_dir=...)``
                                     Gabor magnitudes through ``features.cache.cached_transform``:
                                     keyed by the images' hash and the config, so the table and a
                                     solve on the same images share one cache entry

``randconv_gram(ds, RandConvConfig(...), panels=...)``
                                     random-conv features are never materialized (at the paper's
                                     32,000 filters they are 256,000 columns per image): their
                                     standardized Gram is accumulated filter block by filter block
                                     (``RandConvFeatures.accumulate_gram``) through ``GramCache``,
                                     keyed by both splits' hashes, the config and the layout, with
                                     checkpoints that let an interrupted run continue
"""

from __future__ import annotations

import time

import numpy as np

from ..catalog import FEATURE_KINDS  # randconv gives a Gram (randconv_gram), not a matrix
from ..errors import InputError

__all__ = ["FEATURE_KINDS", "dataset_features", "randconv_gram"]



def dataset_features(ds, kind: str = "pixels", *, gabor=None, cache_dir=None, dtype=np.float32,
                     with_test: bool = True):
    """``(F_train, F_test or None, info)`` for ``ds`` (a ``kernelfit.data.Dataset``).

    ``info`` is what a record says about the features: kind, config, n_features, cache key.
    """
    from ..data import to_features

    if kind not in ("pixels", "gabor"):
        raise InputError(f"dataset_features builds 'pixels' or 'gabor' feature matrices, got {kind!r} "
                         f"(random-conv features come as a Gram: randconv_gram).")
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


def randconv_gram(ds, cfg, *, panels: bool, cache_dir=None, use_cache: bool = True, filter_block: int = 250,
                  device=None, progress=None, checkpoint_minutes: float = 30.0, timings: dict | None = None,
                  label: str = "", log_prefix: str = "[kernelfit]"):
    """The standardized random-conv feature Gram of ``ds`` (train x train and test x train).

    Returns ``(GramBlocks, fitted RandConvFeatures, cache info or None)``. With the cache, a complete
    entry is reused, an unfinished checkpoint is continued, and the finished Gram is saved before any
    solve (hours of features survive a crash there).
    """
    from ..progress import Heartbeat, get_logger
    from .cache import GramCache, hash_array
    from .randconv import GramOptions, RandConvFeatures

    log = get_logger("kernelfit.features")

    def say(text):
        log.info(text if log_prefix == "[kernelfit]" else f"{log_prefix} {text}")

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    say(f"random-conv features: fitting {cfg.n_filters} filters on {len(ds.x_train)} images ...")
    fmap = RandConvFeatures(cfg).fit(ds.x_train)
    if progress is None:   # a line every few seconds of the feature + Gram pass (hours on a CPU at full size)
        beat = Heartbeat(log)

        def progress(done, total):
            beat.tick(f"random-conv features + Gram: {done} of {total} features ({time.perf_counter() - t0:.0f} s)")
    cache = GramCache(cache_dir) if use_cache else None
    g = checkpoint = info = None
    if cache is not None:
        key = cache.key({"train": hash_array(ds.x_train), "test": hash_array(ds.x_test),
                         "features": cfg.to_dict(), "standardize": True,
                         "layout": "panels" if panels else "dense"})
        meta = {"features": cfg.to_dict(), "dataset": label}
        g = cache.load(key)
        if g is None or not g.complete:   # hours of features must not end in a full disk: refuse before
            from ..places import check_free_space

            n, m = len(ds.x_train), len(ds.x_test)
            train = n * (n + 1) // 2 if panels else n * n
            # float64 sums, plus the previous checkpoint kept on disk until a new one is complete
            check_free_space(cache.dir, 2 * 8 * (train + m * n), "--cache-dir", "the feature Gram and its checkpoint")
        info = {"dir": str(cache.dir), "key": key, "hit": g is not None and g.complete,
                "resumed_from_filters": None if g is None or g.complete else g.filters_done}
        if g is not None and not g.complete:
            say(f"continuing the feature Gram checkpoint {key} after {g.filters_done} of {cfg.n_filters} filters")

        def checkpoint(partial):   # hours of features on a CPU survive an interruption
            t_save = time.perf_counter()
            cache.save(key, partial, meta)
            timings["gram_checkpoints_s"] = timings.get("gram_checkpoints_s", 0.0) + time.perf_counter() - t_save
            say(f"feature Gram checkpoint: {partial.filters_done} of {cfg.n_filters} filters ({cache.dir}, key {key})")
    if g is None or not g.complete:
        say(f"random-conv features + Gram of {len(ds.x_train)} + {len(ds.x_test)} images ...")
        g = fmap.accumulate_gram(ds.x_train, ds.x_test,
                                 GramOptions(filter_block=filter_block, standardize=True, panels=panels, device=device),
                                 progress=progress, checkpoint=checkpoint if checkpoint_minutes > 0 else None,
                                 checkpoint_every=60.0 * checkpoint_minutes, resume=g)
        if cache is not None:
            t_save = time.perf_counter()
            cache.save(key, g, meta)
            timings["gram_cache_save_s"] = time.perf_counter() - t_save
            say(f"saved the feature Gram to {cache.dir} (key {key})")
    say(f"random-conv features + Gram: done in {time.perf_counter() - t0:.1f} s")
    return g, fmap, info
