"""Tests for kernelfit.data: Dataset, to_features, data-dir resolution, the format readers and
load_dataset. Tiny files in every format are written by hand into tmp_path; tests marked
``data`` read the real copies in ../shared/data (or $KERNELFIT_DATA)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from kernelfit import data as D
from kernelfit.data import image_folder
from kernelfit.errors import DataError, InputError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

_USER_CACHE_ENV = os.environ.get("KERNELFIT_CACHE")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Unit tests never touch the user's cache or data dir."""
    monkeypatch.setenv("KERNELFIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("KERNELFIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("KERNELFIT_DATA", raising=False)


# ---- writers for the formats ----------------------------------------------------------------

def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + np.ascontiguousarray(arr, dtype=dt).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False, code: int = 0x08) -> Path:
    raw = idx_bytes(arr, code)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def tiny_mnist(n_train=30, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train) % 10,
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), (np.arange(n_test) * 3) % 10)


def write_mnist_idx(d: Path, arrays, gz=False):
    d.mkdir(parents=True, exist_ok=True)
    for key, arr in zip(("x_train", "y_train", "x_test", "y_test"), arrays):
        name = D.MNIST_IDX_FILES[key] + (".gz" if gz else "")
        write_idx(d / name, np.asarray(arr).astype(np.uint8), gz=gz)


def cifar_batch(x_hwc: np.ndarray, y, protocol=2, str_keys=False) -> bytes:
    flat = x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), 3072)  # official layout: R plane, G, B
    keys = ("data", "labels", "batch_label") if str_keys else (b"data", b"labels", b"batch_label")
    return pickle.dumps({keys[0]: flat, keys[1]: [int(v) for v in y], keys[2]: b"batch"}, protocol=protocol)


def _py2_str(b: bytes) -> bytes:  # a Python 2 ``str`` (SHORT_BINSTRING / BINSTRING opcodes)
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def py2_cifar_batch(flat: np.ndarray, labels) -> bytes:
    """A batch pickled the way Python 2's cPickle wrote the official CIFAR-10 files (protocol 2,
    numpy.core.multiarray._reconstruct, str keys and dtype fields), built opcode by opcode."""
    a = np.ascontiguousarray(flat, dtype=np.uint8)
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
           + b"\x87R(" + _py2_int(1) + b"(" + b"".join(_py2_int(d) for d in a.shape) + b"t"
           + b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R("
           + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
           + b"\x89" + _py2_str(a.tobytes()) + b"tb")
    return (b"\x80\x02}(" + _py2_str(b"data") + arr + _py2_str(b"labels") + b"]("
            + b"".join(_py2_int(int(v)) for v in labels) + b"e" + _py2_str(b"batch_label")
            + _py2_str(b"training batch 1 of 5") + b"u.")


def tiny_cifar(n_per_batch=4, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8) for _ in range(5)]
    ys = [rng.integers(0, 10, n_per_batch) for _ in range(5)]
    xt, yt = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n_test)
    return xs, ys, xt, yt


def write_cifar_dir(d: Path, xs, ys, xt, yt, protocol=2) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(zip(xs, ys), 1):
        (d / f"data_batch_{i}").write_bytes(cifar_batch(x, y, protocol))
    (d / "test_batch").write_bytes(cifar_batch(xt, yt, protocol))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in D.CIFAR10_CLASSES]}, 2))
    return d


def make_tar(src_dir: Path, out: Path, arcname: str) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src_dir, arcname=arcname)
    return out


def write_image_folder(root: Path, classes, n_train, n_test, shape=(8, 8, 3), seed=0, ext=".png"):
    """root/train/<class>/<i>.png ... ; returns {(split, class, i): array}"""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}{ext}")
                written[(split, c, i)] = a
    return written


# ---- Dataset --------------------------------------------------------------------------------

def small_ds(n=20, m=10, k=3, shape=(4, 4)):
    rng = np.random.default_rng(0)
    return D.Dataset("toy", rng.integers(0, 256, (n, *shape), dtype=np.uint8), np.arange(n) % k,
                     rng.integers(0, 256, (m, *shape), dtype=np.uint8), np.arange(m) % k,
                     tuple("abcdefghij"[:k]), "mem")


