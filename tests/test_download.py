"""Tests for kernelfit.data.download against a local HTTP server on 127.0.0.1 (no real network):
tiny files written here are served, the expected checksums are monkeypatched to theirs."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import re
import socket
import struct
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from kernelfit import data as D
from kernelfit.errors import ChecksumError, DataError, InputError


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """(base_url, served_dir, requests): a threaded http.server on 127.0.0.1, an ephemeral port."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(served)))
    httpd.requests = []
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/mirror/", served, httpd.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.delenv("KERNELFIT_DATA", raising=False)
    monkeypatch.setenv("KERNELFIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("KERNELFIT_CACHE_DIR", raising=False)


def idx_gz(arr: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def remote(name: str, blob: bytes, **override) -> D.RemoteFile:
    kw = dict(filename=name, size=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
              md5=hashlib.md5(blob).hexdigest())
    kw.update(override)
    return D.RemoteFile(**kw)


def serve_tiny_mnist(served: Path, monkeypatch, **override_first):
    """Write the four tiny IDX .gz files under served/mirror/ and point REMOTE_FILES at them."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(20) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(10)[::-1],
    }
    (served / "mirror").mkdir(exist_ok=True)
    files = []
    for i, (name, arr) in enumerate(arrays.items()):
        blob = idx_gz(arr)
        (served / "mirror" / name).write_bytes(blob)
        files.append(remote(name, blob, **(override_first if i == 0 else {})))
    monkeypatch.setitem(D.REMOTE_FILES, "mnist", tuple(files))
    return arrays


def test_download_mnist_verifies_and_loads(server, tmp_path, monkeypatch):
    base, served, requests = server
    arrays = serve_tiny_mnist(served, monkeypatch)
    target = tmp_path / "data"
    out = D.download("mnist", data_dir=target, base_url=base)
    assert out == target
    assert sorted(p.name for p in target.iterdir()) == sorted(arrays)  # no temp files left
    assert len(requests) == 4 and all(r.startswith("/mirror/") for r in requests)
    ds = D.load_dataset("mnist", data_dir=target)
    assert ds.x_train.shape == (20, 28, 28) and np.array_equal(ds.y_test, np.arange(10)[::-1])
    # present and verified: not fetched again; force=True fetches again
    D.download("mnist", data_dir=target, base_url=base)
    assert len(requests) == 4
    D.download("mnist", data_dir=target, base_url=base.rstrip("/"), force=True)  # slash added
    assert len(requests) == 8


def test_download_replaces_a_corrupt_existing_file(server, tmp_path, monkeypatch):
    base, served, requests = server
    serve_tiny_mnist(served, monkeypatch)
    target = tmp_path / "data"
    target.mkdir()
    (target / "t10k-labels-idx1-ubyte.gz").write_bytes(b"half a file")
    D.download("mnist", data_dir=target, base_url=base)
    assert (target / "t10k-labels-idx1-ubyte.gz").read_bytes() == (served / "mirror" / "t10k-labels-idx1-ubyte.gz").read_bytes()


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_checksum_mismatch_raises_and_leaves_no_file(server, tmp_path, monkeypatch, algo):
    base, served, _ = server
    wrong = {"sha256": "0" * 64, "md5": "f" * 32}[algo]
    override = {algo: wrong}
    if algo == "md5":
        override["sha256"] = None  # md5 is all that is known: it is what gets checked
    serve_tiny_mnist(served, monkeypatch, **override)
    target = tmp_path / "data"
    with pytest.raises(ChecksumError) as e:
        D.download("mnist", data_dir=target, base_url=base)
    err = e.value
    assert isinstance(err, DataError)
    blob = (served / "mirror" / "train-images-idx3-ubyte.gz").read_bytes()
    found = getattr(hashlib, algo)(blob).hexdigest()
    assert err.expected == wrong and err.found == found and err.algorithm == algo
    assert err.path == target / "train-images-idx3-ubyte.gz" and err.url.endswith("train-images-idx3-ubyte.gz")
    msg = str(err)
    assert wrong in msg and found in msg and "train-images-idx3-ubyte.gz" in msg
    assert list(target.iterdir()) == []  # neither the file nor a partial/temp file


def test_missing_file_on_server_is_a_data_error_without_leftovers(server, tmp_path, monkeypatch):
    base, served, _ = server
    serve_tiny_mnist(served, monkeypatch)
    (served / "mirror" / "t10k-images-idx3-ubyte.gz").unlink()
    target = tmp_path / "data"
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*404|404.*t10k-images") as e:
        D.download("mnist", data_dir=target, base_url=base)
    assert not isinstance(e.value, ChecksumError)
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no temp files


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_load_dataset_download_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setitem(D.BASE_URLS, "mnist", f"http://127.0.0.1:{_closed_port()}/")
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist", data_dir=tmp_path / "data", download=True, )
    msg = str(e.value)
    assert "Download failed" in msg and "train-images-idx3-ubyte" in msg and "KERNELFIT_DATA" in msg
    assert "--data-dir" in msg and str(tmp_path / "data") in msg


def test_load_dataset_download_true_fetches_then_loads(server, tmp_path, monkeypatch):
    base, served, requests = server
    serve_tiny_mnist(served, monkeypatch)
    monkeypatch.setitem(D.BASE_URLS, "mnist", base)
    monkeypatch.setenv("KERNELFIT_DATA", str(tmp_path / "kd"))
    ds = D.load_dataset("mnist", download=True)
    assert len(ds.y_train) == 20 and Path(ds.source) == tmp_path / "kd" and len(requests) == 4
    D.load_dataset("mnist", download=True)  # found locally: no request
    assert len(requests) == 4


def test_download_cifar10_archive(server, tmp_path, monkeypatch):
    base, served, _ = server
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                                 b"labels": [1, 2]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    blob = buf.getvalue()
    (served / "mirror").mkdir()
    (served / "mirror" / "cifar-10-python.tar.gz").write_bytes(blob)
    monkeypatch.setitem(D.REMOTE_FILES, "cifar10", (remote("cifar-10-python.tar.gz", blob),))
    monkeypatch.setitem(D.BASE_URLS, "cifar10", base)
    ds = D.load_dataset("cifar10", data_dir=tmp_path / "d", download=True)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.y_test.tolist() == [1, 2]
    assert Path(ds.source) == tmp_path / "d" / "cifar-10-python.tar.gz"


def test_download_mnist_subset_is_refused():
    with pytest.raises(InputError, match="ships with kernelfit"):
        D.download("mnist-subset")


def test_canonical_sources_are_well_formed():
    assert D.BASE_URLS["mnist"].startswith("https://") and D.BASE_URLS["cifar10"] == "https://www.cs.toronto.edu/~kriz/"
    names = [f.filename for f in D.REMOTE_FILES["mnist"]]
    assert names == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                     "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    (cifar,) = D.REMOTE_FILES["cifar10"]
    assert cifar.filename == "cifar-10-python.tar.gz" and cifar.md5 == "c58f30108f718f92721af3b95e74349a"
    for f in D.REMOTE_FILES["mnist"] + D.REMOTE_FILES["cifar10"]:
        assert re.fullmatch(r"[0-9a-f]{64}", f.sha256) and re.fullmatch(r"[0-9a-f]{32}", f.md5)
        assert f.size and f.size > 0


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
def test_download_md5_only_registry_datasets_and_load(server, tmp_path, monkeypatch, name):
    """Fashion-MNIST and KMNIST publish md5 only: that is what the download checks."""
    base, served, requests = server
    serve_tiny_mnist(served, monkeypatch)
    files = tuple(D.RemoteFile(f.filename, None, None, f.md5) for f in D.REMOTE_FILES["mnist"])
    monkeypatch.setitem(D.REMOTE_FILES, name, files)
    target = tmp_path / "data"
    assert D.download(name, data_dir=target, base_url=base) == target and len(requests) == 4
    ds = D.load_dataset(name, data_dir=target)
    assert ds.name == name and ds.classes == D.REGISTRY[name].classes and ds.x_train.shape == (20, 28, 28)
    bad = (D.RemoteFile(files[0].filename, None, None, "f" * 32), *files[1:])
    monkeypatch.setitem(D.REMOTE_FILES, name, bad)
    with pytest.raises(ChecksumError):
        D.download(name, data_dir=tmp_path / "other", base_url=base)


def test_registry_describes_every_named_dataset():
    for name, info in D.REGISTRY.items():
        assert info.name == name and len(info.classes) == 10 and info.n_train > 0 and info.n_test > 0
        if name != "mnist-subset":
            assert info.base_url.startswith("http") and info.files
            assert all(f.md5 and len(f.md5) == 32 for f in info.files)


class _EndlessResponse:
    """A hostile server's body: zeros without end (no Content-Length, or a false one); counts bytes read."""

    def __init__(self, content_length=None):
        self.headers = {} if content_length is None else {"Content-Length": str(content_length)}
        self.sent = 0

    LIMIT = 64 * 2**20   # the test's own guard: code without a cap would otherwise fill the disk

    def read(self, n=-1):
        n = 1 << 20 if n is None or n < 0 else n
        if self.sent + n > self.LIMIT:
            raise AssertionError(f"read {self.sent + n} bytes of an endless response: no size cap")
        self.sent += n
        return b"\0" * n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("content_length", [None, 1900])   # none, or one that lies
def test_download_stops_at_the_registered_size(tmp_path, monkeypatch, content_length):
    blob = b"the registered file" * 100
    monkeypatch.setitem(D.REMOTE_FILES, "cifar10", (remote(D.CIFAR10_ARCHIVE, blob),))
    responses = []

    def fake_urlopen(req, timeout=None):
        responses.append(_EndlessResponse(content_length))
        return responses[-1]

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    with pytest.raises(DataError, match=rf"sends more than {len(blob)} bytes, more than the {len(blob)} bytes the "
                                        r"registry records .* stopped and discarded"):
        D.download("cifar10", data_dir=tmp_path / "d", base_url="http://hostile.invalid/")
    assert responses[0].sent <= len(blob) + 1      # one byte past the size, not the endless stream
    assert list((tmp_path / "d").iterdir()) == []  # no partial or temporary file left


def test_download_refuses_a_content_length_beyond_the_registered_size(tmp_path, monkeypatch):
    blob = b"x" * 1000
    monkeypatch.setitem(D.REMOTE_FILES, "cifar10", (remote(D.CIFAR10_ARCHIVE, blob),))
    resp = _EndlessResponse(content_length=10**12)
    monkeypatch.setattr("urllib.request.urlopen", lambda req, timeout=None: resp)
    with pytest.raises(DataError, match="sends Content-Length 1000000000000, more than the 1000 bytes"):
        D.download("cifar10", data_dir=tmp_path / "d", base_url="http://hostile.invalid/")
    assert resp.sent == 0 and list((tmp_path / "d").iterdir()) == []


def test_download_of_unrecorded_size_is_capped(tmp_path, monkeypatch):
    import sys

    dl = sys.modules["kernelfit.data.download"]   # the module (kernelfit.data.download is also the function)
    blob = b"y" * 100
    monkeypatch.setitem(D.REMOTE_FILES, "cifar10", (remote(D.CIFAR10_ARCHIVE, blob, size=None, sha256=None),))
    monkeypatch.setattr(dl, "UNKNOWN_SIZE_CAP", 3 * 2**20)
    resp = _EndlessResponse()
    monkeypatch.setattr("urllib.request.urlopen", lambda req, timeout=None: resp)
    with pytest.raises(DataError, match=r"more than 3145728 bytes \(the cap for a file of unrecorded size\)"):
        D.download("cifar10", data_dir=tmp_path / "d", base_url="http://hostile.invalid/")
    assert resp.sent <= 3 * 2**20 + 1
