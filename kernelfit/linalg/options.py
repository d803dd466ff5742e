"""Placement options of a factorization: where and how the Cholesky runs.

None of these change the mathematics of a solve beyond rounding (TF32 aside, which refinement
repairs), so they are kept apart from ``kernelfit.solve.SolveOptions`` (kernel, bandwidth, mode,
jitter, refinement), which holds a ``FactorOptions`` as its ``placement`` field (falkon-style).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FactorOptions:
    backend: str = "auto"                    # "auto" | "numpy" | "torch" | "cupy" (see linalg/factor.py)
    device: str | None = None                # None = CPU; "cuda", "cuda:1", ... factors on that GPU
    out_of_core: bool | str = "auto"         # True: stream panels through the GPU; "disk": the Gram and factor on
                                             # disk under scratch_dir; "auto": decided by the memory plan
    device_memory_budget: int | None = None  # bytes the factorization may use on the device (None: measured)
    tf32: bool = False                       # CUDA float32 factor GEMMs on TF32 tensor cores
    block_size: int | None = None            # panel width; None picks one from n
    checkpoint_dir: str | None = None        # save finished factor panels here; resume=True continues
    resume: bool = False
    scratch_dir: str | None = None           # disk out-of-core store (``linalg.diskstore``); "auto" may use it
    memory_budget: int | None = None         # host bytes of the disk factorization (None: planning's default)
    progress: bool = False                   # progress lines on stderr

    @property
    def on_cuda(self) -> bool:
        """The factorization is placed on a CUDA device (``device`` "cuda", "cuda:1", ...)."""
        return self.device is not None and str(self.device).startswith("cuda")