def test_dataset_basic_properties():
    ds = small_ds()
    assert ds.num_classes == 3 and ds.image_shape == (4, 4)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert "toy" in repr(ds) and len(repr(ds)) < 300


@pytest.mark.parametrize("bad, match", [
    (dict(y_train=np.arange(20) % 3 + 1), r"\[0, 3\)"),
    (dict(y_train=np.full(20, -1)), r"\[0, 3\)"),
    (dict(y_train=np.arange(19) % 3), "19 labels for 20 images"),
    (dict(y_test=np.zeros(11, int)), "11 labels for 10 images"),
    (dict(x_train=np.zeros(20, np.uint8)), r"\(N, \.\.\.\)"),
    (dict(x_train=np.zeros((20, 16), np.uint8)), "same shape"),
    (dict(x_test=np.zeros((10, 5, 4), np.uint8)), "same shape"),
    (dict(y_train=np.zeros(20, float)), "integer class labels"),
    (dict(x_train=np.zeros((20, 4, 4), np.complex64)), "real numbers"),
    (dict(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, int)), "0 rows"),
    (dict(classes=("a", "a", "b")), "unique"),
])
def test_dataset_validation(bad, match):
    ds = small_ds()
    kw = dict(name="toy", x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
              classes=ds.classes, source="mem")
    kw.update(bad)
    with pytest.raises(InputError, match=match):
        D.Dataset(**kw)


def test_dataset_accepts_column_labels_and_float_images():
    ds = small_ds()
    d2 = D.Dataset("t", ds.x_train.astype(np.float32), ds.y_train[:, None].astype(np.uint8),
                   ds.x_test, ds.y_test, ds.classes)
    assert d2.y_train.shape == (20,) and d2.y_train.dtype == np.int64


def test_subset_first_n_and_errors():
    ds = small_ds()
    s = ds.subset(5, 3)
    assert np.array_equal(s.x_train, ds.x_train[:5]) and np.array_equal(s.y_test, ds.y_test[:3])
    assert not np.shares_memory(s.x_train, ds.x_train)
    assert ds.subset().x_train.shape == ds.x_train.shape
    with pytest.raises(InputError, match="only 20 training"):
        ds.subset(21)
    with pytest.raises(InputError, match="only 10 test"):
        ds.subset(n_test=11, seed=1)
    with pytest.raises(InputError):
        ds.subset(0)
    with pytest.raises(InputError):
        ds.subset(5, seed=-1)


def test_subset_seeded_is_stratified_deterministic_and_without_repeats():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), [400, 300, 200, 100])
    rng.shuffle(y)
    x = np.arange(1000, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)  # x encodes its index
    ds = D.Dataset("s", x, y, x[:100], y[:100], ("a", "b", "c", "d"))
    a, b, c = ds.subset(100, 50, seed=3), ds.subset(100, 50, seed=3), ds.subset(100, 50, seed=4)
    assert np.bincount(a.y_train, minlength=4).tolist() == [40, 30, 20, 10]
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_train, c.x_train)
    for s in (a, ds.subset(997, seed=5)):
        idx = s.x_train[:, 0, 0].astype(int)
        assert len(np.unique(idx)) == len(idx)  # without replacement
        assert np.array_equal(s.y_train, y[idx])  # images keep their labels
    assert not np.array_equal(np.sort(a.x_train[:, 0, 0]), a.x_train[:, 0, 0])  # random order


def test_subset_rounding_keeps_exact_size():
    y = np.array([0] * 7 + [1] * 7 + [2] * 7)
    ds = D.Dataset("r", np.zeros((21, 2, 2), np.uint8), y, np.zeros((3, 2, 2), np.uint8), [0, 1, 2], ("a", "b", "c"))
    for n in range(1, 22):
        s = ds.subset(n, seed=0)
        assert len(s.y_train) == n
        counts = np.bincount(s.y_train, minlength=3)
        assert counts.max() - counts.min() <= 1


# ---- to_features ----------------------------------------------------------------------------

