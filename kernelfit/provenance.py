"""Provenance of a result: git revision, library versions, machine (CPU, SIMD flags, RAM, GPU), time
and command line, recorded the same way by every experiment."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["provenance", "git_info", "library_versions", "machine_info"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _run_git(args: list[str], cwd: Path) -> str | None:
    """Run git; return stripped stdout or None on any failure (no git, not a repo, timeout)."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=str(cwd), capture_output=True, text=True, timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip()


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Git SHA, dirty flag and branch of the repository holding ``path`` (default: this package).

    ``dirty`` is True when tracked files differ from HEAD (untracked files do not count).
    Outside a git checkout (e.g. an installed wheel) every field is None; never raises.
    """
    cwd = Path(path) if path is not None else _PACKAGE_DIR
    if cwd.is_file():
        cwd = cwd.parent
    info: dict[str, Any] = {"sha": None, "dirty": None, "branch": None, "root": None}
    if not cwd.exists():
        return info
    root = _run_git(["rev-parse", "--show-toplevel"], cwd)
    if not root:
        return info
    info["root"] = root
    info["sha"] = _run_git(["rev-parse", "HEAD"], cwd)
    branch = _run_git(["rev-parse", "--abbrev-ref", "HEAD"], cwd)
    info["branch"] = branch or None
    status = _run_git(["status", "--porcelain", "--untracked-files=no"], cwd)
    info["dirty"] = None if status is None else bool(status)
    return info


_DISTRIBUTIONS = {"numpy": "numpy", "scipy": "scipy", "torch": "torch", "sklearn": "scikit-learn",
                  "kernelfit": "kernelfit"}


def _version_of(module_name: str) -> str | None:
    # An already imported module knows its version; otherwise ask the installed metadata so that
    # recording provenance does not import torch (seconds) into a numpy-only run.
    mod = sys.modules.get(module_name)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(_DISTRIBUTIONS.get(module_name, module_name))
    except PackageNotFoundError:
        pass
    except Exception:
        pass
    try:  # a source checkout that is not installed
        mod = __import__(module_name)
    except Exception:  # not installed or broken: record absence, never fail a run
        return None
    return getattr(mod, "__version__", None)


def library_versions() -> dict[str, str | None]:
    """Versions of python and the numerical libraries (None where a library is absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key in _DISTRIBUTIONS:
        versions[key] = _version_of(key)
    return versions


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# Vector extensions that change BLAS / convolution speed by 2-4x between machines with the same
# model name (the VMs here all say "AMD EPYC" or "Intel Xeon Processor").
_SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


def _cpu_details(path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU family / model numbers and the vector extensions of /proc/cpuinfo (empty where unreadable)."""
    info: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("cpu family", "model") and key.replace(" ", "_") not in info:
                    info[key.replace(" ", "_")] = value.strip()
                elif key in ("flags", "features") and "simd" not in info:
                    have = set(value.split())
                    info["simd"] = [f for f in _SIMD_FLAGS if f in have]
                if not line.strip() and info:
                    break   # the first processor's block is enough
    except OSError:
        pass
    return info


def _total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gpu_driver_present() -> bool:
    # NVIDIA (CUDA) or AMD (ROCm) kernel drivers; without either torch.cuda cannot see a GPU.
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")


def _gpu_info() -> dict[str, Any] | None:
    """The CUDA device torch would use, or None. A missing or CPU-only torch means "no GPU"."""
    if "torch" not in sys.modules and not _gpu_driver_present():
        return None  # skip importing torch (seconds) on a machine that has no GPU driver
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return {
            "name": torch.cuda.get_device_name(idx),
            "count": torch.cuda.device_count(),
            "total_memory_bytes": int(props.total_memory),
            "cuda": getattr(torch.version, "cuda", None),
        }
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model (+ family / model numbers and vector extensions), cores, RAM, GPU (None without CUDA), host, OS."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu": _cpu_details(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "total_ram_bytes": _total_ram_bytes(),
        "gpu": _gpu_info(),
        "hostname": platform.node() or None,
        "platform": platform.platform(),
    }


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Everything needed to say where a result came from. Never raises.

    Keys: ``git`` (sha, dirty, branch, root of the repo this package is imported from, all None
    outside git), ``versions``, ``machine``, ``timestamp_utc`` (ISO 8601), ``command`` (argv
    list; ``sys.argv`` unless given), ``cwd``.
    """
    return {
        "git": git_info(),
        "versions": library_versions(),
        "machine": machine_info(),
        "timestamp_utc": _utc_now(),
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
    }
