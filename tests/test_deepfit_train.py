"""Trainer: fitting random labels, the learning-rate schedule, determinism, checkpoint/resume,
preprocessing against independent numpy references, bad input."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from deepfit.data import center_crop, per_image_whiten, prepare_arrays, to_nchw
from deepfit.train import CheckpointMismatchError, TrainConfig, checkpoint_path, config_hash, lr_at_epoch, train
from kernelfit.errors import InputError


def _random_images(n, size=8, channels=1, seed=0, n_classes=10):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    y = rng.integers(0, n_classes, n)  # labels independent of the images: "random labels"
    return x, y


def _data(n=256, size=8, channels=1, seed=0, crop=None, augment=False, preprocess="whiten"):
    x, y = _random_images(n, size, channels, seed)
    xt, yt = _random_images(64, size, channels, seed + 1)
    return prepare_arrays(x, y, xt, yt, 10, crop=crop, augment=augment, preprocess=preprocess,
                          info={"dataset": "synthetic"})


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ fitting random labels

def test_tiny_model_fits_256_random_labels_on_cpu_in_seconds():
    torch.set_num_threads(2)
    data = _data(256, size=16, channels=1)
    cfg = TrainConfig(model="mlp2", width=256, dataset="synthetic", n_train=256, max_epochs=100, crop=None, lr=0.1)
    t0 = time.perf_counter()
    res = train(cfg, data, device="cpu")
    elapsed = time.perf_counter() - t0
    rec = res.record
    assert rec["fitted"] and rec["final_train_acc"] == 1.0
    # Independent check of the claim: recount training accuracy with the returned model.
    res.model.eval()
    with torch.no_grad():
        pred = res.model(data.x_train).argmax(1)
    assert int((pred == data.y_train).sum()) == 256
    assert rec["steps_to_fit"] == rec["epochs_to_fit"] * 2  # 256 / 128 = 2 steps an epoch
    assert rec["stopped_by"] == "target_train_acc"
    # Random labels carry no information about the (random) test labels.
    assert rec["final_test_acc"] < 0.4
    assert elapsed < 30


# ------------------------------------------------------------------ learning-rate schedule

def test_lr_schedule_closed_form():
    assert lr_at_epoch(0.01, 0.95, 0) == 0.01
    assert math.isclose(lr_at_epoch(0.01, 0.95, 2), 0.01 * 0.95 * 0.95)
    assert math.isclose(lr_at_epoch(0.1, 0.95, 100), 0.1 * 0.95**100)


def test_optimizer_uses_decayed_lr_each_epoch():
    # Reference: the step size the optimizer actually holds when it steps (spied), vs the closed form.
    data = _data(64, size=4)
    cfg = TrainConfig(model="mlp2", width=4, dataset="synthetic", crop=None, batch_size=64, momentum=0.0,
                      max_epochs=3, target_train_acc=1.0, lr=0.3, lr_decay=0.5)
    res = train(cfg, data, device="cpu")
    assert [h["lr"] for h in res.record["history"]] == [0.3, 0.15, 0.075]

    seen = []
    orig_step = torch.optim.SGD.step

    def spy(self, closure=None):
        seen.append(self.param_groups[0]["lr"])
        return orig_step(self, closure)

    torch.optim.SGD.step = spy
    try:
        train(cfg, data, device="cpu")
    finally:
        torch.optim.SGD.step = orig_step
    assert seen == [0.3, 0.15, 0.075]


def test_default_learning_rates_follow_the_paper():
    assert TrainConfig(model="inception-small").initial_lr == 0.1
    assert TrainConfig(model="inception-small-nobn").initial_lr == 0.1
    for m in ("mlp-1x512", "mlp-3x512", "alexnet-small"):
        assert TrainConfig(model=m).initial_lr == 0.01
    c = TrainConfig()
    assert (c.momentum, c.lr_decay, c.batch_size) == (0.9, 0.95, 128)


def test_sgd_step_matches_manual_momentum_update():
    # One epoch of the trainer == hand-written heavy-ball SGD on the same batches.
    data = _data(32, size=4)
    cfg = TrainConfig(model="mlp2", width=5, dataset="synthetic", crop=None, batch_size=16, max_epochs=1, lr=0.1,
                      seed=3, weight_decay=0.01)
    res = train(cfg, data, device="cpu")
    from deepfit.models import build_model
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ref = build_model("mlp2", input_shape=data.input_shape, width=5)
    gen = torch.Generator().manual_seed(3 + 1_000_003)
    perm = torch.randperm(32, generator=gen)
    params = list(ref.parameters())
    bufs = [None] * len(params)
    for i in range(0, 32, 16):
        idx = perm[i:i + 16]
        loss = torch.nn.functional.cross_entropy(ref(data.x_train[idx]), data.y_train[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for j, (p, g) in enumerate(zip(params, grads)):
                d = g + 0.01 * p
                bufs[j] = d.clone() if bufs[j] is None else 0.9 * bufs[j] + d
                p -= 0.1 * bufs[j]
    for p, q in zip(ref.parameters(), res.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ determinism, resume

def test_same_seed_same_weights_other_seed_differs():
    data = _data(64)
    cfg = TrainConfig(model="mlp2", width=16, dataset="synthetic", crop=None, max_epochs=2, dropout=0.2)
    a = train(cfg, data, device="cpu").model.state_dict()
    b = train(cfg, data, device="cpu").model.state_dict()
    _state_equal(a, b)
    c = train(cfg.replace(seed=1), data, device="cpu").model.state_dict()
    assert not torch.equal(a["net.1.weight"], c["net.1.weight"])


def test_training_does_not_reseed_the_callers_global_rng():
    data = _data(32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(TrainConfig(model="mlp2", width=8, dataset="synthetic", crop=None, max_epochs=1), data, device="cpu")
    torch.testing.assert_close(torch.rand(3), expected)


class _Killed(Exception):
    pass


def test_resume_after_kill_gives_same_final_weights(tmp_path):
    # Dropout, augmentation (random crops) and momentum all carry state across epochs.
    data = _data(96, size=10, crop=8, augment=True)
    cfg = TrainConfig(model="mlp2", width=32, dataset="synthetic", crop=8, augment=True, dropout=0.3,
                      max_epochs=5, batch_size=32)
    straight = train(cfg, data, device="cpu")

    def kill_after_two(rec):
        if rec["epoch"] == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train(cfg, data, device="cpu", checkpoint_dir=tmp_path, on_epoch_end=kill_after_two)
    assert checkpoint_path(tmp_path, cfg).exists()
    resumed = train(cfg, data, device="cpu", checkpoint_dir=tmp_path)
    assert resumed.record["resumed_from_epoch"] == 2
    _state_equal(straight.model.state_dict(), resumed.model.state_dict())
    strip = lambda h: [{k: v for k, v in e.items() if k != "train_time_s"} for e in h]  # noqa: E731
    assert strip(straight.record["history"]) == strip(resumed.record["history"])


def test_finished_checkpoint_is_not_trained_further(tmp_path):
    data = _data(32)
    cfg = TrainConfig(model="mlp2", width=8, dataset="synthetic", crop=None, max_epochs=2)
    first = train(cfg, data, device="cpu", checkpoint_dir=tmp_path)
    again = train(cfg, data, device="cpu", checkpoint_dir=tmp_path)
    assert again.record["epochs"] == first.record["epochs"] == 2
    _state_equal(first.model.state_dict(), again.model.state_dict())


def test_resume_from_checkpoint_of_other_config_is_refused(tmp_path):
    data = _data(32)
    cfg = TrainConfig(model="mlp2", width=8, dataset="synthetic", crop=None, max_epochs=1)
    train(cfg, data, device="cpu", checkpoint_dir=tmp_path)
    other = cfg.replace(lr=0.5)
    assert config_hash(other) != config_hash(cfg)
    # Put the first run's checkpoint where the second run looks for its own.
    checkpoint_path(tmp_path, cfg).rename(checkpoint_path(tmp_path, other))
    with pytest.raises(CheckpointMismatchError, match="lr"):
        train(other, data, device="cpu", checkpoint_dir=tmp_path)


def test_max_steps_budget():
    data = _data(64)
    cfg = TrainConfig(model="mlp2", width=8, dataset="synthetic", crop=None, batch_size=16, max_steps=6,
                      max_epochs=100)
    rec = train(cfg, data, device="cpu").record
    assert rec["steps"] == 6 and rec["stopped_by"] in ("max_steps", "target_train_acc")


def test_config_hash_is_type_canonical_and_sensitive():
    assert config_hash(TrainConfig(p=0, lr=1)) == config_hash(TrainConfig(p=0.0, lr=1.0))
    assert config_hash(TrainConfig.from_dict(TrainConfig(seed=3).to_dict())) == config_hash(TrainConfig(seed=3))
    assert config_hash(TrainConfig(seed=1)) != config_hash(TrainConfig(seed=2))


def test_best_test_accuracy_is_the_max_over_epochs():
    data = _data(64)
    rec = train(TrainConfig(model="mlp2", width=8, dataset="synthetic", crop=None, max_epochs=4), data,
                device="cpu").record
    accs = [h["test_acc"] for h in rec["history"]]
    assert rec["best_test_acc"] == max(accs)
    assert rec["history"][rec["best_test_epoch"] - 1]["test_acc"] == max(accs)


# ------------------------------------------------------------------ preprocessing

def test_per_image_whitening_matches_tensorflow_formula():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 6, 6, 3)).astype(np.float64)
    x[4] = 7.0  # constant image: std floor 1/sqrt(numel) applies
    ref = np.empty_like(x)
    for i in range(5):
        m, s = x[i].mean(), x[i].std()
        ref[i] = (x[i] - m) / max(s, 1 / np.sqrt(x[i].size))
    got = per_image_whiten(to_nchw(x)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_center_crop_32_to_28_offsets():
    x = np.arange(2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
    got = center_crop(to_nchw(x), 28).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, x[:, 2:30, 2:30, :])


def test_prepare_gives_nchw_28x28_and_paper_input_shape():
    x, y = _random_images(10, size=32, channels=3)
    d = prepare_arrays(x, y, x[:4], y[:4], 10)
    assert d.x_train.shape == (10, 3, 28, 28) and d.input_shape == (3, 28, 28)
    assert d.x_test.shape == (4, 3, 28, 28)


def test_normalize_uses_training_set_channel_statistics():
    x, y = _random_images(50, size=32, channels=3)
    d = prepare_arrays(x, y, x[:5], y[:5], 10, preprocess="normalize")
    flat = d.x_train.permute(1, 0, 2, 3).reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(3), atol=1e-3, rtol=0)


def test_random_crop_batches_are_windows_of_the_image():
    x, y = _random_images(20, size=32, channels=3)
    d = prepare_arrays(x, y, x[:2], y[:2], 10, augment=True)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_train_eval.shape == (20, 3, 28, 28)
    gen = torch.Generator().manual_seed(0)
    out = d.train_batch(d.x_train, gen)
    raw = to_nchw(x)
    offsets = set()
    for i in range(20):  # brute force: which 28x28 window (whitened) equals the crop?
        hits = [(a, b) for a in range(5) for b in range(5)
                if torch.allclose(per_image_whiten(raw[i:i + 1, :, a:a + 28, b:b + 28])[0], out[i], atol=1e-5)]
        assert len(hits) >= 1
        offsets.add(hits[0])
    assert len(offsets) > 1  # crops really move


def test_gaussian_float_images_are_accepted():
    rng = np.random.default_rng(0)
    x = rng.normal(120, 60, (8, 32, 32, 3)).astype(np.float32)
    d = prepare_arrays(x, np.zeros(8, int), x[:2], np.zeros(2, int), 10)
    assert d.x_train.dtype == torch.float32 and torch.isfinite(d.x_train).all()


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_p_outside_unit_interval_is_refused(p):
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        TrainConfig(p=p)


def test_unknown_model_is_refused_with_valid_names():
    with pytest.raises(InputError, match="mlp-1x512"):
        TrainConfig(model="lenet")


def test_crop_larger_than_image_is_refused():
    x, y = _random_images(4, size=8)
    with pytest.raises(InputError, match="crop"):
        prepare_arrays(x, y, x, y, 10, crop=28)


def test_image_size_the_model_cannot_take_is_refused():
    x, y = _random_images(4, size=3, channels=3)
    d = prepare_arrays(x, y, x, y, 10, crop=None)
    with pytest.raises(InputError, match="height/width"):
        train(TrainConfig(model="inception-small", crop=None, max_epochs=1), d, device="cpu")


# ------------------------------------------------------------------ real data (through kernelfit's readers)

@pytest.mark.data
def test_prepare_data_on_real_mnist(shared_data_dir):
    from deepfit.data import prepare_data
    from kernelfit.data import load_dataset
    cfg = TrainConfig(model="mlp2", dataset="mnist", variant="corrupt", p=0.5, n_train=200, n_test=100, data_seed=1)
    d = prepare_data(cfg, data_dir=shared_data_dir)
    assert d.x_train.shape == (200, 1, 28, 28) and d.input_shape == (1, 28, 28)
    flat = d.x_train.reshape(200, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(200), atol=1e-5, rtol=0)
    # Test labels stay clean: they equal the reader's own labels of the same subset.
    ref = load_dataset("mnist", data_dir=shared_data_dir).subset(200, 100, seed=1)
    assert torch.equal(d.y_test, torch.as_tensor(ref.y_test, dtype=torch.int64))
    changed = float((d.y_train != torch.as_tensor(ref.y_train, dtype=torch.int64)).float().mean())
    assert abs(changed - 0.5 * 0.9) < 0.12 and d.info["test_labels"] == "clean"


@pytest.mark.data
@pytest.mark.slow
def test_prepare_data_on_cifar_crops_to_28(shared_data_dir):
    from deepfit.data import prepare_data
    if not (shared_data_dir / "cifar10-jpeg-q75.tar.gz").exists():
        pytest.skip("cifar10-jpeg-q75.tar.gz not in the shared data dir")
    d = prepare_data(TrainConfig(dataset="cifar10", n_train=100, n_test=50), data_dir=shared_data_dir)
    assert d.x_train.shape == (100, 3, 28, 28) and d.x_test.shape == (50, 3, 28, 28)