def test_to_features():
    x = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    before = x.copy()
    f = D.to_features(x)
    assert f.shape == (2, 27) and f.dtype == np.float32 and f.flags.c_contiguous
    assert np.array_equal(f, x.reshape(2, -1).astype(np.float32) / np.float32(255))
    assert np.array_equal(x, before)
    f64 = D.to_features(x[:, ::-1], dtype=np.float64)
    assert f64.dtype == np.float64 and f64.flags.c_contiguous
    assert np.allclose(f64, x[:, ::-1].reshape(2, -1) / 255.0)
    g = D.to_features(np.full((1, 2, 2), 255.0, np.float32))
    assert np.allclose(g, 1.0)
    with pytest.raises(InputError):
        D.to_features(x, dtype=np.int32)
    with pytest.raises(InputError):
        D.to_features(np.zeros(5, np.uint8))


# ---- resolve_data_dir -----------------------------------------------------------------------

def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELFIT_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.resolve_data_dir(tmp_path / "opt") == tmp_path / "opt"
    assert D.resolve_data_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    assert D.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("KERNELFIT_DATA")
    assert D.resolve_data_dir() == tmp_path / "xdg" / "kernelfit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.resolve_data_dir() == tmp_path / "home" / ".cache" / "kernelfit"
    assert not (tmp_path / "home").exists()  # resolution creates nothing


# ---- read_idx -------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    a = D.read_idx(write_idx(tmp_path / "i", imgs, gz))
    b = D.read_idx(write_idx(tmp_path / "l.gz", labels, gz))  # content decides, not the name
    assert a.dtype == np.uint8 and a.shape == (5, 28, 28) and np.array_equal(a, imgs)
    assert np.array_equal(b, labels) and a.flags.writeable


def test_read_idx_other_types(tmp_path):
    v = np.array([[1, -2], [300000, 4]], np.int32)
    out = D.read_idx(write_idx(tmp_path / "i4", v, code=0x0C))
    assert out.dtype == np.int32 and out.dtype.isnative and np.array_equal(out, v)
    f = np.array([0.5, -1.25], np.float64)
    assert np.array_equal(D.read_idx(write_idx(tmp_path / "f8", f, code=0x0E)), f)


def test_read_idx_errors_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    cases = {
        "badmagic": b"\x01\x02" + good[2:],
        "badtype": good[:2] + b"\x07" + good[3:],
        "short": good[:6],
        "truncated": good[:-5],
        "trailing": good + b"xx",
        "tiny": b"\x00\x00",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataError, match=name):
            D.read_idx(tmp_path / name)
    gz = gzip.compress(good)
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="cut.gz"):
        D.read_idx(tmp_path / "cut.gz")
    with pytest.raises(DataError, match="nope"):
        D.read_idx(tmp_path / "nope")
    with pytest.raises(DataError, match="truncated"):
        D.read_idx(tmp_path / "truncated")


# ---- read_keras_npz -------------------------------------------------------------------------

def test_read_keras_npz(tmp_path):
    xtr, ytr, xte, yte = tiny_mnist()
    p = tmp_path / "m.npz"
    np.savez(p, x_train=xtr, y_train=ytr.astype(np.uint8), x_test=xte, y_test=yte[:, None])
    a, b, c, d = D.read_keras_npz(p)
    assert np.array_equal(a, xtr) and np.array_equal(c, xte)
    assert b.dtype == np.int64 and d.shape == (12,) and np.array_equal(d, yte)


