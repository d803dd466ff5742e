"""Readers with bounds: files that would read other files (HDF5 external storage / links / virtual
datasets, zarr symlinks) are refused; compressed files that expand beyond their header, the memory or
any sane size (IDX .gz, npz members, tar members, images) are refused before they are inflated, with
the peak resident set of a subprocess measured (VmHWM) to show nothing large was allocated."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from kernelfit import data as D
from kernelfit.errors import DataError, InputError, MemoryPlanError

REPO = Path(__file__).resolve().parent.parent
SECRET = b"TOPSECRET-" * 64   # 640 bytes no reader may return


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KERNELFIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("KERNELFIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("KERNELFIT_DATA", raising=False)


def _secret(tmp_path) -> Path:
    p = tmp_path / "secret.bin"
    p.write_bytes(SECRET)
    return p


def _no_secret(exc: BaseException) -> None:
    assert b"TOPSECRET" not in str(exc).encode() and "TOPSECRET" not in repr(exc.args)


# ---- HDF5: only data stored inside the file given ---------------------------------------------------

h5py = pytest.importorskip("h5py")


def _h5_external_storage(tmp_path, secret):
    p = tmp_path / "ext.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", shape=(len(SECRET),), dtype="u1", external=[(str(secret), 0, len(SECRET))])
    return f"{p}:/x", "external file"


def _h5_external_link(tmp_path, secret):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["y"] = np.frombuffer(SECRET, np.uint8)
    p = tmp_path / "link.h5"
    with h5py.File(p, "w") as f:
        f["x"] = h5py.ExternalLink(str(other), "/y")
    return f"{p}:/x", "external link"


def _h5_soft_to_external(tmp_path, secret):
    spec, _ = _h5_external_link(tmp_path, secret)
    p = Path(spec.split(":")[0])
    with h5py.File(p, "a") as f:
        f["g/soft"] = h5py.SoftLink("/x")   # a soft link inside the file that leads out of it
    return f"{p}:/g/soft", "external link"


def _h5_virtual(tmp_path, secret):
    other = tmp_path / "src.h5"
    with h5py.File(other, "w") as f:
        f["y"] = np.frombuffer(SECRET, np.uint8)
    layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype="u1")
    layout[:] = h5py.VirtualSource(str(other), "y", shape=(len(SECRET),))
    p = tmp_path / "vds.h5"
    with h5py.File(p, "w") as f:
        f.create_virtual_dataset("v", layout)
    return f"{p}:/v", "virtual dataset"


@pytest.mark.parametrize("make", [_h5_external_storage, _h5_external_link, _h5_soft_to_external, _h5_virtual])
def test_hdf5_reading_other_files_is_refused(tmp_path, make):
    secret = _secret(tmp_path)
    spec, why = make(tmp_path, secret)
    # h5py itself would hand the secret over
    path, member = spec.split(":")
    with h5py.File(path, "r") as f:
        assert bytes(f[member][...]) == SECRET
    with pytest.raises(DataError, match=f"refused: .*{why}.*local file disclosure") as exc:
        D.open_array(spec, what="--x-train")
    _no_secret(exc.value)
    # the user-array loader and the Gram reader go through the same door
    y = tmp_path / "y.npy"
    np.save(y, np.zeros(len(SECRET), np.int64))
    with pytest.raises(DataError, match="refused"):
        D.load_arrays(x_train=spec, y_train=str(y))


def test_hdf5_links_inside_the_file_still_work(tmp_path):
    p = tmp_path / "ok.h5"
    with h5py.File(p, "w") as f:
        f["a/x"] = np.arange(6.0).reshape(3, 2)
        f["b/soft"] = h5py.SoftLink("/a/x")
        f["rel/soft"] = h5py.SoftLink("/a")       # a link to a group, then a member of it
        f["a/near"] = h5py.SoftLink("x")          # relative: resolved in the link's own group
    for member in ("/b/soft", "/rel/soft/x", "/a/near"):
        np.testing.assert_array_equal(D.open_array(f"{p}:{member}")[...], np.arange(6.0).reshape(3, 2))
    with pytest.raises(InputError, match="no dataset '/nope'"):
        D.open_array(f"{p}:/nope")


def test_zarr_symlink_out_of_the_store_is_refused(tmp_path):
    zarr = pytest.importorskip("zarr")
    secret = tmp_path / "secret4"
    secret.write_bytes(SECRET[:4])
    store = tmp_path / "s.zarr"
    kw = {"compressors": None} if hasattr(zarr, "create_array") else {"compressor": None}
    z = (zarr.create_array if hasattr(zarr, "create_array") else zarr.create)(
        str(store), shape=(4,), dtype="u1", chunks=(4,), **kw)
    z[:] = 7
    chunk = next(p for p in store.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr.json")))
    chunk.unlink()
    chunk.symlink_to(secret)
    assert bytes(zarr.open(str(store), mode="r")[...]) == SECRET[:4]   # zarr follows the link
    with pytest.raises(DataError, match="symbolic link to .*outside the store") as exc:
        D.open_array(str(store), what="--x-train")
    _no_secret(exc.value)


# ---- decompression bombs: refused before inflating, peak memory measured ---------------------------

def _gzip_of_zeros(nbytes: int, prefix: bytes) -> bytes:
    """gzip of ``prefix`` + nbytes zeros, built fast: one 64 MiB member of zeros repeated (multi-member)."""
    unit = 64 * 2**20
    assert nbytes % unit == 0
    zeros = gzip.compress(b"\0" * unit, compresslevel=9)
    return gzip.compress(prefix) + zeros * (nbytes // unit)


def _sparse_tar_gz(member: str, realsize: int) -> bytes:
    """A tar.gz of one GNU sparse member: ``realsize`` bytes when extracted, 512 stored."""
    info = tarfile.TarInfo(member)
    info.size, info.type = 512, tarfile.GNUTYPE_SPARSE
    head = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    def octal(v, n):
        return (b"%0*o" % (n - 1, v)) + b"\0"
    head[386:398], head[398:410] = octal(realsize - 512, 12), octal(512, 12)   # one hole, then 512 bytes
    head[482:483], head[483:495] = b"\0", octal(realsize, 12)
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return gzip.compress(bytes(head) + b"x" * 512 + b"\0" * 1024)


_MEASURE = textwrap.dedent("""
    import json, sys
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    from kernelfit import data as D
    from kernelfit.data.bounds import memory_limit
    memory_limit()
    import PIL.Image, tarfile, gzip, zipfile   # warm every import the readers use
    reader, path, warm = sys.argv[1], sys.argv[2], sys.argv[3]
    fn = {"idx": D.read_idx, "cifar": D.read_cifar10_batches,
          "images": lambda p: D.read_image_folder(p, cache=False)}[reader]
    try:
        fn(warm)
    except Exception:
        pass
    before = hwm()
    try:
        fn(path)
        outcome = "read"
    except Exception as e:
        outcome = type(e).__name__ + ": " + str(e)
    print(json.dumps({"grew": hwm() - before, "outcome": outcome}))
