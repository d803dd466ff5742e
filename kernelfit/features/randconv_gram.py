"""The blockwise Gram of random-convolution features: ``Phi Phi^T`` accumulated filter block by filter
block (float32 GEMMs, TF32 off, float64 sums), standardized per feature with training statistics, dense
or as ``SymmetricPanels``, on the CPU or a GPU, within a memory plan, with resumable checkpoints.
``RandConvFeatures.accumulate_gram`` / ``gram_plan`` call the functions here with the feature map.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, MemoryPlanError
from .gabor import _available_bytes

__all__ = ["GramBlocks", "GramOptions", "DEFAULT_GRAM_OPTIONS", "gram_plan", "accumulate_gram", "torch_device"]


@dataclass
class GramBlocks:
    """Result of ``RandConvFeatures.accumulate_gram`` (all float64).

    train: (n, n) Gram of the training features (or a ``SymmetricPanels`` when asked for panels);
    train_diag: (n,); cross: (m, n) test x train Gram (None without test images); test_diag: (m,).
    filters_done: the number of filters accumulated so far when this is a checkpoint of an unfinished
    accumulation (``accumulate_gram(resume=...)`` continues it); None when every filter is in.
    """

    train: object
    train_diag: np.ndarray
    cross: np.ndarray | None
    test_diag: np.ndarray | None
    n_features: int
    filters_done: int | None = None

    @property
    def complete(self) -> bool:
        return self.filters_done is None

    def squared_distances(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(train x train, test x train) squared feature distances, clamped at 0 (dense only)."""
        if not isinstance(self.train, np.ndarray):
            raise InputError("squared_distances needs a dense train Gram; accumulate with panels=False.")
        dtr = self.train_diag[:, None] + self.train_diag[None, :] - 2.0 * self.train
        np.maximum(dtr, 0.0, out=dtr)
        np.fill_diagonal(dtr, 0.0)
        dte = None
        if self.cross is not None:
            dte = np.maximum(self.test_diag[:, None] + self.train_diag[None, :] - 2.0 * self.cross, 0.0)
        return dtr, dte


@dataclass(frozen=True)
class GramOptions:
    """How ``RandConvFeatures.accumulate_gram`` accumulates: its layout, limits and device.

    filter_block  filters per block of features (the unit of work and of checkpoints)
    image_block   images per convolution batch (None: chosen from the memory)
    standardize   centre and scale each feature by its training mean / std
    panels        accumulate the train Gram as ``SymmetricPanels`` (lower triangle, half the bytes)
    panel_block   panel width then (None: ``choose_block``)
    max_bytes     host bytes allowed (None: 80% of the available memory)
    device        torch device of the features and products (None: CPU)
    """

    filter_block: int = 256
    image_block: int | None = None
    standardize: bool = True
    panels: bool = False
    panel_block: int | None = None
    max_bytes: int | None = None
    device: object = None


DEFAULT_GRAM_OPTIONS = GramOptions()