def test_read_keras_npz_errors(tmp_path):
    xtr, ytr, xte, yte = tiny_mnist()
    p = tmp_path / "missing.npz"
    np.savez(p, x_train=xtr, y_train=ytr, x_test=xte)
    with pytest.raises(DataError, match=r"missing\.npz.*y_test"):
        D.read_keras_npz(p)
    p = tmp_path / "len.npz"
    np.savez(p, x_train=xtr, y_train=ytr[:-1], x_test=xte, y_test=yte)
    with pytest.raises(DataError, match="len.npz"):
        D.read_keras_npz(p)
    good = tmp_path / "good.npz"
    np.savez(good, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(DataError, match="cut.npz"):
        D.read_keras_npz(tmp_path / "cut.npz")
    p = tmp_path / "obj.npz"
    np.savez(p, x_train=np.array([object()] * 3, dtype=object), y_train=ytr, x_test=xte, y_test=yte)
    with pytest.raises(DataError, match="obj.npz"):
        D.read_keras_npz(p)
    p = tmp_path / "dims.npz"
    np.savez(p, x_train=xtr.reshape(30, -1), y_train=ytr, x_test=xte, y_test=yte)
    with pytest.raises(DataError, match="dims.npz"):
        D.read_keras_npz(p)


# ---- read_cifar10_batches -------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_cifar10_dir_and_archive(tmp_path, protocol):
    xs, ys, xt, yt = tiny_cifar()
    bdir = write_cifar_dir(tmp_path / "cifar-10-batches-py", xs, ys, xt, yt, protocol)
    tar = make_tar(bdir, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    for src in (bdir, tmp_path, tar):  # the batch dir, its parent, the archive
        x_tr, y_tr, x_te, y_te = D.read_cifar10_batches(src)
        assert x_tr.shape == (20, 32, 32, 3) and x_tr.dtype == np.uint8 and x_tr.flags.c_contiguous
        assert np.array_equal(x_tr, np.concatenate(xs)) and np.array_equal(y_tr, np.concatenate(ys))
        assert np.array_equal(x_te, xt) and np.array_equal(y_te, yt) and y_te.dtype == np.int64


def test_read_cifar10_python2_pickles(tmp_path):
    xs, ys, xt, yt = tiny_cifar()
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, (x, y) in enumerate(zip(xs, ys), 1):
        (d / f"data_batch_{i}").write_bytes(py2_cifar_batch(x.transpose(0, 3, 1, 2).reshape(-1, 3072), y))
    (d / "test_batch").write_bytes(py2_cifar_batch(xt.transpose(0, 3, 1, 2).reshape(-1, 3072), yt))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no DeprecationWarning from importing numpy.core
        x_tr, y_tr, x_te, y_te = D.read_cifar10_batches(tmp_path)
    assert np.array_equal(x_tr, np.concatenate(xs)) and np.array_equal(y_te, yt)


def test_read_cifar10_channel_layout(tmp_path):
    # one image whose red plane is all 10, green 20, blue 30 in the official (planar) layout
    flat = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    flat[1] = 99  # red value of row 0, column 1
    d = tmp_path / "b"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps({b"data": flat[None], b"labels": [7]}, protocol=2))
    x, y, _, _ = D.read_cifar10_batches(d)
    assert x.shape == (5, 32, 32, 3)
    assert x[0, 0, 1].tolist() == [99, 20, 30] and x[0, 5, 5].tolist() == [10, 20, 30]
    assert y.tolist() == [7] * 5


def test_read_cifar10_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    xs, ys, xt, yt = tiny_cifar()
    d = write_cifar_dir(tmp_path / "b", xs, ys, xt, yt)
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3.*(system|refusing)"):
        D.read_cifar10_batches(d)
    assert not (tmp_path / "pwned").exists()


def test_read_cifar10_errors(tmp_path):
    xs, ys, xt, yt = tiny_cifar()
    d = write_cifar_dir(tmp_path / "b", xs, ys, xt, yt)
    (d / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        D.read_cifar10_batches(d)
    d = write_cifar_dir(tmp_path / "c", xs, ys, xt, yt)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, 2))
    with pytest.raises(DataError, match=r"test_batch.*3072"):
        D.read_cifar10_batches(d)
    (d / "test_batch").write_bytes(cifar_batch(xt, np.full(len(xt), 10)))
    with pytest.raises(DataError, match=r"test_batch.*\[0, 10\)"):
        D.read_cifar10_batches(d)
    (d / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="test_batch"):
        D.read_cifar10_batches(d)
    good = write_cifar_dir(tmp_path / "g" / "cifar-10-batches-py", xs, ys, xt, yt)
    tar = make_tar(good, tmp_path / "t.tar.gz", "cifar-10-batches-py")
    (tmp_path / "cut.tar.gz").write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.tar.gz"):
        D.read_cifar10_batches(tmp_path / "cut.tar.gz")


# ---- read_image_folder ----------------------------------------------------------------------

def test_read_image_folder_dir_rgb(tmp_path):
    root = tmp_path / "imgs"
    w = write_image_folder(root, ["cat", "ant", "bee"], n_train=3, n_test=2)
    x_tr, y_tr, x_te, y_te, classes = D.read_image_folder(root, cache=False)
    assert classes == ("ant", "bee", "cat")  # sorted folder names
    assert x_tr.shape == (9, 8, 8, 3) and x_tr.dtype == np.uint8 and x_te.shape == (6, 8, 8, 3)
    # round-robin over classes: file i of every class, then file i+1
    assert y_tr.tolist() == [0, 1, 2] * 3 and y_te.tolist() == [0, 1, 2] * 2
    assert np.array_equal(x_tr[4], w[("train", "bee", 1)]) and np.array_equal(x_te[5], w[("test", "cat", 1)])


