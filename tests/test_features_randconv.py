"""Random-conv features: blockwise Gram == Gram of the full matrix; ZCA whitens; brute-force features."""

import numpy as np
import pytest

from kernelfit.errors import InputError, MemoryPlanError
from kernelfit.features.randconv import GramOptions, RandConvFeatures, zca_whitening


@pytest.fixture(scope="module")
def imgs():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (30, 10, 10, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fmap(imgs):
    return RandConvFeatures(n_filters=7, patch_size=4, n_whitening_patches=3000, seed=1).fit(imgs[:24])


def test_zca_whitens():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    x = rng.standard_normal((20000, 6)) @ A + 3.0
    mean, W = zca_whitening(x, eps=0.0)
    z = (x - mean) @ W
    np.testing.assert_allclose(np.cov(z.T), np.eye(6), atol=1e-8)
    np.testing.assert_allclose(W, W.T, atol=1e-12)  # ZCA (not PCA): the symmetric whitening matrix
    # eps > 0 shrinks: covariance eigenvalues s / (s + eps) < 1
    _, W2 = zca_whitening(x, eps=0.5)
    assert np.linalg.eigvalsh(np.cov(((x - mean) @ W2).T)).max() < 1.0


def test_whitened_patches_are_near_white():
    # Whitening was estimated on a random sample of patches; on all patches of the same images the
    # covariance spectrum must be nearly flat (the one zero eigenvalue comes from removing each
    # patch's mean), while the raw normalized patches are far from white.
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    smooth = gaussian_filter(rng.random((60, 16, 16, 3)), sigma=(0, 1.5, 1.5, 0.7))  # correlated pixels
    fmap = RandConvFeatures(n_filters=2, patch_size=4, n_whitening_patches=20000, zca_eps=1e-6,
                            seed=0).fit(smooth)
    wp = fmap.whitened_patches(smooth).reshape(-1, 4 * 4 * 3)
    raw = fmap._raw_patches(smooth).reshape(-1, 4 * 4 * 3)
    ev = np.linalg.eigvalsh(np.cov(wp.T))[1:]
    ev_raw = np.linalg.eigvalsh(np.cov(raw.T))[1:]
    assert 0.6 < ev.min() and ev.max() < 1.4  # sampled estimate, float32 patches
    assert ev_raw.max() / ev_raw.min() > 1000


def _brute_force_features(fmap, img, patch, edges):
    """One image's features from the definition: per-patch contrast normalization, ZCA, filters,
    the symmetric rectifier and sums over the given (start, stop) windows per side."""
    x = img.astype(np.float64) / 255
    oh = x.shape[0] - patch + 1
    z = np.empty((oh, oh, fmap.filters_.shape[0]))
    for a in range(oh):
        for b in range(oh):
            p = x[a : a + patch, b : b + patch, :].ravel()
            p = (p - p.mean()) / np.sqrt(p.var() + fmap.config.contrast_eps)
            z[a, b] = ((p - fmap.mean_) @ fmap.whiten_) @ fmap.filters_.T
    bias = fmap.config.bias
    pos, neg = np.maximum(z - bias, 0), np.maximum(-z - bias, 0)
    return np.concatenate([m[y0:y1, x0:x1].sum(axis=(0, 1)) for m in (pos, neg) for y0, y1 in edges
                           for x0, x1 in edges])


def test_features_match_brute_force(imgs, fmap):
    phi = fmap.transform(imgs[:3], filter_block=3, image_block=2)
    assert phi.shape == (3, 2 * 4 * 7)
    edges = [(0, 4), (4, 7)]  # linspace(0, 7, 3).round() = 0, 4, 7 (3.5 rounds to even 4)
    np.testing.assert_allclose(phi[1], _brute_force_features(fmap, imgs[1], 4, edges), rtol=2e-4, atol=2e-4)


def test_three_by_three_pooling_grid_matches_brute_force(imgs):
    # The full-size CIFAR-10 row under 20% uses pool_grid = 3 (18 features per filter) and bias 1.
    fmap3 = RandConvFeatures(n_filters=5, patch_size=4, pool_grid=3, bias=1.0, zca_eps=1.0,
                             n_whitening_patches=3000, seed=2).fit(imgs[:24])
    phi = fmap3.transform(imgs[:4], filter_block=2, image_block=3)
    assert phi.shape == (4, 2 * 9 * 5) and fmap3.n_features == 90
    edges = [(0, 2), (2, 5), (5, 7)]  # 7 positions per side: linspace(0, 7, 4) = 0, 2.33, 4.67, 7 rounded
    for i in (0, 3):
        np.testing.assert_allclose(phi[i], _brute_force_features(fmap3, imgs[i], 4, edges), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("panels", [False, True])
def test_block_gram_equals_full_gram(imgs, fmap, standardize, panels):
    tr, te = imgs[:24], imgs[24:]
    phi = fmap.transform(imgs).astype(np.float64)
    if standardize:
        mu, sd = phi[:24].mean(0), phi[:24].std(0)
        phi = np.where(sd > 0, (phi - mu) / np.where(sd > 0, sd, 1), 0.0)
    g = fmap.accumulate_gram(tr, te, GramOptions(filter_block=2, image_block=5, standardize=standardize, panels=panels,
                                                 panel_block=10))
    G = g.train.to_dense() if panels else g.train
    scale = np.abs(phi[:24] @ phi[:24].T).max()
    np.testing.assert_allclose(G, phi[:24] @ phi[:24].T, atol=1e-5 * scale)
    np.testing.assert_allclose(g.cross, phi[24:] @ phi[:24].T, atol=1e-5 * scale)
    np.testing.assert_allclose(g.test_diag, (phi[24:] ** 2).sum(1), atol=1e-5 * scale)
    if not panels:
        from scipy.spatial.distance import cdist

        dtr, dte = g.squared_distances()
        np.testing.assert_allclose(dtr, cdist(phi[:24], phi[:24], "sqeuclidean"), atol=1e-4 * scale)
        np.testing.assert_allclose(dte, cdist(phi[24:], phi[:24], "sqeuclidean"), atol=1e-4 * scale)


def test_filters_from_patches_and_seed(imgs):
    a = RandConvFeatures(n_filters=5, patch_size=3, filters="patches", n_whitening_patches=500, seed=3).fit(imgs)
    b = RandConvFeatures(n_filters=5, patch_size=3, filters="patches", n_whitening_patches=500, seed=3).fit(imgs)
    c = RandConvFeatures(n_filters=5, patch_size=3, filters="patches", n_whitening_patches=500, seed=4).fit(imgs)
    np.testing.assert_array_equal(a.filters_, b.filters_)
    assert not np.allclose(a.filters_, c.filters_)
    np.testing.assert_allclose(np.linalg.norm(a.filters_, axis=1), 1.0, rtol=1e-5)
    assert RandConvFeatures(n_filters=32000).n_features == 256000  # the paper's 32,000 filters


def test_bad_inputs(imgs, fmap):
    with pytest.raises(InputError, match="channels"):
        fmap.transform(imgs[:2, :, :, :1])
    with pytest.raises(InputError, match="larger than"):
        RandConvFeatures(patch_size=12).fit(imgs)
    with pytest.raises(InputError, match="channels-first"):
        RandConvFeatures().fit(imgs.transpose(0, 3, 1, 2))
    with pytest.raises(InputError, match="not fitted"):
        RandConvFeatures().transform(imgs)
    with pytest.raises(InputError, match="shape"):
        fmap.transform(imgs.reshape(30, -1))
    big = RandConvFeatures(n_filters=32000, patch_size=4, n_whitening_patches=200).fit(imgs)
    with pytest.raises(MemoryPlanError, match="accumulate_gram"):
        big.transform(np.zeros((50000, 10, 10, 3), np.uint8))  # 50000 x 256000 float32 = 48 GiB
    with pytest.raises(MemoryPlanError, match="Plan"):
        fmap.accumulate_gram(imgs, options=GramOptions(max_bytes=100))


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("panels", [False, True])
def test_interrupted_gram_accumulation_resumes_from_its_checkpoint(imgs, fmap, tmp_path, panels):
    """A run killed after a checkpoint continues from the cache entry and ends with the uninterrupted Gram."""
    from kernelfit.features.cache import GramCache

    tr, te = imgs[:24], imgs[24:]
    kw = dict(image_block=5, panels=panels, panel_block=10)
    full = fmap.accumulate_gram(tr, te, GramOptions(filter_block=2, **kw))
    cache = GramCache(tmp_path)
    key = cache.key({"test": panels})
    saved = []

    def checkpoint_then_die(partial):
        cache.save(key, partial)
        saved.append(partial.filters_done)
        if len(saved) == 2:   # the second checkpoint overwrites the first, then the "machine" dies
            raise _Interrupted

    with pytest.raises(_Interrupted):
        fmap.accumulate_gram(tr, te, GramOptions(filter_block=2, **kw), checkpoint=checkpoint_then_die, checkpoint_every=0)
    assert saved == [2, 4]                      # after every block (checkpoint_every=0), never after the last
    partial = cache.load(key)
    assert not partial.complete and partial.filters_done == 4
    dense = (lambda t: t.to_dense()) if panels else (lambda t: t)
    calls = []
    resumed = fmap.accumulate_gram(tr, te, GramOptions(filter_block=2, **kw), resume=partial,
                                   progress=lambda d, t: calls.append((d, t)))
    assert resumed.complete
    per_filter = fmap.n_features // 7
    assert calls == [(6 * per_filter, fmap.n_features), (7 * per_filter, fmap.n_features)]   # counts from the checkpoint
    for name in ("train_diag", "cross", "test_diag"):    # same blocks, same order: bit for bit
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name))
    np.testing.assert_array_equal(dense(resumed.train), dense(full.train))
    # memory: a resumed run on the CPU needs only the feature blocks beyond the checkpoint it holds
    plan = fmap.gram_plan(24, 6, 2, panels)
    budget = plan["total_bytes"] - plan["gram_bytes"] // 2
    with pytest.raises(MemoryPlanError, match="needs"):
        fmap.accumulate_gram(tr, te, GramOptions(filter_block=2, max_bytes=budget, **kw))
    fmap.accumulate_gram(tr, te, GramOptions(filter_block=2, max_bytes=budget, **kw), resume=cache.load(key))
    # cut at another filter: each column is standardized on its own, so only float32 rounding differs
    again = fmap.accumulate_gram(tr, te, GramOptions(filter_block=3, **kw), resume=cache.load(key))
    np.testing.assert_allclose(dense(again.train), dense(full.train), rtol=1e-5, atol=1e-5 * np.abs(full.train_diag).max())


