"""Full-size dry runs on torch's "meta" device (shapes and dtypes, no values, no memory): the
in-core and out-of-core factorizations at n = 60,000 and 150,000, float32 and float64, with the
memory budget of one H200, run every allocation, copy and kernel call of the real run in seconds.
Host panels are zero-stride arrays of the right shapes (no host memory either)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kernelfit.errors import InputError  # noqa: E402
from kernelfit.linalg.factor import factor  # noqa: E402
from kernelfit.linalg.options import FactorOptions  # noqa: E402
from kernelfit.linalg.outofcore import TorchDevice, budget_for_slabs, plan_slabs  # noqa: E402
from kernelfit.linalg.panels import SymmetricPanels, choose_block  # noqa: E402

H200_USABLE = int(0.9 * 139 * 2**30)     # 90% of one H200's free memory, as factor() plans it


def phantom_panels(n, dtype):
    """SymmetricPanels of the right shapes and dtype backed by a single number (zero strides)."""
    block = choose_block(n)
    one = np.zeros(1, dtype=dtype)
    panels = [np.lib.stride_tricks.as_strided(one, shape=(n - s, min(block, n - s)), strides=(0, 0))
              for s in SymmetricPanels.starts_for(n, block)]
    return SymmetricPanels(n=n, block=block, panels=panels)


@pytest.mark.parametrize("n", [60_000, 150_000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_core_plan_and_run_on_meta(n, dtype):
    G = phantom_panels(n, dtype)
    gram = SymmetricPanels.nbytes_for(n, G.block, dtype)
    assert G.nbytes == gram
    info = factor(G, FactorOptions(device="meta", out_of_core="auto", device_memory_budget=H200_USABLE))
    assert info.path == "in-core"                       # both sizes fit one H200 in float32 and float64
    assert info.device_memory["in_core_bytes"] <= H200_USABLE
    assert info.bytes_moved == {"h2d": gram, "d2h": gram}
    assert (info.backend, info.device, info.dtype) == ("torch", "meta", np.dtype(dtype).name)


@pytest.mark.parametrize("n", [60_000, 150_000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_of_core_three_slabs_on_meta(n, dtype):
    G = phantom_panels(n, dtype)
    itemsize = np.dtype(dtype).itemsize
    workspace = TorchDevice("meta").workspace_bytes(G.block, n, itemsize)
    budget = budget_for_slabs(n, G.block, itemsize, 3, workspace)
    plan = plan_slabs(n, G.block, itemsize, budget, workspace)
    assert len(plan.slabs) >= 3 and budget < G.nbytes       # a run that claims out-of-core really streams
    assert len(plan_slabs(n, G.block, itemsize, budget + itemsize * G.block * n, workspace).slabs) <= len(plan.slabs)
    info = factor(G, FactorOptions(device="meta", out_of_core=True, device_memory_budget=budget))
    mem = info.device_memory
    assert info.path == "out-of-core" and mem["slabs"] == len(plan.slabs) >= 3
    assert workspace < mem["peak_bytes"] <= mem["budget_bytes"] == budget
    assert info.bytes_moved["d2h"] == G.nbytes and info.bytes_moved["h2d"] > G.nbytes


def test_meta_without_a_budget_is_a_clear_error():
    with pytest.raises(InputError, match="device='meta'.*device_memory_budget"):
        factor(phantom_panels(1000, np.float32), FactorOptions(device="meta"))


def test_meta_dry_run_refuses_what_would_not_fit():
    from kernelfit.errors import MemoryPlanError

    G = phantom_panels(150_000, np.float64)       # 85 GiB: not on a 40 GiB device in core
    with pytest.raises(MemoryPlanError, match="does not fit on meta"):
        factor(G, FactorOptions(device="meta", out_of_core=False, device_memory_budget=40 * 2**30))