def test_read_image_folder_gray_tar_with_prefix_and_classes(tmp_path):
    root = tmp_path / "src" / "digits"
    w = write_image_folder(root, ["0", "1"], n_train=2, n_test=1, shape=(5, 6))
    (root / "train" / "0" / "notes.txt").write_text("not an image")
    (root / "train" / "1" / "._0.png").write_bytes(b"AppleDouble junk")
    tar = make_tar(root, tmp_path / "digits.tar.gz", "digits")
    x_tr, y_tr, x_te, y_te, classes = D.read_image_folder(tar, classes=["1", "0"], cache=False)
    assert classes == ("1", "0") and x_tr.shape == (4, 5, 6) and x_tr.dtype == np.uint8
    assert y_tr.tolist() == [0, 1, 0, 1]
    assert np.array_equal(x_tr[0], w[("train", "1", 0)]) and np.array_equal(x_te[1], w[("test", "0", 0)])


def test_read_image_folder_natural_order(tmp_path):
    root = tmp_path / "f"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        for i in (10, 9, 2, 1):
            Image.fromarray(np.full((2, 2), i, np.uint8)).save(root / split / "a" / f"img{i}.png")
    x, _, _, _, _ = D.read_image_folder(root, cache=False)
    assert x[:, 0, 0].tolist() == [1, 2, 9, 10]


def test_read_image_folder_errors(tmp_path):
    root = tmp_path / "bad"
    write_image_folder(root, ["a", "b"], 2, 1)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "train" / "b" / "odd.png")
    with pytest.raises(DataError, match="odd.png"):
        D.read_image_folder(root, cache=False)
    (root / "train" / "b" / "odd.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="odd.png"):
        D.read_image_folder(root, cache=False)
    (root / "train" / "b" / "odd.png").unlink()
    with pytest.raises(DataError, match=r"\['b'\]"):
        D.read_image_folder(root, classes=["a"], cache=False)
    with pytest.raises(DataError, match="train"):
        D.read_image_folder(tmp_path / "bad" / "train" / "a", cache=False)
    with pytest.raises(DataError):
        D.read_image_folder(tmp_path / "absent", cache=False)
    tar = make_tar(root, tmp_path / "imgs.tar.gz", "imgs")
    (tmp_path / "cut-imgs.tar.gz").write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match="cut-imgs.tar.gz"):
        D.read_image_folder(tmp_path / "cut-imgs.tar.gz")


