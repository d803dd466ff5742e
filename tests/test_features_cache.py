"""Feature cache: hits reuse, data/config changes miss, corrupt or stale entries are rebuilt."""

import json
import warnings

import numpy as np
import pytest

from kernelfit.features.cache import FeatureCache, StaleCacheWarning, cached_transform, hash_array
from kernelfit.features.gabor import GaborBank


class CountingBank(GaborBank):
    calls = 0

    def iter_blocks(self, images, block_size=1024, workers=None):
        CountingBank.calls += 1
        return super().iter_blocks(images, block_size, workers)


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((5, 28, 28)).astype(np.float32)
    CountingBank.calls = 0
    return FeatureCache(tmp_path), x


def test_hit_and_values(setup):
    cache, x = setup
    bank = CountingBank(frequencies=(0.3,), n_orientations=2)
    a = cached_transform(bank, x, cache, block_size=2)
    b = cached_transform(bank, x, cache, block_size=2)
    assert CountingBank.calls == 1
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, GaborBank(frequencies=(0.3,), n_orientations=2).transform(x))
    assert str(cache.root) in str(a.filename)


def test_invalidates_on_data_and_config_change(setup):
    cache, x = setup
    cached_transform(CountingBank(frequencies=(0.3,), n_orientations=2), x, cache)
    y = x.copy()
    y[0, 0, 0] += 1e-3
    cached_transform(CountingBank(frequencies=(0.3,), n_orientations=2), y, cache)
    assert CountingBank.calls == 2
    cached_transform(CountingBank(frequencies=(0.3,), n_orientations=3), x, cache)
    assert CountingBank.calls == 3
    assert hash_array(x) != hash_array(y)
    assert hash_array(x) != hash_array(x.astype(np.float64))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "meta_shape", "meta_missing"])
def test_corrupt_entries_are_rebuilt_not_reused(setup, damage):
    cache, x = setup
    bank = CountingBank(frequencies=(0.3,), n_orientations=2)
    good = np.array(cached_transform(bank, x, cache))
    key = cache.key(hash_array(x), bank.config)
    npy, meta = cache.paths(key)
    if damage == "flip_byte":
        raw = bytearray(npy.read_bytes())
        raw[-3] ^= 0xFF
        npy.write_bytes(bytes(raw))
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-40])
    elif damage == "meta_shape":
        m = json.loads(meta.read_text())
        m["shape"] = [4, m["shape"][1]]
        meta.write_text(json.dumps(m))
    else:
        meta.unlink()
    with pytest.warns(StaleCacheWarning):
        again = cached_transform(bank, x, cache)
    assert CountingBank.calls == 2
    np.testing.assert_array_equal(np.asarray(again), good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry is clean
        cached_transform(bank, x, cache)
    assert CountingBank.calls == 2


# ------------------------------------------------------------------ Gram cache
@pytest.mark.parametrize("panels", [False, True])
def test_gram_cache_roundtrip_and_corruption(tmp_path, panels):
    import warnings

    from kernelfit.features.cache import GramCache, StaleCacheWarning
    from kernelfit.features.randconv import RandConvFeatures

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (23, 9, 9, 3), dtype=np.uint8)
    fmap = RandConvFeatures(n_filters=5, patch_size=3, n_whitening_patches=500, seed=0).fit(imgs[:17])
    g = fmap.accumulate_gram(imgs[:17], imgs[17:], filter_block=2, panels=panels, panel_block=5)
    cache = GramCache(tmp_path)
    key = cache.key({"what": "test", "panels": panels})
    assert cache.load(key) is None
    cache.save(key, g)
    back = cache.load(key)
    dense = (lambda t: t.to_dense()) if panels else (lambda t: t)
    np.testing.assert_array_equal(dense(back.train), dense(g.train))
    for name in ("train_diag", "cross", "test_diag"):
        np.testing.assert_array_equal(getattr(back, name), getattr(g, name))
    assert back.n_features == g.n_features
    if panels:
        assert [P.shape for P in back.train.panels] == [P.shape for P in g.train.panels]
        back.train.panels[0][0, 0] = 7.0   # loaded entries are writable (the table transforms them in place)
    # one flipped byte in a part: detected, deleted, rebuilt by the caller
    part = tmp_path / "grams" / f"{key}.cross.npy"
    raw = bytearray(part.read_bytes())
    raw[-3] ^= 0xFF
    part.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load(key) is None
    assert any(issubclass(w.category, StaleCacheWarning) for w in caught)
    assert not part.exists()