""")


def _peak_growth(reader: str, path: Path, warm: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, reader, str(path), str(warm)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")
def test_idx_gzip_bomb_is_refused_within_a_few_mb(tmp_path):
    # header: 16 labels; stream: 512 MiB more (a 0.5 MB file)
    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    bomb.write_bytes(_gzip_of_zeros(512 * 2**20, struct.pack(">BBBBI", 0, 0, 8, 1, 16) + bytes(16)))
    assert bomb.stat().st_size < 2**20
    warm = tmp_path / "warm.gz"
    warm.write_bytes(gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 4) + bytes(4)))
    r = _peak_growth("idx", bomb, warm)
    assert r["outcome"].startswith("DataError") and "trailing bytes" in r["outcome"], r
    assert r["grew"] < 8 * 2**20, r


def test_idx_header_larger_than_the_stream_can_hold_is_refused_before_allocating(tmp_path, monkeypatch):
    # dimensions of 8 GiB in a few-byte gzip: impossible for DEFLATE, refused from the header
    p = tmp_path / "claims.gz"
    p.write_bytes(gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 2**21, 64, 64)))
    with pytest.raises(DataError, match=r"can hold at most .*DEFLATE expands at most 1032:1"):
        D.read_idx(p)
    # a plausible size beyond the machine's memory: MemoryPlanError before reading
    p2 = tmp_path / "big.gz"
    p2.write_bytes(gzip.compress(struct.pack(">BBBBII", 0, 0, 8, 2, 1000, 1000) + bytes(10**6)))
    monkeypatch.setattr("kernelfit.data.bounds.memory_limit", lambda: 10**5)
    with pytest.raises(MemoryPlanError, match=r"needs 0.00 GiB \(1000000 bytes\) by its header, more than this machine's"):
        D.read_idx(p2)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")
def test_sparse_tar_bomb_is_refused_within_a_few_mb(tmp_path):
    bomb = tmp_path / "cifar-10-python.tar.gz"
    bomb.write_bytes(_sparse_tar_gz("cifar-10-batches-py/data_batch_1", 2**30))
    assert bomb.stat().st_size < 4096
    with tarfile.open(bomb) as tf:   # tarfile itself would hand out the whole GiB
        assert tf.getmembers()[0].size == 2**30
    r = _peak_growth("cifar", bomb, tmp_path / "missing.tar.gz")
    assert r["outcome"].startswith("DataError") and "1073741824 bytes, but a CIFAR-10 python batch" in r["outcome"], r
    assert r["grew"] < 8 * 2**20, r
    # the same member in an image folder archive
    img = tmp_path / "imgs.tar.gz"
    img.write_bytes(_sparse_tar_gz("train/a/0.png", 2**30))
    r = _peak_growth("images", img, tmp_path / "missing.tar.gz")
    assert r["outcome"].startswith("DataError") and "at most 67108864" in r["outcome"], r
    assert r["grew"] < 8 * 2**20, r


def test_png_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import Image

    import kernelfit.data.image_folder as imf

    # a 3000 x 3000 PNG of black pixels (~9 KB): its header is read, no pixel decoded
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.new("L", (4, 4)).save(root / split / "a" / "0.png")
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 20_000
    (root / "train" / "a" / "1.png").write_bytes(buf.getvalue())
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im.size) or real_load(im))
    with pytest.raises(DataError, match=r"3000 x 3000 pixels but .* has 4 x 4"):
        D.read_image_folder(root, cache=False)
    assert (3000, 3000) not in decoded
    # over the pixel limit even as the first image
    monkeypatch.setattr(imf, "IMAGE_MAX_PIXELS", 10**6)
    with pytest.raises(DataError, match=r"3000 x 3000 pixels by its header, more than the 1000000"):
        imf._decode(buf.getvalue(), "huge.png")
    assert (3000, 3000) not in decoded


# ---- npz members: header read from the member stream first ------------------------------------------

def _npz_with_member(path: Path, name: str, npy: bytes, *, file_size: int | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name + ".npy", npy)
    if file_size is not None:   # patch the recorded uncompressed size (local header and central directory)
        blob = bytearray(path.read_bytes())
        for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
            i = blob.find(sig)
            blob[i + off:i + off + 4] = struct.pack("<I", file_size)
        path.write_bytes(bytes(blob))


def _npy(shape, dtype="<f8", data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x_train=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="Python objects; reading it would unpickle"):
        D.open_array(f"{p}:x_train", what="--x-train")
    keras = tmp_path / "k.npz"
    np.savez(keras, x_train=np.zeros((2, 2, 2), np.uint8), y_train=np.array([1, None], dtype=object),
             x_test=np.zeros((1, 2, 2), np.uint8), y_test=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="'y_train' has dtype object"):
        D.read_keras_npz(keras)


def test_npz_member_header_is_checked_before_inflating(tmp_path, monkeypatch):
    # the header claims 2**31 float64 (16 GiB) but the entry holds 16 bytes
    p = tmp_path / "lie.npz"
    _npz_with_member(p, "x", _npy((2**31,), data=bytes(16)))
    with pytest.raises(DataError, match=r"header says shape \(2147483648,\) float64 \(17179869184 bytes\) but "
                                        r"the zip entry holds 16 data bytes"):
        D.open_array(f"{p}:x")
    # header and entry agree, but the compressed bytes cannot hold that much
    header = _npy((2**28,))
    p2 = tmp_path / "ratio.npz"
    _npz_with_member(p2, "x", header + bytes(16), file_size=len(header) + 2**31)
    with pytest.raises(DataError, match="DEFLATE expands at most"):
        D.open_array(f"{p2}:x")
    # a consistent member larger than the machine's memory
    p3 = tmp_path / "big.npz"
    np.savez_compressed(p3, x=np.zeros(10**6))
    monkeypatch.setattr("kernelfit.data.bounds.memory_limit", lambda: 10**6)
    with pytest.raises(MemoryPlanError, match=r"array 'x' \(shape \(1000000,\), float64\) needs"):
        D.open_array(f"{p3}:x")


def test_npz_members_still_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((7, 3)), "b": np.asfortranarray(rng.integers(0, 9, (4, 5))),
              "c": np.zeros((0, 3), np.float32), "d": np.array([1, 2], ">i4")}
    for save in (np.savez, np.savez_compressed):
        p = tmp_path / f"{save.__name__}.npz"
        save(p, **arrays)
        for k, v in arrays.items():
            got = D.open_array(f"{p}:{k}")
            assert got.dtype == v.dtype and got.shape == v.shape
            np.testing.assert_array_equal(got, v)
    # a flipped byte of the compressed stream: zip's CRC or zlib catches it
    blob = bytearray((tmp_path / "savez_compressed.npz").read_bytes())
    blob[60] ^= 0xFF
    (tmp_path / "bad.npz").write_bytes(bytes(blob))
    with pytest.raises(DataError):
        D.open_array(f"{tmp_path / 'bad.npz'}:a")
    assert zlib  # noqa: B018 (zlib errors are among those mapped to DataError)