def gram_plan(features, n: int, m: int = 0, filter_block: int = 256, panels: bool = False) -> dict:
    """Bytes of the Gram (dense or panels), of one feature block, and of the full feature matrix never built."""
    cells = 2 * int(features.config.pool_grid) ** 2
    gram = (n * (n + 2048) // 2 if panels else n * n) * 8 + m * n * 8
    block = (n + m) * cells * filter_block * 4
    return {"gram_bytes": gram, "feature_block_bytes": block, "total_bytes": gram + 2 * block,
            "n_features": features.n_features, "full_feature_matrix_bytes": (n + m) * features.n_features * 4}

def accumulate_gram(features, train_images, test_images=None, options: GramOptions = DEFAULT_GRAM_OPTIONS, *,
                    progress=None, checkpoint=None, checkpoint_every: float = 1800.0,
                    resume: GramBlocks | None = None) -> GramBlocks:
    """Gram matrices of the (optionally standardized) features of ``features`` (a fitted
    ``RandConvFeatures``), one filter block at a time.

    ``standardize``: each feature is centred and scaled by its mean / std over the *training*
    images (test images use the training statistics). ``panels=True`` accumulates the train Gram
    into the solver's ``kernelfit.linalg.panels.SymmetricPanels`` (lower triangle only).
    ``device``: torch device for features and Gram products (default CPU); on a GPU the Grams are
    accumulated in device memory and copied to the host once at the end. Results are numpy float64.

    Long runs (hours on a CPU at full CIFAR-10 size) can be interrupted without losing the work:
    ``checkpoint(partial)`` is called with the unfinished ``GramBlocks`` (``filters_done`` set) after
    the first filter block that ends ``checkpoint_every`` seconds or more after the previous
    checkpoint (0: after every block; on the CPU ``partial`` shares memory with the accumulators, so
    save it before returning). ``resume=partial`` continues such a checkpoint of the same images and
    configuration (the caller's cache key says so) in place, and ends with the same Gram as an
    uninterrupted run: every feature column is standardized by its own statistics, so where the
    filter blocks were cut does not matter. ``options`` (``GramOptions``) holds the layout and the
    limits; ``progress(done, total)`` is called per filter block.
    """
    import torch

    filter_block, image_block, standardize = options.filter_block, options.image_block, options.standardize
    panels, panel_block, max_bytes, device = options.panels, options.panel_block, options.max_bytes, options.device

    from ..linalg.backend_torch import tf32_disabled

    dev = torch_device(device)
    xtr = features._as_images(train_images)
    xte = features._as_images(test_images) if test_images is not None else None
    n, m = len(xtr), (0 if xte is None else len(xte))
    plan = gram_plan(features, n, m, filter_block, panels)
    start = 0 if resume is None else _check_resume(features, resume, n, m, panels, panel_block)
    limit = max_bytes if max_bytes is not None else 0.8 * _available_bytes()
    need = plan["total_bytes"] if dev.type == "cpu" else plan["gram_bytes"]   # host side
    if resume is not None and dev.type == "cpu":
        need -= plan["gram_bytes"]   # the checkpoint's arrays are the accumulators, already in memory
    if need > limit:
        raise MemoryPlanError(
            f"random-conv Gram accumulation needs {need / 2**30:.1f} GiB more (Gram "
            f"{plan['gram_bytes'] / 2**30:.1f} GiB"
            f"{', already held by the checkpoint' if resume is not None and dev.type == 'cpu' else ''}"
            f" + two feature blocks of {plan['feature_block_bytes'] / 2**30:.2f} GiB), more than the "
            f"{limit / 2**30:.1f} GiB allowed. Plan: reduce n, use panels=True (half the Gram), or a smaller "
            f"filter_block.", plan=plan,
        )
    if dev.type == "cuda":
        from ..linalg.backend import free_device_bytes

        free = free_device_bytes(dev)   # torch's cached blocks count as free: torch reuses them
        if plan["total_bytes"] > 0.9 * free:
            raise MemoryPlanError(
                f"random-conv Gram accumulation on {dev} needs {plan['total_bytes'] / 2**30:.1f} GiB of device "
                f"memory and {free / 2**30:.1f} GiB is free. Plan: panels=True, a smaller filter_block, or "
                f"device='cpu'.", plan=plan)
    x_all = xtr if xte is None else np.concatenate([xtr, xte])

    def accumulator(shape, init=None):
        """``init`` (a checkpoint's array) or zeros. CPU: numpy memory shared with torch; GPU: device tensor."""
        if dev.type == "cpu":
            return torch.from_numpy(init if init is not None else np.zeros(shape, dtype=np.float64))
        if init is not None:
            return torch.from_numpy(init).to(dev)
        return torch.zeros(shape, dtype=torch.float64, device=dev)

    def resumed(name, state=resume):
        return None if state is None else getattr(state, name)

    if panels:
        from ..linalg.panels import SymmetricPanels

        layout = resume.train if resume is not None else SymmetricPanels.empty(n, panel_block, np.float64)
        starts = layout.starts
        G = [accumulator(P.shape, P if resume is not None else None) for P in layout.panels]
        del layout
    else:
        G = accumulator((n, n), resumed("train"))
    dtr = accumulator(n, resumed("train_diag"))
    C = accumulator((m, n), resumed("cross")) if m else None
    dte = accumulator(m, resumed("test_diag")) if m else None
    del resume, resumed   # its arrays now belong to the accumulators (updated in place on the CPU)
    F = int(features.config.n_filters)

    def host(t):
        return None if t is None else t.cpu().numpy()

    def gram_blocks(filters_done=None):
        if panels:
            train = SymmetricPanels(n=n, block=G[0].shape[1], panels=[host(P) for P in G])
        else:
            train = host(G)
        return GramBlocks(train=train, train_diag=host(dtr), cross=host(C), test_diag=host(dte),
                          n_features=features.n_features, filters_done=filters_done)

    last_checkpoint = time.perf_counter()
    with tf32_disabled():
        for _, f1, phi in features._torch_blocks(x_all, filter_block, image_block, dev, start=start):
            if standardize:
                mu, sd = _column_stats(phi[:n])
                # Constant features (e.g. a rectifier never active) carry nothing: zero them.
                keep = sd > 1e-8 * max(float(sd.max()), 1e-30)
                inv = torch.where(keep, 1.0 / torch.where(keep, sd, torch.ones_like(sd)), torch.zeros_like(sd))
                phi -= mu.float()
                phi *= inv.float()
            ptr = phi[:n]
            if panels:
                for s0, P in zip(starts, G):
                    _accumulate_product(P, ptr[s0:], ptr[s0 : s0 + P.shape[1]])
            else:
                for r0 in range(0, n, _ROWS):
                    _accumulate_product(G[r0 : r0 + _ROWS], ptr[r0 : r0 + _ROWS], ptr)
            dtr += (ptr * ptr).sum(dim=1, dtype=torch.float64)
            if m:
                pte = phi[n:]
                for r0 in range(0, m, _ROWS):   # row chunks: no m x n float32 temporary
                    _accumulate_product(C[r0 : r0 + _ROWS], pte[r0 : r0 + _ROWS], ptr)
                dte += (pte * pte).sum(dim=1, dtype=torch.float64)
            del phi, ptr
            if progress is not None:   # in features: every filter gives n_features / F of them
                progress(f1 * (features.n_features // F), features.n_features)
            if checkpoint is not None and f1 < F and time.perf_counter() - last_checkpoint >= checkpoint_every:
                checkpoint(gram_blocks(filters_done=f1))
                last_checkpoint = time.perf_counter()
    return gram_blocks()

def _check_resume(features, resume: GramBlocks, n: int, m: int, panels: bool, panel_block) -> int:
    """The filter to continue from; refuses a checkpoint that does not fit this accumulation."""
    from ..linalg.panels import SymmetricPanels

    F = int(features.config.n_filters)
    found_m = 0 if resume.cross is None else resume.cross.shape[0]
    problems = []
    if resume.complete or not 0 < resume.filters_done < F:
        problems.append(f"filters_done = {resume.filters_done} (expected 1 .. {F - 1}: an unfinished run)")
    if resume.n_features != features.n_features:
        problems.append(f"{resume.n_features} features (this map has {features.n_features})")
    if len(resume.train_diag) != n or found_m != m:
        problems.append(f"{len(resume.train_diag)} train / {found_m} test images (given {n} / {m})")
    if isinstance(resume.train, SymmetricPanels) != panels:
        problems.append(f"{'panel' if not panels else 'dense'} layout (asked for panels={panels})")
    elif panels and panel_block is not None and resume.train.block != panel_block:
        problems.append(f"panel block {resume.train.block} (asked for {panel_block})")
    if problems:
        raise InputError("cannot resume this Gram accumulation from the given checkpoint: "
                         + "; ".join(problems) + ". Resume with the images, configuration and layout "
                         "that wrote it, or start again without resume.")
    return int(resume.filters_done)


_ROWS = 2048   # row chunk of the dense / cross Gram products (bounds the float32 temporaries)


def _accumulate_product(dst, a, b):
    """dst (float64) += a @ b.T (float32 product). On the CPU both steps go through numpy: its BLAS
    sgemm ran 1.2-1.3x faster than torch's matmul on these shapes (50,000 x 4,000 by 4,000 x 2,048, AMD
    EPYC VM) and its mixed-dtype add ~4x faster (1.2e9 vs 2.9e8 elements/s); on a GPU all in torch."""
    if dst.device.type == "cpu":
        d = dst.numpy()
        np.add(d, a.numpy() @ b.numpy().T, out=d)
    else:
        dst += a @ b.T


def _column_stats(phi, rows: int = 8192):
    """Per-column mean and (population) std of a float32 tensor, accumulated in float64 by row chunks."""
    import torch

    n = phi.shape[0]
    total = torch.zeros(phi.shape[1], dtype=torch.float64, device=phi.device)
    for r0 in range(0, n, rows):
        total += phi[r0 : r0 + rows].sum(dim=0, dtype=torch.float64)
    mu = total / n
    sq = torch.zeros_like(total)
    mu32 = mu.float()
    for r0 in range(0, n, rows):
        sq += ((phi[r0 : r0 + rows] - mu32) ** 2).sum(dim=0, dtype=torch.float64)
    return mu, torch.sqrt(sq / n)


def torch_device(device):
    """torch.device for feature computation: None -> CPU; CUDA requested without a GPU -> clear error."""
    from ..linalg.backend_torch import resolve_device

    return resolve_device("cpu" if device is None else device)
