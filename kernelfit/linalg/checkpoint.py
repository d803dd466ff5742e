"""Checkpoint / resume for long factorizations.

A checkpoint directory holds ``manifest.json`` (n, block, dtype, a sha256 of the *input* panels and
of the caller's config, the last finished panel, the strategy) and one ``.npy`` file per finished
factor panel, written once each. Every file is written to a temporary name, fsynced and moved into
place with ``os.replace``; the manifest is replaced last, so a crash at any moment leaves the
previous consistent checkpoint.

What a resumable state is depends on the algorithm:

* out-of-core (left-looking, ``outofcore.py``): trailing host panels are never modified before their
  slab is factored, so finished panels *are* the state. Resume = load them, continue.
* in-core right-looking (``tiled.cholesky_inplace``): every finished panel has already been
  subtracted from all trailing panels. Two strategies:
  - ``"recompute"`` (default): save finished panels only (n^2/2 numbers written over the whole run,
    the cheapest possible checkpoint). On resume the caller passes the rebuilt *input*; the trailing
    panels are brought up to date by re-applying the finished panels' updates (same GEMMs, same
    order, hence bitwise the same on one machine). Resume costs the trailing-update work done so
    far (at 60% of the panels: ~29% of the total flops) but checkpoints cost almost nothing.
  - ``"trailing"``: also save all trailing panels at each checkpoint. Resume is instant, but one
    checkpoint writes up to n^2/2 numbers (7.2 GB at n = 60,000 float32), so checkpoint every k
    panels (``every``); over a run that is ~(panels / k) / 3 x the Gram size written.

Resume refuses a checkpoint whose n, block, dtype, input hash or config hash differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..results import atomic_file
from .tiled import SymmetricPanels

FORMAT = "kernelfit.cholesky-checkpoint/1"
STRATEGIES = ("recompute", "trailing")


def input_hash(G: SymmetricPanels, config: dict | None = None) -> str:
    """sha256 of the input panels (shape, dtype, bytes) and a JSON config: O(n^2) reads, << n^3."""
    h = hashlib.sha256()
    h.update(json.dumps({"n": G.n, "block": G.block, "dtype": str(np.dtype(G.dtype)),
                         "config": config or {}}, sort_keys=True, default=str).encode())
    for P in G.panels:
        h.update(np.ascontiguousarray(P).view(np.uint8).data)
    return h.hexdigest()


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    with atomic_file(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def _atomic_json(path: Path, obj: dict) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


class Checkpointer:
    """Saves finished panels (and, with strategy 'trailing', trailing panels) of a factorization.

    Call ``begin(G)`` on the *input* (computes its hash), then use ``hook`` as ``on_panel_done``."""

    def __init__(self, directory, *, every: int = 1, strategy: str = "recompute", algorithm: str = "right-looking",
                 config: dict | None = None):
        if strategy not in STRATEGIES:
            raise InputError(f"unknown checkpoint strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}.")
        if algorithm not in ("right-looking", "left-looking"):
            raise InputError(f"algorithm must be 'right-looking' or 'left-looking'; got {algorithm!r}.")
        if int(every) < 1:
            raise InputError(f"checkpoint every must be >= 1 panel; got {every!r}.")
        self.dir = Path(directory)
        self.every, self.strategy, self.algorithm = int(every), strategy, algorithm
        self.config = config or {}
        self.G = None
        self.hash = None
        self.saved_upto = -1          # last finished panel written
        self.last_checkpoint = -1
        self.generation = 0
        self.bytes_written = 0
        self.saves = 0
        self.pending_updates = False

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def begin(self, G: SymmetricPanels) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.G = G
        self.hash = input_hash(G, self.config)

    def _manifest(self, last: int, complete: bool) -> dict:
        return {"format": FORMAT, "n": self.G.n, "block": self.G.block, "dtype": str(np.dtype(self.G.dtype)),
                "input_sha256": self.hash, "config": self.config, "strategy": self.strategy,
                "algorithm": self.algorithm, "last_finished_panel": last, "panels": len(self.G.panels),
                "trailing_generation": self.generation if self._saves_trailing else None,
                "complete": complete}

    @property
    def _saves_trailing(self) -> bool:
        return self.strategy == "trailing" and self.algorithm == "right-looking"

    def hook(self, j: int) -> None:
        """on_panel_done(j): checkpoint every ``every`` panels and at the end."""
        last = len(self.G.panels) - 1
        if j - self.last_checkpoint >= self.every or j == last:
            self.save(j)

    def save(self, last: int) -> None:
        G = self.G
        for k in range(self.saved_upto + 1, last + 1):
            _atomic_save(self.dir / f"L_{k:05d}.npy", _host(G.panels[k]))
            self.bytes_written += G.panels[k].nbytes
        self.saved_upto = last
        old_gen = self.generation
        if self._saves_trailing and last < len(G.panels) - 1:
            self.generation += 1
            for i in range(last + 1, len(G.panels)):
                _atomic_save(self.dir / f"T{self.generation:05d}_{i:05d}.npy", _host(G.panels[i]))
                self.bytes_written += G.panels[i].nbytes
        _atomic_json(self.manifest_path, self._manifest(last, complete=last == len(G.panels) - 1))
        if self._saves_trailing:
            for p in self.dir.glob(f"T{old_gen:05d}_*.npy"):
                p.unlink()
        self.last_checkpoint = last
        self.saves += 1

    # --- resume --------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def resume(self, G: SymmetricPanels, backend: str = "numpy", apply_updates: bool = True) -> int:
        """Load a checkpoint into G (the rebuilt *input*); return the panel to continue from
        (0 when there is no checkpoint). Raises InputError when the checkpoint is for another input.
        apply_updates=False leaves the 'recompute' updates of the trailing panels to the caller (e.g.
        on a GPU, after the panels are moved there); ``pending_updates`` then says whether any are due."""
        self.pending_updates = False
        self.begin(G)
        m = self.read_manifest()
        if m is None:
            return 0
        expected = {"format": FORMAT, "n": G.n, "block": G.block, "dtype": str(np.dtype(G.dtype)),
                    "input_sha256": self.hash, "algorithm": self.algorithm}
        diffs = [f"{k}: checkpoint has {m.get(k)!r}, this run has {v!r}" for k, v in expected.items() if m.get(k) != v]
        if diffs:
            raise InputError(f"checkpoint in {self.dir} belongs to a different factorization ("
                             + "; ".join(diffs) + "). Use another checkpoint_dir, delete this one, or pass the "
                             "same input and options to resume.")
        last = int(m["last_finished_panel"])
        for k in range(last + 1):
            _load_into(G.panels[k], np.load(self.dir / f"L_{k:05d}.npy", allow_pickle=False))
        if self.algorithm == "right-looking" and last < len(G.panels) - 1:
            gen = m.get("trailing_generation")
            if m.get("strategy") == "trailing" and gen:
                for i in range(last + 1, len(G.panels)):
                    _load_into(G.panels[i], np.load(self.dir / f"T{gen:05d}_{i:05d}.npy", allow_pickle=False))
            elif apply_updates:
                apply_finished_updates(G, last, backend)
            else:
                self.pending_updates = True
        self.saved_upto = self.last_checkpoint = last
        self.generation = int(m.get("trailing_generation") or 0)
        return last + 1


def _host(P):
    return P if isinstance(P, np.ndarray) else P.detach().cpu().numpy()


def _load_into(dst, src: np.ndarray) -> None:
    if isinstance(dst, np.ndarray):
        dst[...] = src
    else:  # torch tensor
        import torch

        dst.copy_(torch.from_numpy(src))


def apply_finished_updates(G: SymmetricPanels, last: int, backend: str = "numpy") -> None:
    """Bring trailing panels (> last) of an *input* up to the state a right-looking factorization
    has after finishing panels 0..last: the same syrk_update calls, in the same order."""
    from .backend import get_backend

    be = get_backend(backend)
    starts = G.starts
    for j in range(last + 1):
        s, P = starts[j], G.panels[j]
        w = P.shape[1]
        below = P[w:]
        for i in range(last + 1, len(G.panels)):
            Pi = G.panels[i]
            off = starts[i] - (s + w)
            be.syrk_update(Pi, below[off:], below[off : off + Pi.shape[1]])
