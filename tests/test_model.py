"""Model files: save / load round trip, exact predictions, refusal of corrupt / foreign / future files,
and `kernelfit solve --save-model` + `kernelfit predict` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kernelfit.cli import main
from kernelfit.errors import InputError, ModelFileError
from kernelfit.linalg.options import FactorOptions
from kernelfit.model import FORMAT_VERSION, load_model, save_model
from kernelfit.solve import SolveOptions, fit_interpolant, fit_precomputed


def _fit(n=300, d=6, k=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, d))
    Y = rng.standard_normal((n, k))
    return X, fit_interpolant(X, Y, SolveOptions(bandwidth=0.8, mode="mixed", placement=FactorOptions(block_size=128)))


def test_saved_model_predicts_exactly_what_the_fitted_one_does(tmp_path):
    _, model = _fit()
    Xt = np.random.default_rng(1).random((10_000, 6))   # more than one prediction block
    path = save_model(tmp_path / "m.safetensors", model, task="regression")
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.scores(Xt), model.predict(Xt))
    np.testing.assert_array_equal(loaded.interpolant.alpha, model.alpha)
    assert loaded.metadata["kernel"] == "gaussian" and loaded.metadata["bandwidth"] == model.bandwidth
    # from a memory map, streamed in blocks: the same numbers
    np.save(tmp_path / "xt.npy", Xt)
    np.testing.assert_array_equal(loaded.scores(np.load(tmp_path / "xt.npy", mmap_mode="r")), model.predict(Xt))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(path, model)


def test_precomputed_model_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    X, Xt = rng.standard_normal((200, 3)), rng.standard_normal((30, 3))
    G = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / 2)
    Kt = np.exp(-((Xt[:, None] - X[None]) ** 2).sum(-1) / 2)
    model = fit_precomputed(G, np.sin(X[:, 0]), SolveOptions(mode="float64"))
    loaded = load_model(save_model(tmp_path / "g.safetensors", model, task="regression"))
    assert loaded.precomputed and "x_train" not in loaded.metadata
    np.testing.assert_array_equal(loaded.predict(Kt), model.predict(Kt)[:, 0])
    with pytest.raises(InputError, match="30 columns but the training Gram has n = 200"):
        loaded.predict(Kt.T)


def _rewrite(path, meta_update=None, tensors_update=None, keep_checksum=True):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    meta = json.loads(header["kernelfit"])
    meta.update(meta_update or {})
    tensors.update(tensors_update or {})
    header["kernelfit"] = json.dumps(meta, sort_keys=True)
    if not keep_checksum:
        from kernelfit.model import _digest

        header["sha256"] = _digest(header["kernelfit"], tensors)
    save_file(tensors, str(path), metadata=header)


def test_corrupt_foreign_and_future_files_are_refused(tmp_path):
    _, model = _fit(n=50)
    good = save_model(tmp_path / "m.safetensors", model)
    blob = bytearray(good.read_bytes())
    # a flipped byte in the tensor data: the checksum catches it
    bad = tmp_path / "flipped.safetensors"
    blob2 = bytearray(blob)
    blob2[-9] ^= 0xFF
    bad.write_bytes(bytes(blob2))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model(bad)
    # truncated
    (tmp_path / "short.safetensors").write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(ModelFileError, match="corrupt, truncated"):
        load_model(tmp_path / "short.safetensors")
    # not safetensors at all
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(ModelFileError, match=r"not a readable kernelfit model file .*x93NUMPY"):
        load_model(tmp_path / "x.npy")
    # safetensors, but not ours
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="not a kernelfit model"):
        load_model(tmp_path / "other.safetensors")
    # another format version (checked before the checksum: the layout may differ)
    v2 = tmp_path / "v2.safetensors"
    v2.write_bytes(bytes(blob))
    _rewrite(v2, {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ModelFileError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        load_model(v2)
    # edited metadata (bandwidth changed) without a new checksum
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(bytes(blob))
    _rewrite(edited, {"bandwidth": 3.0})
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        load_model(edited)
    # a preprocessing this version cannot rebuild (checksum valid)
    feat = tmp_path / "feat.safetensors"
    feat.write_bytes(bytes(blob))
    _rewrite(feat, {"preprocessing": {"kind": "randconv-v9", "filters": 32000}}, keep_checksum=False)
    with pytest.raises(ModelFileError, match="preprocessing 'randconv-v9' cannot be rebuilt"):
        load_model(feat)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_cli_save_model_and_predict_equal_in_process(tmp_path, capsys):
    from kernelfit.data import load_dataset, to_features

    out, model_path = tmp_path / "r.json", tmp_path / "m.safetensors"
    rc = main(["solve", "--n-train", "400", "--n-test", "100", "--bandwidth", "5", "--out", str(out),
               "--save-model", str(model_path), "--no-progress"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["model"]["path"] == str(model_path.resolve()) and len(rec["model"]["sha256"]) == 64
    # in-process: the same subset, the same features (pixels / 255 in float64, as the CLI builds
    # them), the same solve, then Interpolant.predict on the raw test images
    ds = load_dataset("mnist-subset").subset(400, 100, seed=0)
    fitted = fit_interpolant(to_features(ds.x_train, np.float64), np.eye(10)[ds.y_train],
                             SolveOptions(bandwidth=5.0, mode="mixed"))
    expected = fitted.predict(to_features(ds.x_test, np.float64))
    np.save(tmp_path / "x_test.npy", ds.x_test)
    np.save(tmp_path / "y_test.npy", ds.y_test)
    rc = main(["predict", "--model", str(model_path), "--x-test", str(tmp_path / "x_test.npy"), "--scores",
               "--out", str(tmp_path / "scores.npy")])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), expected)
    # labels, to csv and json, with the test error reported (equal to the solve's record)
    np.savez(tmp_path / "test.npz", x_test=ds.x_test, y_test=ds.y_test)
    assert main(["predict", "--model", str(model_path), "--data", str(tmp_path / "test.npz"),
                 "--out", str(tmp_path / "pred.json")]) == 0
    payload = json.loads((tmp_path / "pred.json").read_text())
    np.testing.assert_array_equal(payload["predictions"], np.argmax(expected, axis=1))
    assert payload["test_error"] == pytest.approx(rec["results"]["true"]["test_error"])
    assert main(["predict", "--model", str(model_path), "--x-test", str(tmp_path / "x_test.npy"),
                 "--out", str(tmp_path / "pred.csv")]) == 0
    csv = (tmp_path / "pred.csv").read_text().splitlines()
    assert csv[0] == "index,prediction"   # a header, then the row index beside each prediction
    table = np.loadtxt(tmp_path / "pred.csv", dtype=int, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(table[:, 0], np.arange(len(expected)))
    np.testing.assert_array_equal(table[:, 1], np.argmax(expected, axis=1))
    # a model with two target sets: --target picks one
    capsys.readouterr()
    m2 = tmp_path / "m2.safetensors"
    assert main(["solve", "--n-train", "200", "--n-test", "0", "--bandwidth", "5", "--variant", "random-labels",
                 "--save-model", str(m2), "--no-progress"]) == 0
    assert set(load_model(m2).targets) == {"true", "random-labels"}
    capsys.readouterr()
    assert main(["predict", "--model", str(m2), "--x-test", str(tmp_path / "x_test.npy"),
                 "--target", "random-labels"]) == 0
    assert json.loads(capsys.readouterr().out)["target"] == "random-labels"


def test_cli_output_paths_are_checked_before_the_solve(tmp_path, capsys, monkeypatch):
    import kernelfit.experiment

    def no_solve(*a, **k):
        raise AssertionError("the solve ran before the output paths were checked")

    monkeypatch.setattr(kernelfit.experiment, "run_interpolation", no_solve)
    monkeypatch.setattr(kernelfit.experiment, "run_gram_interpolation", no_solve)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"keep me")
    cases = [
        (["--save-model", str(blocker / "m.safetensors")], "--save-model", "is a file, not a directory"),
        (["--save-model", str(existing)], "--save-model", "already exists; pass --overwrite"),
        (["--save-model", str(tmp_path)], "--save-model", "is a directory"),
        (["--out", str(tmp_path / "a.json"), "--save-model", str(tmp_path / "a.json")], "same path", ""),
        (["--out", str(blocker / "r.json")], "--out", "is a file, not a directory"),
        (["--variant", "shuffled-pixels", "--save-model", str(tmp_path / "s.safetensors")], "randomized inputs", ""),
        (["--scheduler", "bogus"], "tcp://HOST:PORT", ""),
    ]
    for extra, needle, needle2 in cases:
        with pytest.raises(SystemExit) as exc:
            main(["solve", "--n-train", "50", "--n-test", "0", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err and needle2 in err, err
    np.save(tmp_path / "G.npy", np.eye(3))
    np.save(tmp_path / "y.npy", np.arange(3))
    with pytest.raises(SystemExit):
        main(["solve", "--gram", str(tmp_path / "G.npy"), "--y-train", str(tmp_path / "y.npy"),
              "--save-model", str(blocker / "m")])
    assert "is a file, not a directory" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"


def test_cli_predict_bad_usage(tmp_path, capsys):
    _, model = _fit(n=40)
    path = save_model(tmp_path / "m.safetensors", model, task="regression")
    np.save(tmp_path / "x.npy", np.zeros((5, 6)))
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(path), "--x-test", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.txt")])
    assert "expected a file ending in .npy, .csv, .json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(path), "--gram-test", str(tmp_path / "x.npy")])
    assert "not a test Gram" in capsys.readouterr().err
    np.save(tmp_path / "x7.npy", np.zeros((5, 7)))
    assert main(["predict", "--model", str(path), "--x-test", str(tmp_path / "x7.npy")]) == 1
    assert "X has 7 features but the interpolant was fitted on 6" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    assert main(["predict", "--model", str(tmp_path / "junk.safetensors"), "--x-test", str(tmp_path / "x.npy")]) == 1
    assert "ModelFileError" in capsys.readouterr().err


def test_model_of_a_users_arrays_predicts_on_the_values_as_stored(tmp_path, capsys):
    """User arrays are used as stored (no /255): the model file must say so, or predict rescales."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 6)) * 40.0
    y = (X[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "mine.npz", x_train=X[:250], y_train=y[:250], x_test=X[250:], y_test=y[250:])
    model = tmp_path / "m.safetensors"
    assert main(["solve", "--data", str(tmp_path / "mine.npz"), "--bandwidth", "60", "--mode", "float64",
                 "--no-progress", "--save-model", str(model), "--out", str(tmp_path / "r.json")]) == 0
    assert main(["predict", "--model", str(model), "--x-test", str(tmp_path / "mine.npz") + ":x_test",
                 "--out", str(tmp_path / "p.npy")]) == 0
    pred = np.load(tmp_path / "p.npy")
    # independent reference: scipy on the raw values
    K = np.exp(-cdist(X[:250], X[:250], "sqeuclidean") / (2 * 60.0**2))
    alpha = np.linalg.solve(K, np.eye(2)[y[:250]])
    ref = np.argmax(np.exp(-cdist(X[250:], X[:250], "sqeuclidean") / (2 * 60.0**2)) @ alpha, 1)
    np.testing.assert_array_equal(pred, ref)


def _write_tampered(path, src, meta_json=None, tensors_update=None, **meta_update):
    """Rewrite ``src`` with edited metadata / tensors and a *recomputed* checksum, as a tamperer would."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from kernelfit.model import _digest

    with safe_open(str(src), framework="np") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if meta_json is None:
        meta = json.loads(header["kernelfit"])
        meta.update(meta_update)
        meta_json = json.dumps(meta, sort_keys=True)     # allow_nan: NaN / Infinity as Python writes them
    tensors.update(tensors_update or {})
    save_file(tensors, str(path), metadata={"kernelfit": meta_json, "sha256": _digest(meta_json, tensors)})
    return path


def _bad_alpha(model, value):
    a = np.array(model.alpha, dtype=np.float64)
    a[3, 1] = value
    return {"alpha": a}


@pytest.mark.parametrize("edit, match", [
    ({"bandwidth": float("nan")}, r"bandwidth is nan, expected a finite number > 0"),
    ({"bandwidth": float("inf")}, r"bandwidth is inf"),
    ({"bandwidth": 0.0}, r"bandwidth is 0.0"),
    ({"bandwidth": -2.0}, r"bandwidth is -2.0"),
    ({"bandwidth": "5"}, r"bandwidth is '5'"),
    ({"jitter": float("nan")}, r"jitter is nan"),
    ({"classes": [0, 1, 2], "num_classes": 3}, r"class list has 3 classes but the target sets have \[2\] alpha columns"),
    ({"num_classes": 7}, r"num_classes is 7 for 2 classes"),
    ({"classes": [[0], {"a": 1}]}, r"classes is \[\[0\], \{\"a\": 1\}\], expected a flat list"),
    ({"classes": [1, 1]}, r"must agree and be distinct"),
    ({"targets": {"true": [[0, 1], 2]}}, r"target set 'true' has columns \[\[0, 1\], 2\]"),
    ({"targets": {"true": [0, 9]}}, r"target set 'true' has columns \[0, 9\], expected .* <= 2"),
    ({"kernel": {"name": ["gaussian"]}}, r"field 'kernel' is \{\"name\": \[\"gaussian\"\]\}, expected a str"),
    ({"kernel": "sigmoid"}, r"kernel 'sigmoid' is not one of gaussian, laplacian, precomputed"),
    ({"mode": None}, r"field 'mode' is null"),
    ({"fit": {"residual_max_abs": {"deep": [1, [2]]}}}, r"field 'fit' holds nested structures under \['residual_max_abs'\]"),
    ({"preprocessing": ["pixels"]}, r"field 'preprocessing' is a list"),
    ({"n_train": 3}, r"n_train is 3 but alpha has 50 rows"),
    ("alpha-nan", r"tensor 'alpha' holds NaN or inf \(first at \[3, 1\] = nan\)"),
    ("alpha-inf", r"tensor 'alpha' holds NaN or inf \(first at \[3, 1\] = inf\)"),
    ("alpha-int", r"tensor 'alpha' is int64 of shape \(50, 2\), expected a 2-D float array"),
    ("json-list", r"metadata is a JSON list, expected an object"),
    ("json-deep", r"metadata is not valid JSON \(RecursionError"),
])
def test_tampered_fields_with_a_recomputed_checksum_are_refused(tmp_path, capsys, edit, match):
    _, model = _fit(n=50)
    good = save_model(tmp_path / "m.safetensors", model, task="classification")
    bad = tmp_path / "bad.safetensors"
    if isinstance(edit, dict):
        _write_tampered(bad, good, **edit)
    elif edit.startswith("alpha-"):
        kind = edit.split("-")[1]
        update = {"alpha": np.asarray(model.alpha).astype(np.int64)} if kind == "int" else \
            _bad_alpha(model, {"nan": np.nan, "inf": np.inf}[kind])
        _write_tampered(bad, good, tensors_update=update)
    else:
        meta_json = '["kernelfit.model", 1]' if edit == "json-list" else "[" * 100_000 + "]" * 100_000
        _write_tampered(bad, good, meta_json=meta_json)
    with pytest.raises(ModelFileError, match=match):
        load_model(bad)
    # the command line says it in one line, without a traceback
    np.save(tmp_path / "x.npy", np.zeros((2, 6)))
    rc = main(["predict", "--model", str(bad), "--x-test", str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err, err
    assert "error" in err and any(m in err for m in ("invalid model file", "not valid JSON", "expected an object")), err


def test_untampered_models_still_load(tmp_path):
    # classes of any flat kind, class names, several target sets: all valid
    _, model = _fit(n=50, k=4)
    p = save_model(tmp_path / "m.safetensors", model, targets={"true": (0, 2), "random": (2, 4)},
                   classes=["cat", "dog"], class_names=["Cat", "Dog"])
    loaded = load_model(p)
    assert list(loaded.classes) == ["cat", "dog"] and set(loaded.targets) == {"true", "random"}
    assert loaded.predict(np.zeros((3, 6)), target="random").shape == (3,)
