"""A user's own data through the data layer and the CLI: every reader on tiny files written here
(npz, memory-mapped npy pairs, HDF5, zarr, IDX of a non-28x28 shape, image folders of 8x8 grey and
40x40 RGB images), the record's provenance, and the bad-input errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct

import numpy as np
import pytest
from scipy.linalg import cho_factor, cho_solve
from scipy.spatial.distance import cdist

from kernelfit import data as D
from kernelfit.cli import main
from kernelfit.errors import DataError, InputError


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KERNELFIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("KERNELFIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("KERNELFIT_DATA", raising=False)


def _toy(n=60, nt=25, d=5, k=3, seed=0):
    """Well-separated clusters in d dimensions, values far outside [0, 255] scaling."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(k, d))
    y, yt = rng.integers(0, k, n), rng.integers(0, k, nt)
    X = centers[y] + rng.normal(size=(n, d))
    Xt = centers[yt] + rng.normal(size=(nt, d))
    return X, y, Xt, yt


def _reference_test_error(X, y, Xt, yt, sigma):
    """Independent solve: scipy Cholesky of the Gaussian Gram built with cdist, features as stored."""
    K = np.exp(-cdist(X, X, "sqeuclidean") / (2 * sigma**2))
    alpha = cho_solve(cho_factor(K), np.eye(y.max() + 1)[y])
    pred = np.exp(-cdist(Xt, X, "sqeuclidean") / (2 * sigma**2)) @ alpha
    return float(np.mean(pred.argmax(1) != yt))


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _solve(capsys, *args):
    rc = main(["solve", "--mode", "float64", "--bandwidth", "3", "--no-progress", *map(str, args)])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


# ------------------------------------------------------------------------------ readers

def test_npz_reader_keeps_values_as_stored_and_any_dtype(tmp_path):
    X, y, Xt, yt = _toy()
    f = tmp_path / "d.npz"
    np.savez(f, x_train=X.astype(np.float32), y_train=y.astype(np.int16), x_test=Xt, y_test=yt)
    ds = D.load_arrays(data=f)
    assert ds.x_train.dtype == np.float32 and ds.scale == 1.0 and ds.classes == ("0", "1", "2")
    np.testing.assert_array_equal(D.to_features(ds.x_train, np.float64, scale=ds.scale),
                                  X.astype(np.float32).astype(np.float64))
    assert ds.y_train.dtype == np.int64 and np.array_equal(ds.y_train, y)
    # without a test split the test split is empty
    np.savez(tmp_path / "tr.npz", x_train=X, y_train=y)
    ds2 = D.load_arrays(data=tmp_path / "tr.npz")
    assert ds2.x_test.shape == (0, 5) and len(ds2.y_test) == 0


def _mapped(a) -> bool:
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = getattr(a, "base", None)
    return False


def test_npy_pair_is_memory_mapped_not_copied(tmp_path):
    X, y, Xt, yt = _toy()
    for name, a in (("X", X), ("y", y), ("Xt", Xt), ("yt", yt)):
        np.save(tmp_path / f"{name}.npy", a)
    ds = D.load_arrays(x_train=tmp_path / "X.npy", y_train=tmp_path / "y.npy",
                       x_test=tmp_path / "Xt.npy", y_test=tmp_path / "yt.npy")
    assert _mapped(ds.x_train) and _mapped(ds.x_test)
    assert not ds.x_train.flags.writeable   # read-only map of the file, not an in-memory copy
    # a split kept whole by subset() stays mapped
    assert _mapped(ds.subset(None, None).x_train)
    np.testing.assert_array_equal(ds.x_train, X)


