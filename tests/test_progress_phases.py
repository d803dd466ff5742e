"""Long phases announce themselves on the kernelfit / deepfit loggers: CIFAR decode, Gabor and random-conv
features, every measure of measure_all (the report's runs: tests/test_report.py reads its stderr lines)."""

from __future__ import annotations

import logging
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch


@pytest.fixture
def records():
    got = []

    class H(logging.Handler):
        def emit(self, record):
            got.append(record)

    h = H(level=logging.DEBUG)
    from kernelfit.progress import set_verbosity

    set_verbosity(0)
    for name in ("kernelfit", "deepfit"):
        logging.getLogger(name).addHandler(h)
    yield got
    for name in ("kernelfit", "deepfit"):
        logging.getLogger(name).removeHandler(h)


def _messages(records, logger_prefix):
    return [r.getMessage() for r in records if r.name.startswith(logger_prefix) and r.levelno == logging.INFO]


def test_cifar_decode_is_announced_from_start_to_end(tmp_path, records):
    from kernelfit.data.cifar import read_cifar10_batches

    rng = np.random.default_rng(0)

    def batch(n):
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        return pickle.dumps({b"data": x, b"labels": [int(v) for v in rng.integers(0, 10, n)]}, 2)

    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(batch(4))
    (tmp_path / "test_batch").write_bytes(batch(3))
    x_tr, _, x_te, _ = read_cifar10_batches(tmp_path)
    assert x_tr.shape == (20, 32, 32, 3) and x_te.shape == (3, 32, 32, 3)
    msgs = _messages(records, "kernelfit.data")
    assert msgs[0].startswith("CIFAR-10 read + decode") and msgs[0].endswith("started (12  steps)")
    assert msgs[-1].startswith("CIFAR-10 read + decode") and " done 12  steps in " in msgs[-1]


def test_gabor_features_of_several_blocks_report_progress(records, monkeypatch):
    import kernelfit.progress as P
    from kernelfit.features.gabor import GaborBank, GaborConfig

    monkeypatch.setattr(P, "HEARTBEAT_S", 0.0)   # every block gives a line
    x = np.random.default_rng(0).random((10, 16, 16))
    F = GaborBank(GaborConfig(frequencies=(0.25,), n_orientations=2, pool=4)).transform(x, block_size=4)
    assert F.shape[0] == 10
    msgs = _messages(records, "kernelfit.features")
    assert msgs[0].startswith("Gabor features (2 filters): started (10 img)")
    assert any(m.startswith("Gabor features (2 filters): 8 img of 10 img") for m in msgs)
    assert msgs[-1].startswith("Gabor features (2 filters): done 10 img")


def test_randconv_gram_announces_fit_features_and_end(records, monkeypatch):
    import kernelfit.progress as P
    from kernelfit.features.pipeline import randconv_gram
    from kernelfit.features.randconv import RandConvConfig

    monkeypatch.setattr(P, "HEARTBEAT_S", 0.0)
    rng = np.random.default_rng(0)
    ds = SimpleNamespace(x_train=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
                         x_test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), name="toy")
    cfg = RandConvConfig(n_filters=8, patch_size=3, n_whitening_patches=200)
    randconv_gram(ds, cfg, panels=True, use_cache=False, filter_block=4, checkpoint_minutes=0)
    msgs = _messages(records, "kernelfit.features")
    assert msgs[0] == "random-conv features: fitting 8 filters on 12 images ..."
    assert "random-conv features + Gram of 12 + 4 images ..." in msgs
    assert any(m.startswith("random-conv features + Gram: ") and " of " in m for m in msgs)
    assert msgs[-1].startswith("random-conv features + Gram: done in ")


def test_measure_all_announces_every_measure_by_default(records):
    from deepfit.suite import MeasureOptions, measure_all

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    X, y = torch.randn(16, 12), torch.arange(16) % 3
    measure_all(net, X, y, MeasureOptions(sharpness_steps=2, pac_alphas=(1e-3,), pac_samples=2),
                groups=("norms", "sharpness", "pac-bayes"))
    msgs = _messages(records, "deepfit.suite")
    for group in ("norms", "sharpness", "pac-bayes"):
        assert f"measure: {group} ..." in msgs
        assert any(m.startswith(f"measure: {group} done (") for m in msgs)


def test_deepfit_quiet_flag_silences_progress_lines(capsys):
    from deepfit.cli import main
    from kernelfit.progress import get_verbosity, set_verbosity

    try:
        assert main(["models", "-q"]) == 0
        assert get_verbosity() == -1
        assert main(["models", "-v", "-v"]) == 0 and get_verbosity() == 2
    finally:
        set_verbosity(0)


def test_image_folder_decode_is_announced_from_start_to_end(tmp_path, records, monkeypatch):
    # the CIFAR-10 JPEG copy is an image folder: its decode must not be a silent minute
    from test_data import write_image_folder

    from kernelfit.data.image_folder import read_image_folder

    monkeypatch.setenv("KERNELFIT_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "imgs", ["a", "b"], 3, 2)
    read_image_folder(tmp_path / "imgs")
    lines = _messages(records, "kernelfit.data")
    assert any("decode images" in m and "started" in m for m in lines), lines
    assert any("decode images" in m and "done" in m for m in lines), lines
