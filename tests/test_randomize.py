"""Tests for kernelfit.randomize: statistics of each randomization, determinism, no in-place
modification, validation of bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from kernelfit import randomize as R
from kernelfit.data import Dataset
from kernelfit.errors import InputError

K = 10


def rng(seed=0):
    return np.random.default_rng(seed)


def labels(n=50_000, k=K, seed=123):
    return rng(seed).integers(0, k, n)


def gray(n=64, h=6, w=5, seed=7):
    return rng(seed).integers(0, 256, (n, h, w), dtype=np.uint8)


def color(n=64, h=4, w=4, seed=8):
    return rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def toy_dataset(n=2000, m=500, shape=(6, 6), k=K, seed=0):
    g = rng(seed)
    return Dataset("toy", g.integers(0, 256, (n, *shape), dtype=np.uint8), g.integers(0, k, n),
                   g.integers(0, 256, (m, *shape), dtype=np.uint8), g.integers(0, k, m),
                   tuple(str(i) for i in range(k)), "mem")


def binomial_tol(q, n, z=5.0):
    return z * math.sqrt(q * (1 - q) / n) + 1.0 / n


# ---- labels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_corrupt_labels_fraction_matches_p_times_1_minus_1_over_k(p):
    y = labels()
    new, frac = R.corrupt_labels(y, p, K, rng(1))
    assert new.shape == y.shape and new.dtype == y.dtype
    assert frac == pytest.approx(np.mean(new != y))
    q = p * (1 - 1 / K)
    assert q == pytest.approx(R.expected_fraction_changed(p, K))
    assert abs(frac - q) <= binomial_tol(q, len(y)), (frac, q)
    assert new.min() >= 0 and new.max() < K


def test_corrupt_labels_replacements_are_uniform_and_may_keep_the_class():
    y = np.zeros(60_000, np.int64)  # all class 0: changed labels are exactly the non-zero ones
    new, frac = R.corrupt_labels(y, 0.5, K, rng(2))
    counts = np.bincount(new, minlength=K)
    # about p/K of the labels were "replaced" by class 0 itself; the rest uniform over 1..9
    assert stats.chisquare(counts[1:]).pvalue > 1e-4
    assert abs(counts[0] / len(y) - (0.5 + 0.5 / K)) <= binomial_tol(0.55, len(y))
    assert frac == pytest.approx(1 - counts[0] / len(y))


def test_random_labels_uniform_and_independent_of_y():
    y = labels(100_000)
    new = R.random_labels(y, K, rng(3))
    assert new.shape == y.shape and new.dtype == y.dtype
    assert stats.chisquare(np.bincount(new, minlength=K)).pvalue > 1e-4
    agree = np.mean(new == y)
    assert abs(agree - 1 / K) <= binomial_tol(1 / K, len(y))
    table = np.histogram2d(y, new, bins=K)[0]  # independence of old and new labels
    assert stats.chi2_contingency(table).pvalue > 1e-4


def test_label_functions_deterministic_and_seed_dependent():
    y = labels(1000)
    a, fa = R.corrupt_labels(y, 0.3, K, rng(5))
    b, fb = R.corrupt_labels(y, 0.3, K, rng(5))
    c, _ = R.corrupt_labels(y, 0.3, K, rng(6))
    assert np.array_equal(a, b) and fa == fb and not np.array_equal(a, c)
    assert np.array_equal(R.corrupt_labels(y, 0.3, K, 5)[0], a)  # an int seed means default_rng(seed)
    assert np.array_equal(R.random_labels(y, K, rng(5)), R.random_labels(y, K, rng(5)))
    assert not np.array_equal(R.random_labels(y, K, rng(5)), R.random_labels(y, K, rng(6)))


def test_label_functions_do_not_modify_input():
    y = labels(1000)
    y.setflags(write=False)  # any in-place write would raise
    R.corrupt_labels(y, 1.0, K, rng(0))
    R.random_labels(y, K, rng(0))


@pytest.mark.parametrize("call, match", [
    (lambda: R.corrupt_labels(labels(10), 1.5, K, rng()), r"\[0, 1\]"),
    (lambda: R.corrupt_labels(labels(10), -0.1, K, rng()), r"\[0, 1\]"),
    (lambda: R.corrupt_labels(labels(10), float("nan"), K, rng()), r"\[0, 1\]"),
    (lambda: R.corrupt_labels(labels(10), 0.5, 1, rng()), "num_classes"),
    (lambda: R.corrupt_labels(np.array([0, 10]), 0.5, K, rng()), r"\[0, 10\)"),
    (lambda: R.corrupt_labels(np.zeros((3, 2), int), 0.5, K, rng()), "1-D"),
    (lambda: R.corrupt_labels(labels(10), 0.5, K, None), "Generator"),
    (lambda: R.random_labels(labels(10), K, np.random.RandomState(0)), "Generator"),
])
def test_label_functions_reject_bad_input(call, match):
    with pytest.raises(InputError, match=match):
        call()


# ---- pixels ---------------------------------------------------------------------------------

def test_shuffle_pixels_one_permutation_for_train_and_test():
    xtr, xte = gray(50), gray(20, seed=9)
    a, b, perm = R.shuffle_pixels(xtr, xte, rng(0))
    assert a.shape == xtr.shape and b.shape == xte.shape and a.dtype == np.uint8
    assert sorted(perm.tolist()) == list(range(30)) and not np.array_equal(perm, np.arange(30))
    assert np.array_equal(a.reshape(50, -1), xtr.reshape(50, -1)[:, perm])
    assert np.array_equal(b.reshape(20, -1), xte.reshape(20, -1)[:, perm])
    # per-image pixel multisets preserved
    assert np.array_equal(np.sort(a.reshape(50, -1), axis=1), np.sort(xtr.reshape(50, -1), axis=1))
    # the same permutation for every image: recover it from image 0 of an index-valued batch
    idx = np.arange(30, dtype=np.float64).reshape(1, 6, 5).repeat(3, axis=0)
    s1, s2, p2 = R.shuffle_pixels(idx, idx[:1], rng(4))
    assert np.array_equal(s1[0], s1[2]) and np.array_equal(s2[0], s1[0])
    assert np.array_equal(s1[0].ravel(), p2)


def test_shuffle_pixels_color_channels_move_together():
    x = color(10)
    a, b, perm = R.shuffle_pixels(x, x[:3], rng(1))
    assert a.shape == x.shape and perm.shape == (16,)
    assert np.array_equal(a.reshape(10, 16, 3), x.reshape(10, 16, 3)[:, perm])
    assert np.array_equal(b, a[:3])
    with pytest.raises(InputError, match="differ in shape"):
        R.shuffle_pixels(x, gray(3), rng(1))


def test_random_pixels_preserve_multiset_and_differ_per_image():
    base = np.arange(30, dtype=np.uint8).reshape(1, 6, 5)
    x = np.repeat(base, 200, axis=0)  # identical images
    out = R.random_pixels(x, rng(0))
    flat = out.reshape(200, -1)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert all(sorted(r.tolist()) == list(range(30)) for r in flat)  # each image: same multiset
    assert len(np.unique(flat, axis=0)) == 200  # a different permutation for each image
    # positions are uniform: each value lands at each position about 200/30 times
    hits = np.array([(flat == v).sum(axis=0) for v in range(30)])
    assert stats.chisquare(hits.ravel()).pvalue > 1e-4
    y = gray(5)
    assert np.array_equal(np.sort(R.random_pixels(y, rng(1)).reshape(5, -1), 1), np.sort(y.reshape(5, -1), 1))


def test_random_pixels_color_and_chunking(monkeypatch):
    monkeypatch.setattr(R, "_CHUNK", 7)  # several blocks
    x = color(30)
    out = R.random_pixels(x, rng(2))
    for i in range(30):
        before = {tuple(p) for p in x[i].reshape(-1, 3)}
        after = {tuple(p) for p in out[i].reshape(-1, 3)}
        assert before == after  # (r, g, b) pixel tuples stay together
        assert np.array_equal(np.sort(x[i].reshape(-1, 3), axis=0), np.sort(out[i].reshape(-1, 3), axis=0))


def test_pixel_functions_deterministic_and_seed_dependent():
    x = gray(40)
    assert np.array_equal(R.random_pixels(x, rng(3)), R.random_pixels(x, rng(3)))
    assert not np.array_equal(R.random_pixels(x, rng(3)), R.random_pixels(x, rng(4)))
    assert np.array_equal(R.shuffle_pixels(x, x, rng(3))[2], R.shuffle_pixels(x, x, rng(3))[2])
    assert not np.array_equal(R.shuffle_pixels(x, x, rng(3))[2], R.shuffle_pixels(x, x, rng(4))[2])
    assert np.array_equal(R.gaussian_pixels(x, rng(3)), R.gaussian_pixels(x, rng(3)))
    assert not np.array_equal(R.gaussian_pixels(x, rng(3)), R.gaussian_pixels(x, rng(4)))


def test_gaussian_moments_gray():
    x = gray(4000)
    g = R.gaussian_pixels(x, rng(0))
    assert g.dtype == np.float32 and g.shape == x.shape
    n = g.size
    mu, sd = x.mean(), x.std()
    assert abs(g.mean() - mu) <= 5 * sd / math.sqrt(n)
    assert abs(g.std() / sd - 1) <= 5 * math.sqrt(2 / n)
    assert stats.normaltest(g.ravel()[:20000]).pvalue > 1e-4


def test_gaussian_moments_color_per_channel_and_reference(monkeypatch):
    monkeypatch.setattr(R, "_CHUNK", 33)  # blockwise moments must equal the direct ones
    g0 = rng(1)
    ref = np.stack([g0.normal(m, s, (500, 8, 8)) for m, s in ((30, 5), (120, 20), (200, 40))], axis=-1)
    ref = np.clip(ref, 0, 255).astype(np.uint8)
    mean, var = R._channel_moments(ref)
    assert np.allclose(mean, ref.reshape(-1, 3).mean(0)) and np.allclose(var, ref.reshape(-1, 3).var(0))
    x = color(2000)  # shapes come from x, moments from the reference
    g = R.gaussian_pixels(x, rng(2), reference=ref)
    assert g.shape == x.shape and g.dtype == np.float32
    flat = g.reshape(-1, 3).astype(np.float64)
    n = len(flat)
    sd = np.sqrt(var)
    assert np.all(np.abs(flat.mean(0) - mean) <= 5 * sd / math.sqrt(n))
    assert np.all(np.abs(flat.std(0) / sd - 1) <= 5 * math.sqrt(2 / n))
    assert abs(np.corrcoef(flat.T)[0, 1]) < 5 / math.sqrt(n)
    with pytest.raises(InputError, match="channel"):
        R.gaussian_pixels(x, rng(2), reference=gray(5))


def test_pixel_functions_do_not_modify_input():
    x, xt = color(20), color(5, seed=3)
    for a in (x, xt):
        a.setflags(write=False)
    R.shuffle_pixels(x, xt, rng(0))
    R.random_pixels(x, rng(0))
    R.gaussian_pixels(x, rng(0), reference=xt)


# ---- Randomization / apply_randomization ----------------------------------------------------

def test_randomization_validation():
    with pytest.raises(InputError) as e:
        R.Randomization("shuffle")
    for v in R.VARIANTS:
        assert v in str(e.value)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        R.Randomization("corrupt", p=1.2)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        R.Randomization("corrupt", p=-0.5)
    for v in ("true", "random-labels", "shuffled-pixels", "random-pixels", "gaussian"):
        with pytest.raises(InputError, match="only used by variant 'corrupt'"):
            R.Randomization(v, p=0.5)
    with pytest.raises(InputError, match="corrupt_test"):
        R.Randomization("shuffled-pixels", corrupt_test=True)
    with pytest.raises(InputError, match="seed"):
        R.Randomization("corrupt", p=0.1, seed=-1)
    with pytest.raises(InputError, match="seed"):
        R.Randomization("corrupt", p=0.1, seed=True)
    r = R.Randomization("corrupt", p=1, seed=3)
    assert r.p == 1.0 and isinstance(r.p, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.p = 0.5  # frozen
    with pytest.raises(InputError, match="Randomization"):
        R.apply_randomization(toy_dataset(), "corrupt")


def _snapshot(ds):
    return [a.copy() for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)]


@pytest.mark.parametrize("variant", R.VARIANTS)
def test_apply_randomization_never_modifies_input_and_test_labels_stay_clean(variant):
    ds = toy_dataset()
    before = _snapshot(ds)
    r = R.Randomization(variant, p=0.5 if variant == "corrupt" else 0.0, seed=11)
    out, info = R.apply_randomization(ds, r)
    for a, b in zip(before, _snapshot(ds)):
        assert np.array_equal(a, b)
    assert set(info) >= {"variant", "p", "seed", "corrupt_test", "fraction_changed_train",
                         "fraction_changed_test", "test_labels_clean"}
    assert info["variant"] == variant and info["seed"] == 11 and info["corrupt_test"] is False
    assert info["test_labels_clean"] is True and info["fraction_changed_test"] == 0.0
    assert np.array_equal(out.y_test, ds.y_test)
    assert out.classes == ds.classes and out.name == ds.name
    changed = [getattr(out, f) is not getattr(ds, f) for f in ("x_train", "y_train", "x_test", "y_test")]
    for f, ch in zip(("x_train", "y_train", "x_test", "y_test"), changed):
        if ch:  # a new array, never a view into the input
            assert not np.shares_memory(getattr(out, f), getattr(ds, f)), f
    if variant == "gaussian":
        assert out.x_train.dtype == np.float32 and out.x_test.dtype == np.float32
    else:
        assert out.x_train.dtype == np.uint8 and out.x_test.dtype == np.uint8
    if variant in ("true", "corrupt", "random-labels"):
        assert out.x_train is ds.x_train and out.x_test is ds.x_test
    if variant in ("true", "shuffled-pixels", "random-pixels", "gaussian"):
        assert np.array_equal(out.y_train, ds.y_train) and info["fraction_changed_train"] == 0.0


def test_apply_randomization_statistics_and_info():
    ds = toy_dataset(n=20_000, m=5_000)
    out, info = R.apply_randomization(ds, R.Randomization("corrupt", p=0.4, seed=1))
    q = 0.4 * (1 - 1 / K)
    assert info["fraction_changed_train"] == pytest.approx(np.mean(out.y_train != ds.y_train))
    assert abs(info["fraction_changed_train"] - q) <= binomial_tol(q, 20_000)
    out, info = R.apply_randomization(ds, R.Randomization("corrupt", p=0.4, seed=1, corrupt_test=True))
    assert info["test_labels_clean"] is False and info["corrupt_test"] is True
    assert info["fraction_changed_test"] == pytest.approx(np.mean(out.y_test != ds.y_test))
    assert abs(info["fraction_changed_test"] - q) <= binomial_tol(q, 5_000)
    out, info = R.apply_randomization(ds, R.Randomization("random-labels", seed=2))
    assert abs(info["fraction_changed_train"] - 0.9) <= binomial_tol(0.9, 20_000)
    assert np.array_equal(out.y_test, ds.y_test)
    out, info = R.apply_randomization(ds, R.Randomization("random-labels", seed=2, corrupt_test=True))
    assert abs(info["fraction_changed_test"] - 0.9) <= binomial_tol(0.9, 5_000)
    # shuffled pixels: one permutation for train and test
    marker = Dataset("m", np.arange(36, dtype=np.float32).reshape(1, 6, 6).repeat(2, 0), [0, 1],
                     np.arange(36, dtype=np.float32).reshape(1, 6, 6), [1], ("a", "b"))
    mo, _ = R.apply_randomization(marker, R.Randomization("shuffled-pixels", seed=3))
    assert np.array_equal(mo.x_train[0], mo.x_test[0]) and not np.array_equal(mo.x_train[0], marker.x_train[0])
    # gaussian: moments of the TRAIN images, for train and test
    out, _ = R.apply_randomization(ds, R.Randomization("gaussian", seed=4))
    mu, sd = ds.x_train.mean(), ds.x_train.std()
    for x in (out.x_train, out.x_test):
        assert abs(x.mean() - mu) <= 5 * sd / math.sqrt(x.size)
        assert abs(x.std() / sd - 1) <= 5 * math.sqrt(2 / x.size)


@pytest.mark.parametrize("variant", R.VARIANTS[1:])
def test_apply_randomization_deterministic_and_seed_dependent(variant):
    ds = toy_dataset(n=300, m=100)
    kw = dict(p=0.5) if variant == "corrupt" else {}
    a, ia = R.apply_randomization(ds, R.Randomization(variant, seed=5, **kw))
    b, ib = R.apply_randomization(ds, R.Randomization(variant, seed=5, **kw))
    c, _ = R.apply_randomization(ds, R.Randomization(variant, seed=6, **kw))
    assert ia == ib
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not (np.array_equal(a.x_train, c.x_train) and np.array_equal(a.y_train, c.y_train))


def test_apply_randomization_color_dataset():
    g = rng(0)
    ds = Dataset("c", g.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8), g.integers(0, 3, 300),
                 g.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8), g.integers(0, 3, 50), ("a", "b", "c"))
    out, _ = R.apply_randomization(ds, R.Randomization("gaussian", seed=1))
    assert out.x_train.shape == (300, 4, 4, 3) and out.x_train.dtype == np.float32
    m_ref = ds.x_train.reshape(-1, 3).mean(0)
    assert np.allclose(out.x_train.reshape(-1, 3).mean(0), m_ref, atol=5 * 80 / math.sqrt(4800))
    out, _ = R.apply_randomization(ds, R.Randomization("random-pixels", seed=1))
    for i in (0, 7, 299):
        assert sorted(map(tuple, out.x_train[i].reshape(-1, 3))) == sorted(map(tuple, ds.x_train[i].reshape(-1, 3)))
    assert not np.array_equal(out.x_train, ds.x_train)
