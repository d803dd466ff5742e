"""Tests for kernelfit.results: provenance, atomic JSON, JSON lines, peak RSS, phase timing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kernelfit import provenance as prov
from kernelfit import results
from kernelfit.provenance import provenance
from kernelfit.results import (
    PhaseTimer,
    append_jsonl,
    peak_rss_bytes,
    read_jsonl,
    write_json_atomic,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_provenance_fields_and_git_sha_matches_git():
    p = provenance(argv=["kernelfit", "solve", "--n-train", "5"])
    assert p["command"] == ["kernelfit", "solve", "--n-train", "5"]
    for key in ("python", "numpy", "scipy", "torch", "sklearn", "kernelfit"):
        assert key in p["versions"]
    assert p["versions"]["numpy"] == np.__version__
    import kernelfit

    assert p["versions"]["kernelfit"] == kernelfit.__version__
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", p["timestamp_utc"])
    m = p["machine"]
    assert m["logical_cores"] == os.cpu_count()
    assert m["total_ram_bytes"] is None or m["total_ram_bytes"] > 0
    # independent reference for the SHA: git itself, run on the directory the package lives in
    pkg_dir = Path(results.__file__).resolve().parent
    ref = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg_dir, capture_output=True, text=True)
    if ref.returncode == 0:
        assert p["git"]["sha"] == ref.stdout.strip()
        assert isinstance(p["git"]["dirty"], bool)
    else:
        assert p["git"]["sha"] is None
    json.dumps(results.to_jsonable(p))  # JSON-able as is


def test_provenance_cpu_model_from_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this platform")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.lower().startswith("model name")]
    if names:
        assert provenance()["machine"]["cpu_model"] == names[0]


def test_cpu_details_name_family_model_and_vector_extensions(tmp_path):
    """Two VMs both called "AMD EPYC" differ 2x in BLAS speed: records keep family, model and SIMD flags."""
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512bw\n\n"
                    "processor\t: 1\ncpu family\t: 99\nflags\t\t: fpu\n")
    assert prov._cpu_details(str(fake)) == {"cpu_family": "26", "model": "2",
                                               "simd": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    assert prov._cpu_details(str(tmp_path / "missing")) == {}
    assert "simd" in prov.machine_info()["cpu"] or not Path("/proc/cpuinfo").exists()


def test_git_info_outside_git_is_none_and_does_not_crash(tmp_path):
    info = prov.git_info(tmp_path)
    assert info == {"sha": None, "dirty": None, "branch": None, "root": None}
    assert prov.git_info(tmp_path / "does-not-exist")["sha"] is None


def test_git_info_without_git_binary(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert prov.git_info()["sha"] is None


def test_write_json_atomic_roundtrip_numpy(tmp_path):
    obj = {
        "a": np.float32(1.5), "b": np.int64(7), "c": np.arange(4, dtype=np.int32),
        "d": np.eye(2), "e": np.bool_(True), "f": (1, 2), "g": Path("/x/y"),
        "nan": float("nan"), "npnan": np.float64(np.inf),
    }
    out = write_json_atomic(tmp_path / "sub" / "r.json", obj)
    assert out == (tmp_path / "sub" / "r.json").resolve()
    loaded = json.loads(out.read_text())
    assert loaded == {"a": 1.5, "b": 7, "c": [0, 1, 2, 3], "d": [[1.0, 0.0], [0.0, 1.0]],
                      "e": True, "f": [1, 2], "g": "/x/y", "nan": None, "npnan": None}
    assert list((tmp_path / "sub").iterdir()) == [out]  # no temp file left behind


def test_write_json_atomic_refuses_overwrite(tmp_path):
    p = tmp_path / "r.json"
    write_json_atomic(p, {"v": 1})
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_json_atomic(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 1}
    write_json_atomic(p, {"v": 3}, overwrite=True)
    assert json.loads(p.read_text()) == {"v": 3}


def test_write_json_atomic_unserializable_leaves_no_file(tmp_path):
    p = tmp_path / "r.json"
    with pytest.raises(TypeError, match="cannot serialize"):
        write_json_atomic(p, {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    write_json_atomic(p, {"v": 1})

    def boom(*a, **k):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_json_atomic(p, {"v": 2}, overwrite=True)
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_append_jsonl_lines_and_truncated_tail(tmp_path):
    p = tmp_path / "sweep" / "runs.jsonl"
    append_jsonl(p, {"i": 0, "x": np.float64(0.5)})
    append_jsonl(p, {"i": 1, "arr": np.array([1, 2])})
    text = p.read_text()
    assert text.count("\n") == 2
    assert [json.loads(line) for line in text.splitlines()] == [{"i": 0, "x": 0.5}, {"i": 1, "arr": [1, 2]}]
    with open(p, "a") as fh:  # simulate a crash mid-line
        fh.write('{"i": 2, "x"')
    with pytest.warns(RuntimeWarning, match="line 3"):
        assert read_jsonl(p) == [{"i": 0, "x": 0.5}, {"i": 1, "arr": [1, 2]}]
    # the next append after a torn line starts a line of its own: the file stays readable for good
    append_jsonl(p, {"i": 3})
    with pytest.warns(RuntimeWarning, match="skipped 1 line"):
        assert read_jsonl(p) == [{"i": 0, "x": 0.5}, {"i": 1, "arr": [1, 2]}, {"i": 3}]
    assert json.loads(p.read_text().splitlines()[-1]) == {"i": 3}


def test_append_jsonl_short_write_on_full_disk_is_an_error(tmp_path, monkeypatch):
    p = tmp_path / "runs.jsonl"
    append_jsonl(p, {"i": 0})
    real_write = results.os.write

    def full_disk(fd, data):  # the kernel accepted only part of the line, as on ENOSPC
        return real_write(fd, data[:5])

    monkeypatch.setattr(results.os, "write", full_disk)
    with pytest.raises(OSError, match="disk full"):
        append_jsonl(p, {"i": 1, "payload": "x" * 100})
    monkeypatch.undo()
    append_jsonl(p, {"i": 2})
    with pytest.warns(RuntimeWarning):
        assert read_jsonl(p) == [{"i": 0}, {"i": 2}]


def test_check_writable_dir_probes_and_leaves_nothing(tmp_path):
    from kernelfit.errors import InputError
    from kernelfit.places import check_output_file, check_writable_dir

    assert check_writable_dir(tmp_path / "new" / "deeper", "--out") == tmp_path  # probed where it would be made
    assert list(tmp_path.iterdir()) == []  # the probe is gone, nothing was created
    with pytest.raises(InputError, match="--out /proc/x.json: cannot create files in /proc"):
        check_output_file(Path("/proc/x.json"), "--out")
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(InputError, match="is a file, not a directory"):
        check_writable_dir(tmp_path / "afile" / "sub", "--checkpoint-dir")
    with pytest.raises(InputError, match="already exists"):
        check_output_file(tmp_path / "afile", "--out")
    with pytest.raises(InputError, match="is a directory"):
        check_output_file(tmp_path, "--out")
    assert (tmp_path / "afile").read_text() == "keep"


def test_check_free_space_refuses_more_than_free(tmp_path):
    from kernelfit.errors import InputError
    from kernelfit.places import check_free_space, free_bytes

    free = free_bytes(tmp_path)
    check_free_space(tmp_path, 1, "--out", "the record")
    with pytest.raises(InputError, match="needs .* GiB but only"):
        check_free_space(tmp_path, free + 2**40, "--checkpoint-dir", "the checkpoint")


def test_peak_rss_grows_with_allocation():
    before = peak_rss_bytes()
    assert before > 1 << 20  # a python process with numpy uses more than 1 MiB
    # touch 200 MB so it is resident; the peak must rise by at least most of it
    block = np.ones(200 * 1024 * 1024 // 8)
    after = peak_rss_bytes()
    del block
    # cross-check against the kernel's own counter where available
    status = Path("/proc/self/status")
    if status.exists():
        hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
        if hwm:
            hwm_bytes = int(hwm[0].split()[1]) * 1024
            assert abs(hwm_bytes - after) <= 0.05 * hwm_bytes + (8 << 20)
    assert after >= before
    assert after >= 150 * 1024 * 1024


def test_phase_timer_measures_and_accumulates():
    t = PhaseTimer()
    with t.phase("sleep"):
        time.sleep(0.05)
    with t.phase("sleep"):
        time.sleep(0.05)
    with t("other"):
        pass
    d = t.as_dict()
    assert set(d) == {"sleep", "other"}
    assert 0.09 <= d["sleep"] < 1.0
    assert 0 <= d["other"] < 0.05


def test_phase_timer_records_on_exception_and_total():
    t = PhaseTimer()
    with pytest.raises(RuntimeError):
        with t.phase("fails"):
            raise RuntimeError("x")
    assert "fails" in t.as_dict()
    with PhaseTimer() as t2:
        time.sleep(0.01)
    assert t2.as_dict()["total"] >= 0.01


def test_provenance_in_fresh_process_outside_repo(tmp_path):
    # Imported from the repo but run from elsewhere: the SHA is still that of the package's repo.
    code = "import json,kernelfit.provenance as r; print(json.dumps(r.provenance()['git']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    git = json.loads(out.stdout)
    ref = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(results.__file__).parent,
                         capture_output=True, text=True)
    assert git["sha"] == (ref.stdout.strip() if ref.returncode == 0 else None)


def test_git_info_dirty_flag_in_a_fresh_repo(tmp_path):
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not available")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init")
    info = prov.git_info(tmp_path)
    assert info["sha"] == git("rev-parse", "HEAD") and len(info["sha"]) == 40
    assert info["dirty"] is False
    (tmp_path / "untracked.txt").write_text("x")  # untracked files do not make it dirty
    assert prov.git_info(tmp_path)["dirty"] is False
    (tmp_path / "f.txt").write_text("b")
    assert prov.git_info(tmp_path)["dirty"] is True


def test_versions_match_modules_and_no_torch_import_without_gpu_driver(tmp_path):
    import scipy
    import sklearn

    v = prov.library_versions()
    assert v["scipy"] == scipy.__version__ and v["sklearn"] == sklearn.__version__
    if prov._gpu_driver_present():
        pytest.skip("a GPU driver is present; torch is imported to name the GPU")
    code = ("import sys, kernelfit.provenance as r; p = r.provenance(); "
            "print('torch' in sys.modules, p['machine']['gpu'], p['versions']['torch'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported, gpu, has_torch_version = out.stdout.split()
    assert imported == "False" and gpu == "None"
    import importlib.util

    assert has_torch_version == str(importlib.util.find_spec("torch") is not None)


def test_atomic_files_get_umask_permissions_not_mkstemp_0600(tmp_path):
    import os
    import stat

    from kernelfit.results import atomic_file, write_json_atomic

    old = os.umask(0o022)
    try:
        p = write_json_atomic(tmp_path / "r.json", {"a": 1})
        with atomic_file(tmp_path / "b.bin") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o644


def test_atomic_file_leaves_target_untouched_on_error(tmp_path):
    from kernelfit.results import atomic_file

    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as f:
            f.write("new, half written")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