def test_hdf5_and_zarr_readers(tmp_path):
    h5py = pytest.importorskip("h5py")
    zarr = pytest.importorskip("zarr")
    X, y, Xt, yt = _toy()
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["train/x"], f["train/y"] = X, y
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    z.create_array("xt", shape=Xt.shape, dtype=Xt.dtype, chunks=(7, 5))[...] = Xt
    z.create_array("yt", shape=yt.shape, dtype=yt.dtype)[...] = yt
    ds = D.load_arrays(x_train=f"{tmp_path}/d.h5:/train/x", y_train=f"{tmp_path}/d.h5:/train/y",
                       x_test=f"{tmp_path}/s.zarr:/xt", y_test=f"{tmp_path}/s.zarr:/yt")
    np.testing.assert_array_equal(ds.x_train, X)
    np.testing.assert_array_equal(ds.x_test, Xt)
    np.testing.assert_array_equal(ds.y_test, yt)
    assert set(ds.files) == {str(tmp_path / "d.h5"), str(tmp_path / "s.zarr")}


def _write_idx(path, arr: np.ndarray, gz=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def _write_idx_dataset(d, shape=(8, 8), n=40, nt=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    xt = rng.integers(0, 256, (nt, *shape), dtype=np.uint8)
    y, yt = rng.integers(0, 10, n).astype(np.uint8), rng.integers(0, 10, nt).astype(np.uint8)
    d.mkdir(parents=True, exist_ok=True)
    for key, a in (("x_train", x), ("y_train", y), ("x_test", xt), ("y_test", yt)):
        _write_idx(d / (D.IDX_FILES[key] + ".gz"), a)
    return x, y, xt, yt


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist", "mnist"])
def test_idx_datasets_of_another_image_size(tmp_path, name):
    x, _y, _xt, yt = _write_idx_dataset(tmp_path / "d", shape=(8, 8))
    ds = D.load_dataset(name, data_dir=tmp_path / "d")
    assert ds.name == name and ds.image_shape == (8, 8) and ds.classes == D.REGISTRY[name].classes
    np.testing.assert_array_equal(ds.x_train, x)
    np.testing.assert_array_equal(ds.y_test, yt)


def test_idx_colour_images_and_torchvision_layout(tmp_path):
    x, *_ = _write_idx_dataset(tmp_path / "FashionMNIST" / "raw", shape=(6, 5, 3))
    ds = D.load_dataset("fashion-mnist", data_dir=tmp_path)   # found in FashionMNIST/raw
    assert ds.image_shape == (6, 5, 3)
    np.testing.assert_array_equal(ds.x_train, x)


def _write_png_folder(root, shape, n_per_class=2, classes=("a", "b"), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = {}
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n_per_class):
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.png")
                images[(split, c, i)] = a
    return images


@pytest.mark.parametrize("shape", [(8, 8), (40, 40, 3)])
def test_image_folders_of_any_size(tmp_path, shape):
    pytest.importorskip("PIL")
    images = _write_png_folder(tmp_path / "imgs", shape)
    x_tr, y_tr, x_te, _y_te, classes = D.read_image_folder(tmp_path / "imgs")
    assert classes == ("a", "b") and x_tr.shape == (4, *shape) and x_te.shape == (4, *shape)
    # round-robin order over classes: a/0, b/0, a/1, b/1 (PNG is lossless: exact pixels)
    expect = [images[("train", c, i)] for i in range(2) for c in ("a", "b")]
    np.testing.assert_array_equal(x_tr, np.stack(expect))
    assert list(y_tr) == [0, 1, 0, 1]


# ------------------------------------------------------------------------------ the CLI

def test_cli_solve_on_an_npz_of_features_matches_scipy(tmp_path, capsys):
    X, y, Xt, yt = _toy()
    f = tmp_path / "d.npz"
    np.savez(f, x_train=X, y_train=y, x_test=Xt, y_test=yt)
    rc, rec, err = _solve(capsys, "--data", f)
    assert rc == 0, err
    res = rec["results"]["true"]
    assert res["train_error"] == 0.0
    assert res["test_error"] == pytest.approx(_reference_test_error(X, y, Xt, yt, 3.0), abs=1e-12)
    ds = rec["dataset"]
    assert ds["name"] == str(f) and ds["files"] == [{"path": str(f), "sha256": _sha256(f)}]
    assert ds["x_train"] == {"shape": [60, 5], "dtype": "float64"}
    assert ds["preprocessing"] == "none (values as stored)"
    assert rec["n_train"] == 60 and rec["n_test"] == 25


def test_cli_solve_and_plan_on_npy_pair(tmp_path, capsys):
    X, y, Xt, yt = _toy()
    paths = {}
    for key, a in (("x-train", X), ("y-train", y), ("x-test", Xt), ("y-test", yt)):
        paths[key] = tmp_path / f"{key}.npy"
        np.save(paths[key], a)
    flags = [v for k, p in paths.items() for v in (f"--{k}", p)]
    rc, rec, err = _solve(capsys, *flags, "--n-train", 50, "--subset-seed", "first")
    assert rc == 0, err
    assert rec["n_train"] == 50
    assert rec["results"]["true"]["test_error"] == pytest.approx(
        _reference_test_error(X[:50], y[:50], Xt, yt, 3.0), abs=1e-12)
    assert {f["path"]: f["sha256"] for f in rec["dataset"]["files"]} == {str(p): _sha256(p) for p in paths.values()}
    rc = main(["plan", *map(str, flags)])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["n"] == 60 and plan["d"] == 5 and plan["k"] == 3


def test_cli_solve_fashion_mnist_from_idx_files(tmp_path, capsys):
    _write_idx_dataset(tmp_path / "fm", shape=(8, 8), n=40, nt=12)
    rc, rec, err = _solve(capsys, "--dataset", "fashion-mnist", "--data-dir", tmp_path / "fm")
    assert rc == 0, err
    assert rec["dataset"]["name"] == "fashion-mnist" and rec["dataset"]["x_train"]["shape"] == [40, 8, 8]
    assert len(rec["dataset"]["files"]) == 4 and rec["dataset"]["preprocessing"] == "x / 255"


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("argv, match", [
    (["--data-dir", "{tmp}"], "--data-dir .* needs a dataset it can serve"),
    (["--dataset", "mnist-subset", "--data-dir", "{tmp}"], "needs a dataset it can serve"),
    (["--dataset", "mnist", "--data", "{tmp}/d.npz"], "conflicts with --data"),
    (["--data", "{tmp}/d.npz", "--data-dir", "{tmp}"], "--data-dir applies to a named --dataset"),
    (["--data", "{tmp}/d.npz", "--x-train", "{tmp}/x.npy"], "--data FILE.npz conflicts with --x-train"),
    (["--x-train", "{tmp}/x.npy"], "both --x-train FILE and --y-train FILE"),
    (["--x-train", "{tmp}/x.npy", "--y-train", "{tmp}/x.npy", "--x-test", "{tmp}/x.npy"],
     "needs both --x-test FILE and --y-test FILE"),
    (["--data", "{tmp}/d.npz", "--download"], "--download fetches a named --dataset"),
])
def test_cli_conflicting_data_options_are_usage_errors(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["solve", *[a.format(tmp=tmp_path) for a in argv]])
    assert e.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_cli_bad_files_name_what_was_found(tmp_path, capsys):
    X, y, *_ = _toy()
    (tmp_path / "bad.npy").write_bytes(b"GIF89a\x00\x00junk")
    np.save(tmp_path / "y.npy", y)
    rc, _, err = _solve(capsys, "--x-train", tmp_path / "bad.npy", "--y-train", tmp_path / "y.npy")
    assert rc == 1 and "format not recognised" in err and "GIF89a" in err
    np.savez(tmp_path / "keys.npz", features=X, labels=y)
    rc, _, err = _solve(capsys, "--data", tmp_path / "keys.npz")
    assert rc == 1 and "missing arrays ['x_train', 'y_train']" in err and "['features', 'labels']" in err
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y_short.npy", y[:-1])
    rc, _, err = _solve(capsys, "--x-train", tmp_path / "x.npy", "--y-train", tmp_path / "y_short.npy")
    assert rc == 1 and "x_train has 60 rows" in err and "y_train has 59" in err
    np.save(tmp_path / "x0.npy", X[:0])
    np.save(tmp_path / "y0.npy", y[:0])
    rc, _, err = _solve(capsys, "--x-train", tmp_path / "x0.npy", "--y-train", tmp_path / "y0.npy")
    assert rc == 1 and "0 rows" in err


def test_load_arrays_errors():
    with pytest.raises(InputError, match="both --x-train and --y-train"):
        D.load_arrays(x_train="x.npy")
    with pytest.raises(DataError, match="does not exist"):
        D.load_arrays(data="/nonexistent/d.npz")


def test_float_labels_need_regression(tmp_path):
    X, y, *_ = _toy()
    np.savez(tmp_path / "r.npz", x_train=X, y_train=y + 0.5)
    with pytest.raises(InputError, match="regression"):
        D.load_arrays(data=tmp_path / "r.npz")
    ds = D.load_arrays(data=tmp_path / "r.npz", task="regression")
    assert ds.task == "regression" and ds.classes is None and ds.y_train.dtype == np.float64
    assert len(ds.subset(10, None, seed=0).y_train) == 10


# ------------------------------------------------------------------------------ features on a solve

def test_cli_solve_gabor_features_match_scipy_on_the_same_features(tmp_path, capsys):
    from kernelfit.features import FeatureCache, GaborConfig, gabor_features, hash_array

    ds = D.load_dataset("mnist-subset").subset(150, 60, seed=None)
    cache = tmp_path / "fcache"
    args = ["--features", "gabor", "--gabor-frequencies", "0.2", "0.3", "--gabor-orientations", "4",
            "--cache-dir", cache, "--n-train", 150, "--n-test", 60, "--subset-seed", "first"]
    rc, rec, err = _solve(capsys, *args)
    assert rc == 0, err
    cfg = GaborConfig(frequencies=(0.2, 0.3), n_orientations=4, pool=4)
    F, Ft = (gabor_features(x, cfg).astype(np.float64) for x in (ds.x_train, ds.x_test))
    assert rec["features"]["n_features"] == F.shape[1] == 8 * 7 * 7
    ref = _reference_test_error(F, ds.y_train, Ft, ds.y_test, 3.0)
    assert rec["results"]["true"]["test_error"] == pytest.approx(ref, abs=1e-12)
    # cached under the table's keys (data hash + config), reused by a second run
    fc = FeatureCache(cache)
    keys = {fc.key(hash_array(x), cfg) for x in (ds.x_train, ds.x_test)}
    assert {p.stem for p in (cache / "features").glob("*.npy")} == keys
    mtimes = {p: p.stat().st_mtime_ns for p in (cache / "features").glob("*.npy")}
    rc, rec2, _ = _solve(capsys, *args)
    assert rc == 0 and rec2["results"]["true"]["test_error"] == rec["results"]["true"]["test_error"]
    assert {p: p.stat().st_mtime_ns for p in (cache / "features").glob("*.npy")} == mtimes


def test_cli_gabor_on_feature_rows_is_refused_before_loading(tmp_path, capsys):
    X, y, *_ = _toy()
    np.savez(tmp_path / "d.npz", x_train=X, y_train=y)
    with pytest.raises(SystemExit) as e:
        main(["solve", "--data", str(tmp_path / "d.npz"), "--features", "gabor"])
    assert e.value.code == 2 and "needs grayscale images" in capsys.readouterr().err


def test_cli_feature_kinds_agree_with_the_pipeline():
    from kernelfit import catalog
    from kernelfit.features.pipeline import FEATURE_KINDS

    assert catalog.FEATURE_KINDS == FEATURE_KINDS


def test_idx_files_of_another_family_member_are_refused(tmp_path, monkeypatch):
    import dataclasses

    _write_idx_dataset(tmp_path / "d", shape=(8, 8))
    digest = hashlib.md5(gzip.decompress((tmp_path / "d" / "train-images-idx3-ubyte.gz").read_bytes())).hexdigest()
    fake = dataclasses.replace(D.REGISTRY["fashion-mnist"], content_md5={"x_train": digest})
    monkeypatch.setitem(D.REGISTRY, "fashion-mnist", fake)
    with pytest.raises(DataError, match="these are Fashion-MNIST's training images.*--dataset fashion-mnist"):
        D.load_dataset("mnist", data_dir=tmp_path / "d")
    assert D.load_dataset("fashion-mnist", data_dir=tmp_path / "d").name == "fashion-mnist"


@pytest.mark.data
def test_registry_content_md5_of_mnist_matches_the_real_pixels(shared_data_dir):
    from kernelfit.data.registry import _idx_md5

    with np.load(shared_data_dir / "mnist.npz") as z:
        digests = {k: _idx_md5(z[k].astype(np.uint8)) for k in ("x_train", "y_train", "x_test", "y_test")}
    assert digests == D.REGISTRY["mnist"].content_md5


def test_cli_dataset_table_agrees_with_the_registry():
    from dataclasses import asdict

    from kernelfit import catalog

    assert catalog.DATASET_NAMES == D.DATASETS
    for name, info in D.REGISTRY.items():
        assert asdict(catalog.DATASETS[name]) == {"d": info.dim, "num_classes": len(info.classes),
                                            "n_train": info.n_train, "n_test": info.n_test}


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_cli_solve_randconv_matches_scipy_on_explicit_features(tmp_path, capsys, kernel):
    """--features randconv (Gram accumulated block by block) == scipy on the standardized feature matrix."""
    from kernelfit.features.randconv import RandConvConfig, RandConvFeatures

    rng = np.random.default_rng(0)
    x, xt = (rng.integers(0, 256, (n, 12, 12, 3)).astype(np.uint8) for n in (70, 30))
    y, yt = rng.integers(0, 3, 70), rng.integers(0, 3, 30)
    np.savez(tmp_path / "img.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    cfg = RandConvConfig(n_filters=10, patch_size=4, filters="patches", bias=0.25, pool_grid=2, zca_eps=0.1, seed=0)
    args = ["--data", tmp_path / "img.npz", "--features", "randconv", "--filters", 10, "--filter-block", 3,
            "--patch-size", 4, "--randconv-kernel", kernel, "--cache-dir", tmp_path / "c", "--mode", "mixed",
            "--bandwidth", 10]
    rc, rec, err = _solve(capsys, *args)   # _solve passes --mode float64 first; the later options win
    assert rc == 0, err
    fmap = RandConvFeatures(cfg).fit(x)
    F, Ft = fmap.transform(x).astype(np.float64), fmap.transform(xt).astype(np.float64)
    mu, sd = F.mean(0), F.std(0)
    keep = sd > 1e-8 * sd.max()
    Z, Zt = (np.where(keep, (A - mu) / np.where(keep, sd, 1.0), 0.0) for A in (F, Ft))
    if kernel == "linear":
        K, Kt = (Z @ Z.T + 1.0) / Z.shape[1], (Zt @ Z.T + 1.0) / Z.shape[1]
    else:
        K, Kt = (np.exp(-cdist(A, Z, "sqeuclidean") / (2 * 10.0**2)) for A in (Z, Zt))
    Y = np.eye(3)[y]
    alpha = cho_solve(cho_factor(K), Y)
    res = rec["results"]["true"]
    assert res["train_error"] == 0.0
    assert res["test_error"] == pytest.approx(np.mean(np.argmax(Kt @ alpha, 1) != yt), abs=1e-12)
    assert res["rkhs_norm"] == pytest.approx(np.sqrt(np.sum(alpha * Y)), rel=1e-5)
    assert rec["features"]["n_features"] == 80 and rec["gram_cache"]["hit"] is False
    rc, rec2, _ = _solve(capsys, *args)   # the feature Gram comes from the cache the table uses
    assert rc == 0 and rec2["gram_cache"]["hit"] and rec2["results"] == rec["results"]


def test_cli_randconv_refuses_options_it_does_not_take(capsys):
    with pytest.raises(SystemExit) as e:
        main(["solve", "--features", "randconv", "--jitter", "0.1", "--mode", "float64"])
    assert e.value.code == 2 and "--mode float64" in capsys.readouterr().err


def test_cli_regression_on_a_users_npy_pair_matches_kernel_ridge(tmp_path, capsys):
    from sklearn.kernel_ridge import KernelRidge

    rng = np.random.default_rng(11)
    X = rng.normal(size=(260, 5))
    t = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2]], 1)
    for name, a in (("X", X[:200]), ("Xt", X[200:]), ("t", t[:200]), ("tt", t[200:])):
        np.save(tmp_path / f"{name}.npy", a)
    out = tmp_path / "r.json"
    assert main(["solve", "--x-train", str(tmp_path / "X.npy"), "--y-train", str(tmp_path / "t.npy"),
                 "--x-test", str(tmp_path / "Xt.npy"), "--y-test", str(tmp_path / "tt.npy"),
                 "--task", "regression", "--bandwidth", "2", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["true"]
    kr = KernelRidge(alpha=1e-10, kernel="rbf", gamma=1 / (2 * 2.0**2)).fit(X[:200], t[:200])
    rmse = float(np.sqrt(np.mean((kr.predict(X[200:]) - t[200:]) ** 2)))
    assert res["test_rmse"] == pytest.approx(rmse, rel=1e-5)


# ------------------------------------------------------------------------------ labels -> classes

def test_classes_come_from_the_distinct_labels_not_the_largest(tmp_path):
    import tracemalloc

    X, y, Xt, yt = _toy()
    values = np.array([3, 7, 5_000_000])     # one huge label: 3 classes, not 5,000,001
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", values[y])
    np.save(tmp_path / "Xt.npy", Xt)
    np.save(tmp_path / "yt.npy", values[yt])
    specs = {k: str(tmp_path / f"{n}.npy") for k, n in
             (("x_train", "X"), ("y_train", "y"), ("x_test", "Xt"), ("y_test", "yt"))}
    tracemalloc.start()
    ds = D.load_arrays(**specs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20, peak            # one name per integer up to 5e6 took ~300 MB
    assert ds.classes == ("3", "7", "5000000") and ds.num_classes == 3
    np.testing.assert_array_equal(np.array(ds.classes, dtype=np.int64)[ds.y_train], values[y])
    np.testing.assert_array_equal(np.array(ds.classes, dtype=np.int64)[ds.y_test], values[yt])
    assert D.peek_outputs(**specs) == 3
    # labels already 0..K-1 are kept as they are
    np.save(tmp_path / "d.npy", y)
    dense = D.load_arrays(x_train=specs["x_train"], y_train=str(tmp_path / "d.npy"))
    assert dense.classes == ("0", "1", "2") and np.array_equal(dense.y_train, y)


@pytest.mark.parametrize("bad, match", [
    (np.nan, r"1 class label\(s\) are NaN or inf \(first at row 4: nan\)"),
    (np.inf, r"NaN or inf \(first at row 4: inf\)"),
    (2.5, r"non-integer floats \(dtype float64; first at row 4: 2.5\)"),
    (-1.0, r"must be >= 0, found -1.0 \(row 4\)"),
])
def test_bad_class_labels_are_refused_naming_the_row(tmp_path, bad, match):
    X, y, *_ = _toy()
    yf = y.astype(np.float64)
    yf[4] = bad
    np.savez(tmp_path / "b.npz", x_train=X, y_train=yf)
    with pytest.raises(InputError, match=match):
        D.load_arrays(data=tmp_path / "b.npz")
    with pytest.raises(InputError, match=match):
        D.peek_outputs(data=tmp_path / "b.npz")


def test_regression_targets_are_never_counted_as_classes(tmp_path):
    X, *_ = _toy()
    t = 1e9 + np.arange(len(X), dtype=np.float64)     # targets near 1e9: one output, not 2e9 classes
    np.savez(tmp_path / "r.npz", x_train=X, y_train=t)
    assert D.peek_outputs(data=tmp_path / "r.npz", task="regression") == 1
    ds = D.load_arrays(data=tmp_path / "r.npz", task="regression")
    assert ds.classes is None and np.array_equal(ds.y_train, t)
    np.savez(tmp_path / "r2.npz", x_train=X, y_train=np.stack([t, -t], 1))
    assert D.peek_outputs(data=tmp_path / "r2.npz", task="regression") == 2
