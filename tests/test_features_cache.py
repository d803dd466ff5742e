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
