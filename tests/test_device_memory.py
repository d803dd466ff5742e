"""Free device memory as the next allocation sees it: cudaMemGetInfo counts the blocks that torch's
caching allocator (or cupy's pool) holds but does not use as taken; the planner must not. The CUDA
queries are replaced by fakes with known numbers, so this runs without a GPU."""

import sys
import types

import pytest

torch = pytest.importorskip("torch")

from kernelfit.errors import InputError  # noqa: E402
from kernelfit.linalg.backend import free_device_bytes  # noqa: E402

GiB = 2**30


@pytest.fixture
def fake_torch_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (1 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 10 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("torch.empty_cache"))
    return calls


def _fake_cupy(monkeypatch, calls):
    pool = types.SimpleNamespace(free_bytes=lambda: 3 * GiB, free_all_blocks=lambda: calls.append("cupy.free_all"))
    cupy = types.ModuleType("cupy")
    cupy.get_default_memory_pool = lambda: pool
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=lambda: (4 * GiB, 80 * GiB)))
    monkeypatch.setitem(sys.modules, "cupy", cupy)


def test_torch_cache_counts_as_free(fake_torch_cuda, monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    # 1 GiB free in the driver + 8 GiB reserved by torch but unallocated
    assert free_device_bytes("cuda") == 9 * GiB


def test_cupy_pool_is_returned_before_a_torch_measurement(fake_torch_cuda, monkeypatch):
    _fake_cupy(monkeypatch, fake_torch_cuda)
    free_device_bytes("cuda:0")
    assert fake_torch_cuda == ["cupy.free_all"]


def test_cupy_consumer_counts_its_pool_and_gets_torchs_cache_back(fake_torch_cuda, monkeypatch):
    _fake_cupy(monkeypatch, fake_torch_cuda)
    assert free_device_bytes("cupy") == 4 * GiB + 3 * GiB
    assert fake_torch_cuda == ["torch.empty_cache"]


def test_meta_device_has_nothing_to_measure():
    with pytest.raises(InputError, match="device_memory_budget"):
        free_device_bytes("meta")