def test_read_image_folder_cache_hit_and_corrupt_cache_rebuilt(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KERNELFIT_CACHE", str(cache))
    root = tmp_path / "src"
    write_image_folder(root, ["a", "b"], 3, 2)
    tar = make_tar(root, tmp_path / "folder.tar.gz", ".")
    first = D.read_image_folder(tar)
    files = list((cache / "decoded").glob("*.npz"))
    assert len(files) == 1 and D.sha256_file(tar) in files[0].name
    real_decode = image_folder._decode_image_folder

    def no_decode(*a, **k):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(image_folder, "_decode_image_folder", no_decode)
    second = D.read_image_folder(tar)
    for u, v in zip(first[:4], second[:4]):
        assert np.array_equal(u, v) and u.dtype == v.dtype
    assert second[4] == first[4]
    # corrupt the cache: flip bytes in the middle, then truncate -> warning + rebuild
    monkeypatch.setattr(image_folder, "_decode_image_folder", real_decode)
    for damage in ("flip", "truncate"):
        blob = bytearray(files[0].read_bytes())
        if damage == "flip":
            mid = len(blob) // 2
            blob[mid:mid + 8] = bytes(255 - b for b in blob[mid:mid + 8])
        else:
            blob = blob[: len(blob) // 3]
        files[0].write_bytes(bytes(blob))
        with pytest.warns(RuntimeWarning, match="rebuilding"):
            third = D.read_image_folder(tar)
        for u, v in zip(first[:4], third[:4]):
            assert np.array_equal(u, v)
        monkeypatch.setattr(image_folder, "_decode_image_folder", no_decode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            D.read_image_folder(tar)  # the rebuilt cache is good again
        monkeypatch.setattr(image_folder, "_decode_image_folder", real_decode)
    # a changed archive has another sha256, so another cache entry
    write_image_folder(root, ["a", "b"], 3, 2, seed=1)
    make_tar(root, tar, ".")
    fourth = D.read_image_folder(tar)
    assert not np.array_equal(fourth[0], first[0])
    assert len(list((cache / "decoded").glob("*.npz"))) == 2


# ---- load_dataset ---------------------------------------------------------------------------

def test_load_mnist_subset_is_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELFIT_DATA", str(tmp_path / "nothing"))
    ds = D.load_dataset()
    assert ds.name == "mnist-subset" and ds.x_train.shape == (5000, 28, 28) and ds.x_test.shape == (1000, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.classes == D.MNIST_CLASSES and ds.num_classes == 10
    assert ds.y_train[:5].tolist() == [5, 0, 4, 1, 9] and ds.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert Path(ds.source).name == "mnist_subset.npz"
    assert D.load_dataset("mnist_subset", download=True).x_train.shape == (5000, 28, 28)


def test_load_dataset_unknown_name():
    with pytest.raises(InputError, match="mnist-subset, mnist, fashion-mnist, kmnist, cifar10"):
        D.load_dataset("imagenet")


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_idx_preferred_over_npz(tmp_path, gz):
    arrays = tiny_mnist()
    write_mnist_idx(tmp_path, arrays, gz=gz)
    np.savez(tmp_path / "mnist.npz", x_train=arrays[0][:3], y_train=arrays[1][:3], x_test=arrays[2][:3],
             y_test=arrays[3][:3])
    ds = D.load_dataset("mnist", data_dir=tmp_path)
    assert ds.name == "mnist" and len(ds.x_train) == 30 and np.array_equal(ds.x_train, arrays[0])
    assert np.array_equal(ds.y_test, arrays[3]) and Path(ds.source) == tmp_path


def test_load_mnist_from_npz_env_and_subdirs(tmp_path, monkeypatch):
    arrays = tiny_mnist()
    np.savez(tmp_path / "mnist.npz", **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))
    monkeypatch.setenv("KERNELFIT_DATA", str(tmp_path))
    ds = D.load_dataset("mnist")
    assert Path(ds.source) == tmp_path / "mnist.npz" and np.array_equal(ds.y_train, arrays[1])
    assert D.load_dataset("mnist", data_dir=tmp_path / "mnist.npz").x_train.shape == (30, 28, 28)
    write_mnist_idx(tmp_path / "other" / "MNIST" / "raw", arrays, gz=True)
    assert Path(D.load_dataset("mnist", tmp_path / "other").source) == tmp_path / "other" / "MNIST" / "raw"


def test_load_mnist_missing_message(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELFIT_DATA", str(tmp_path))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8), gz=True)
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist")
    msg = str(e.value)
    for needle in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "mnist.npz", str(tmp_path),
                   str(tmp_path / "mnist"), str(tmp_path / "MNIST" / "raw"), "KERNELFIT_DATA",
                   "--data-dir", "--download", "only ['train-images-idx3-ubyte.gz']"):
        assert needle in msg, needle


def test_load_mnist_corrupt_and_wrong_dims_name_the_file(tmp_path):
    arrays = tiny_mnist()
    write_mnist_idx(tmp_path / "a", arrays)
    f = tmp_path / "a" / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        D.load_dataset("mnist", tmp_path / "a")
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "mnist.npz", x_train=np.zeros((4, 32, 32), np.uint8), y_train=np.zeros(4, int),
             x_test=np.zeros((2, 32, 32), np.uint8), y_test=np.zeros(2, int))
    # images of another size are read as they are (the record states the shape found)
    assert D.load_dataset("mnist", tmp_path / "b").image_shape == (32, 32)
    np.savez(tmp_path / "b" / "mnist.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.full(4, 10),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, int))
    with pytest.raises(DataError, match=r"mnist\.npz.*\[0, 10\)"):
        D.load_dataset("mnist", tmp_path / "b")


def test_load_cifar10_from_batches_preferred(tmp_path):
    xs, ys, xt, yt = tiny_cifar()
    bdir = write_cifar_dir(tmp_path / "src" / "cifar-10-batches-py", xs, ys, xt, yt)
    make_tar(bdir, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    write_image_folder(tmp_path / "jpeg", D.CIFAR10_CLASSES, 1, 1, shape=(32, 32, 3))
    make_tar(tmp_path / "jpeg", tmp_path / "cifar10-jpeg-q75.tar.gz", ".")
    ds = D.load_dataset("cifar10", tmp_path)
    assert Path(ds.source).name == "cifar-10-python.tar.gz" and ds.classes == D.CIFAR10_CLASSES
    assert np.array_equal(ds.x_train, np.concatenate(xs)) and ds.image_shape == (32, 32, 3)
    ds2 = D.load_dataset("cifar10", tmp_path / "src")
    assert Path(ds2.source).name == "cifar-10-batches-py"
    ds3 = D.load_dataset("CIFAR-10", tmp_path / "cifar-10-python.tar.gz")  # a file path works too
    assert np.array_equal(ds3.y_test, yt)


def test_load_cifar10_from_image_folder_archive(tmp_path):
    w = write_image_folder(tmp_path / "src", list(reversed(D.CIFAR10_CLASSES)), 2, 1, shape=(32, 32, 3))
    (tmp_path / "data").mkdir()
    make_tar(tmp_path / "src", tmp_path / "data" / "cifar10-jpeg-q75.tar.gz", ".")
    ds = D.load_dataset("cifar10", tmp_path / "data")
    assert ds.classes == D.CIFAR10_CLASSES  # label order is CIFAR-10's, not the folder order
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.y_train[:10].tolist() == list(range(10))
    assert np.array_equal(ds.x_train[3], w[("train", "cat", 0)])
    assert np.array_equal(ds.x_test[9], w[("test", "truck", 0)])


def test_load_cifar10_missing_message(tmp_path):
    with pytest.raises(DataError) as e:
        D.load_dataset("cifar10", tmp_path)
    msg = str(e.value)
    for needle in ("cifar-10-batches-py", "cifar-10-python.tar.gz", "train/<class>", str(tmp_path / "cifar10"),
                   "(does not exist)", "KERNELFIT_DATA", "--download"):
        assert needle in msg, needle


# ---- the real data sets ---------------------------------------------------------------------

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.data
def test_real_mnist_npz(shared_data_dir):
    ds = D.load_dataset("mnist", data_dir=shared_data_dir)
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert ds.x_train.dtype == np.uint8 and int(ds.x_train.max()) == 255
    assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.y_test).tolist() == MNIST_TEST_COUNTS
    sub = D.load_dataset("mnist-subset")  # the shipped subset is the first 5000 / 1000 images
    assert np.array_equal(sub.x_train, ds.x_train[:5000]) and np.array_equal(sub.y_test, ds.y_test[:1000])


@pytest.mark.data
def test_real_cifar10_jpeg_archive(shared_data_dir, monkeypatch):
    archive = shared_data_dir / "cifar10-jpeg-q75.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    # use the real user cache (decode once per machine), not the per-test one
    if _USER_CACHE_ENV is None:
        monkeypatch.delenv("KERNELFIT_CACHE")
    else:
        monkeypatch.setenv("KERNELFIT_CACHE", _USER_CACHE_ENV)
    t0 = time.perf_counter()
    ds = D.load_dataset("cifar10", data_dir=shared_data_dir)
    t1 = time.perf_counter()
    again = D.load_dataset("cifar10", data_dir=shared_data_dir)
    t2 = time.perf_counter()
    print(f"\nCIFAR-10 JPEG archive: load {t1 - t0:.1f} s, cached reload {t2 - t1:.2f} s")
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000] * 10 and np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.classes == D.CIFAR10_CLASSES and ds.x_train.dtype == np.uint8
    assert np.array_equal(again.x_train, ds.x_train) and t2 - t1 < 10
    means = ds.x_train.reshape(-1, 3).mean(axis=0)  # CIFAR-10 channel means are about 125, 123, 114
    assert np.allclose(means, [125.3, 123.0, 113.9], atol=1.5)
