"""Feature cache: hits reuse, data/config changes miss, corrupt or stale entries are rebuilt."""

import json
import os
import warnings

import numpy as np
import pytest

from kernelfit.errors import InputError
from kernelfit.features.cache import FeatureCache, StaleCacheWarning, cached_transform, hash_array
from kernelfit.features.gabor import GaborBank
from kernelfit.features.randconv import GramOptions


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
    g = fmap.accumulate_gram(imgs[:17], imgs[17:], GramOptions(filter_block=2, panels=panels, panel_block=5))
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
    current = json.loads((tmp_path / "grams" / f"{key}.json").read_text())["dir"]
    part = tmp_path / "grams" / current / "cross.npy"
    raw = bytearray(part.read_bytes())
    raw[-3] ^= 0xFF
    part.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load(key) is None
    assert any(issubclass(w.category, StaleCacheWarning) for w in caught)
    assert not part.exists()


# ------------------------------------------------------------------ directories we own
class _Killed(BaseException):
    """Stands for kill -9: nothing after it runs in the process."""


def _partial_grams(n_checkpoints=2):
    from kernelfit.features.randconv import RandConvFeatures

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (23, 9, 9, 3), dtype=np.uint8)
    fmap = RandConvFeatures(n_filters=6, patch_size=3, n_whitening_patches=500, seed=0).fit(imgs[:17])
    parts = []
    fmap.accumulate_gram(imgs[:17], imgs[17:], GramOptions(filter_block=2), checkpoint=lambda p: parts.append(
        __import__("copy").deepcopy(p)), checkpoint_every=0)
    return parts[:n_checkpoints]


def test_a_kill_during_a_gram_checkpoint_rewrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import kernelfit.features.cache as cache_mod
    from kernelfit.features.cache import GramCache

    first, second = _partial_grams()
    assert (first.filters_done, second.filters_done) == (2, 4)
    cache = GramCache(tmp_path)
    key = cache.key({"what": "kill"})
    cache.save(key, first)
    real, calls = cache_mod.file_digest, []

    def killed_on_second_part(path, algorithm="blake2b"):
        calls.append(path)
        if len(calls) == 2:
            raise _Killed
        return real(path, algorithm)

    monkeypatch.setattr(cache_mod, "file_digest", killed_on_second_part)
    with pytest.raises(_Killed):
        cache.save(key, second)
    monkeypatch.setattr(cache_mod, "file_digest", real)
    (tmp_path / "grams" / f"{key}.g9").mkdir()          # what a real kill leaves: an unfinished directory
    (tmp_path / "grams" / f"{key}.g9" / "train.npy").write_bytes(b"half")
    del cache   # the run ends (its lock goes with it)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # not stale, not rebuilt
        back = GramCache(tmp_path).load(key)
    assert back is not None and back.filters_done == 2
    np.testing.assert_array_equal(back.train, first.train)
    np.testing.assert_array_equal(back.cross, first.cross)
    assert not (tmp_path / "grams" / f"{key}.g9").exists()   # the orphan is cleaned on the next use


def test_gram_cache_full_disk_is_a_clear_error_and_keeps_the_previous_entry(tmp_path, monkeypatch):
    import errno

    from kernelfit.features.cache import GramCache
    from kernelfit.storage import StorageError

    first, second = _partial_grams()
    cache = GramCache(tmp_path)
    key = cache.key({"what": "enospc"})
    cache.save(key, first)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StorageError, match="Gram cache entry .* needs .* are free") as ei:
        cache.save(key, second)
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert cache.load(key).filters_done == 2


def test_feature_cache_memmap_is_preallocated_full_disk_errors_before_writing(setup, monkeypatch):
    import errno

    from kernelfit.storage import StorageError

    cache, x = setup
    seen = []

    def full(fd, offset, length):
        seen.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    bank = CountingBank(frequencies=(0.3,), n_orientations=2)
    with pytest.raises(StorageError, match=r"--cache-dir .*feature cache entry .* needs .* free \(nothing was written"):
        cached_transform(bank, x, cache)
    assert seen == [x.shape[0] * bank.n_features(28, 28) * 4]    # the whole float32 matrix, reserved up front
    assert CountingBank.calls == 0                              # no feature was computed
    assert sorted(p.name for p in cache.dir.iterdir()) == [".kernelfit-lock", ".kernelfit-owned.json"]


def test_orphan_temporaries_of_ours_are_cleaned_and_nothing_else(setup):
    cache, x = setup
    bank = CountingBank(frequencies=(0.3,), n_orientations=2)
    key = cache.key(hash_array(x), bank.config)
    cache.dir.mkdir(parents=True)
    ours = [f".{key}.npy.abc12_yz.tmp", f"{key}.tmp4242.npy", f".{key}.json.q1w2e3r4.tmp"]
    theirs = ["notes.tmp", ".report.abc12_yz.tmp", "Train_X.npy"]
    for name in ours:
        (cache.dir / name).write_bytes(b"\0" * 64)
    # a directory with foreign files is refused, not cleaned
    (cache.dir / theirs[2]).write_bytes(b"user")
    with pytest.raises(InputError, match="kernelfit did not write it.*Train_X.npy"):
        cached_transform(bank, x, cache)
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted(ours + theirs[2:])
    # once the directory is ours (here: adopted, every entry named like ours), foreign names stay
    (cache.dir / theirs[2]).unlink()
    cached_transform(bank, x, cache)
    for name in theirs[:2]:
        (cache.dir / name).write_bytes(b"user")
    for name in ours:
        (cache.dir / name).write_bytes(b"\0" * 64)
    cache.close()
    FeatureCache(cache.root).load(key)
    left = sorted(p.name for p in cache.dir.iterdir())
    assert left == sorted([".kernelfit-lock", ".kernelfit-owned.json", f"{key}.npy", f"{key}.json"] + theirs[:2])


def test_two_processes_cannot_share_a_cache_directory(setup):
    import subprocess
    import sys
    from pathlib import Path

    from kernelfit.storage import StorageError

    cache, x = setup
    script = ("import sys\nfrom kernelfit.features.cache import FeatureCache\nheld = FeatureCache(sys.argv[1]).claim()\n"
              "print('locked', flush=True)\nsys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", script, str(cache.root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StorageError, match=f"in use by another kernelfit run \\(PID {holder.pid}\\)"):
            cached_transform(CountingBank(frequencies=(0.3,), n_orientations=2), x, cache)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert CountingBank.calls == 0
    cached_transform(CountingBank(frequencies=(0.3,), n_orientations=2), x, cache)   # free again
