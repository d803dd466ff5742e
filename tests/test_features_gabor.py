"""Gabor bank vs skimage.filters.gabor (independent reference: scipy.ndimage convolution)."""

import numpy as np
import pytest
from skimage.filters import gabor

from kernelfit.errors import InputError, MemoryPlanError
from kernelfit.features.gabor import GaborBank, GaborConfig


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = rng.random((3, 28, 28))
    x[0] = 0.0
    x[0, 8:20, 12:16] = 1.0  # a bar: strong oriented response
    return x


def test_responses_match_skimage_gabor(images):
    bank = GaborBank(GaborConfig(frequencies=(0.15, 0.3), n_orientations=4, bandwidth=1.0))
    r = bank.responses(images)
    assert r.shape == (3, bank.n_filters, 28, 28)
    for i in range(len(images)):
        for j, (f, theta) in enumerate(bank.params):
            re, im = gabor(images[i], frequency=f, theta=theta, bandwidth=1.0, n_stds=3.0)
            np.testing.assert_allclose(r[i, j].real, re, atol=1e-12, rtol=0)
            np.testing.assert_allclose(r[i, j].imag, im, atol=1e-12, rtol=0)


def test_non_square_image_and_other_bandwidth():
    rng = np.random.default_rng(1)
    x = rng.random((2, 24, 31))
    bank = GaborBank(GaborConfig(frequencies=(0.25,), n_orientations=3, bandwidth=1.5, pool=1))
    r = bank.responses(x)
    for j, (f, theta) in enumerate(bank.params):
        re, im = gabor(x[1], frequency=f, theta=theta, bandwidth=1.5)
        np.testing.assert_allclose(r[1, j].real, re, atol=1e-12)
        np.testing.assert_allclose(r[1, j].imag, im, atol=1e-12)


def test_features_are_pooled_magnitudes(images):
    cfg = GaborConfig(frequencies=(0.2,), n_orientations=2, pool=4, include_pixels=True, pixel_weight=0.5)
    bank = GaborBank(cfg)
    feats = bank.transform(images, block_size=2)  # blocks of 2 and 1 images
    assert feats.shape == (3, bank.n_features(28, 28)) == (3, 3 * 49)
    for j, (f, theta) in enumerate(bank.params):
        re, im = gabor(images[2], frequency=f, theta=theta, bandwidth=1.0)
        mag = np.hypot(re, im).reshape(7, 4, 7, 4).mean(axis=(1, 3)).ravel()
        np.testing.assert_allclose(feats[2, j * 49 : (j + 1) * 49], mag, rtol=1e-5, atol=1e-6)
    pix = 0.5 * images[2].reshape(7, 4, 7, 4).mean(axis=(1, 3)).ravel()
    np.testing.assert_allclose(feats[2, 2 * 49 :], pix, rtol=1e-5, atol=1e-6)


def test_uint8_scaled_and_l2_normalized():
    rng = np.random.default_rng(2)
    x8 = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    a = GaborBank(normalize="none").transform(x8)
    b = GaborBank(normalize="none").transform(x8.astype(np.float64) / 255.0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    c = GaborBank(normalize="l2").transform(x8)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    bank = GaborBank()
    with pytest.raises(InputError, match="grayscale"):
        bank.transform(np.zeros((2, 28, 28, 3)))
    with pytest.raises(InputError, match="reshape"):
        bank.transform(np.zeros((2, 784)))
    with pytest.raises(InputError, match="larger than"):
        GaborBank(frequencies=(0.05,)).transform(np.zeros((1, 28, 28)))
    with pytest.raises(InputError, match="pool"):
        GaborBank(pool=5).transform(np.zeros((1, 28, 28)))
    with pytest.raises(InputError, match="frequencies"):
        GaborConfig(frequencies=(0.7,))
    with pytest.raises(MemoryPlanError, match="Plan"):
        bank.transform(np.zeros((10, 28, 28)), max_bytes=1000)