def test_resume_refuses_a_checkpoint_of_another_accumulation(imgs, fmap, tmp_path):
    tr, te = imgs[:24], imgs[24:]
    parts = []
    fmap.accumulate_gram(tr, te, GramOptions(filter_block=3), checkpoint=lambda p: parts.append(p.filters_done),
                         checkpoint_every=0)
    assert parts == [3, 6]

    def partial(**kw):
        got = []

        def grab(p):
            got.append(p)
            raise _Interrupted
        with pytest.raises(_Interrupted):
            fmap.accumulate_gram(tr, te, GramOptions(filter_block=3, **kw), checkpoint=grab, checkpoint_every=0)
        return got[0]

    complete = fmap.accumulate_gram(tr, te, GramOptions(filter_block=3))
    with pytest.raises(InputError, match="unfinished"):
        fmap.accumulate_gram(tr, te, resume=complete)
    with pytest.raises(InputError, match="train / .* test images"):
        fmap.accumulate_gram(tr[:20], te, resume=partial())
    with pytest.raises(InputError, match="layout"):
        fmap.accumulate_gram(tr, te, GramOptions(panels=True), resume=partial())
    with pytest.raises(InputError, match="panel block"):
        fmap.accumulate_gram(tr, te, GramOptions(panels=True, panel_block=8), resume=partial(panels=True, panel_block=10))
