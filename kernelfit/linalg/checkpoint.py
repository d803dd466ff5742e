"""Checkpoint / resume for long factorizations.

A checkpoint directory is one kernelfit owns (``kernelfit.storage``: our marker file, a lock holding
the PID of the run using it). It holds ``manifest.json``: a run id and one *stage* per factorization
(default name: the factor dtype, so mixed precision's float32 attempt and its float64 fallback each
have their own), each with n, block, dtype, a sha256 of the *input* panels and of the caller's config,
the last finished panel, the strategy, and the checksum (``storage.FILE_DIGEST``) of every panel file it lists
(``<stage>.L_<panel>.npy``, written once each; ``<stage>.T<generation>_<panel>.npy`` for the
'trailing' strategy). Every file is written to a temporary name, fsynced and moved into place with
``os.replace``; the manifest is replaced last, so a crash at any moment leaves the previous consistent
checkpoint. Resume checks each panel's checksum (a file of another run is refused, never mixed in);
cleanup removes exactly the files the manifest lists.

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

Resume refuses a stage whose n, block, dtype, input hash or config hash differ.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from ..errors import ChecksumError, InputError
from ..places import check_free_space
from ..results import atomic_file
from ..storage import OwnedDir, StorageError, matches_record, recorded_digest, save_npy
from .panels import SymmetricPanels

FORMAT = "kernelfit.cholesky-checkpoint/2"
STRATEGIES = ("recompute", "trailing")
KIND = "checkpoint"
MANIFEST = "manifest.json"
# every file a checkpoint writes: the manifest and "<stage>.L_<panel>.npy" / "<stage>.T<generation>_<panel>.npy"
FILE_NAMES = r"manifest\.json|[a-z0-9]+\.(?:L_\d{5}|T\d{5}_\d{5})\.npy"
_STAGE_FIELDS = {"n": int, "block": int, "dtype": str, "input_sha256": str, "algorithm": str, "strategy": str,
                 "last_finished_panel": int, "panels": int, "complete": bool, "files": dict}
_RUNS: dict[str, str] = {}    # realpath of a checkpoint directory -> the run id this process writes there


def owned_dir(directory, flag: str = "checkpoint_dir") -> OwnedDir:
    return OwnedDir(directory, KIND, flag, FILE_NAMES)


def input_hash(G: SymmetricPanels, config: dict | None = None) -> str:
    """sha256 of the input panels (shape, dtype, bytes) and a JSON config: O(n^2) reads, << n^3.

    The Gram is a function of the data and of every option that shapes it (kernel, bandwidth, block,
    dtype, jitter in the config), so this is the hash of the run's inputs as far as the factor goes."""
    h = hashlib.sha256()
    h.update(json.dumps({"n": G.n, "block": G.block, "dtype": str(np.dtype(G.dtype)),
                         "config": config or {}}, sort_keys=True, default=str).encode())
    for P in G.panels:
        h.update(np.ascontiguousarray(P).view(np.uint8).data)
    return h.hexdigest()


def read_manifest(directory, flag: str = "checkpoint_dir") -> dict | None:
    """The checked manifest of a checkpoint directory, None when there is none; StorageError (nothing
    touched) when it is not valid JSON or not a manifest of this format."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ValueError(f"expected a JSON object, found {type(m).__name__}")
        if m.get("format") != FORMAT:
            raise ValueError(f"format {m.get('format')!r}, expected {FORMAT!r}")
        if not isinstance(m.get("run_id"), str) or not isinstance(m.get("stages"), dict):
            raise ValueError("run_id or stages missing")
        for name, st in m["stages"].items():
            if not re.fullmatch(r"[a-z0-9]+", name) or not isinstance(st, dict):
                raise ValueError(f"stage {name!r} is not a stage record")
            bad = [k for k, t in _STAGE_FIELDS.items() if not isinstance(st.get(k), t)]
            if bad:
                raise ValueError(f"stage {name!r} lacks or mistypes {', '.join(bad)}")
            for fname, rec in st["files"].items():
                if not re.fullmatch(FILE_NAMES, fname) or not isinstance(rec, dict) \
                        or recorded_digest(rec) is None:
                    raise ValueError(f"stage {name!r} lists a bad file entry {fname!r}")
    except (OSError, UnicodeDecodeError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise StorageError(errno.EINVAL, f"{flag} {Path(directory)}: {MANIFEST} is not a readable kernelfit "
                                         f"checkpoint manifest ({e}); nothing in the directory was changed. Fix: "
                                         f"resume with the kernelfit version that wrote it, or delete the directory "
                                         f"and start afresh (its panels cannot be verified without it).") from None
    return m


def checkpoint_files(manifest: dict) -> list[str]:
    return [f for st in manifest["stages"].values() for f in st["files"]]


def remove_checkpoint(directory, flag: str = "checkpoint_dir", owned: OwnedDir | None = None) -> list[str]:
    """Remove what the manifest lists (all stages), the manifest, our marker and lock; the directory
    when that leaves it empty and we created it. Returns the entries left (files we did not write).
    ``owned``: the caller's claim of the directory (its lock is the one given up)."""
    own = owned if owned is not None else owned_dir(directory, flag)
    m = read_manifest(directory, flag)
    return own.remove((checkpoint_files(m) if m else []) + [MANIFEST])


def checkpoint_bytes(n: int, block: int, dtype) -> int:
    """What one stage of finished panels ('recompute' strategy) writes: the lower panels once."""
    return SymmetricPanels.nbytes_for(n, block, dtype)


class Checkpointer:
    """Saves finished panels (and, with strategy 'trailing', trailing panels) of a factorization.

    One checkpoint directory holds several *stages* (default: the factor dtype), each with its own
    panels, input hash and progress in the one manifest: mixed precision's float32 attempt and its
    float64 re-factorization both checkpoint and both resume. Every file's checksum is in the manifest
    and is checked on resume. The directory is ours (``kernelfit.storage``): marked, locked while in use.

    Call ``begin(G)`` on the *input* (computes its hash) or ``resume(G)``, use ``hook`` as
    ``on_panel_done``, then ``close()``."""

    def __init__(self, directory, *, every: int = 1, strategy: str = "recompute", algorithm: str = "right-looking",
                 config: dict | None = None, stage: str | None = None, flag: str = "checkpoint_dir"):
        if strategy not in STRATEGIES:
            raise InputError(f"unknown checkpoint strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}.")
        if algorithm not in ("right-looking", "left-looking"):
            raise InputError(f"algorithm must be 'right-looking' or 'left-looking'; got {algorithm!r}.")
        if int(every) < 1:
            raise InputError(f"checkpoint every must be >= 1 panel; got {every!r}.")
        if stage is not None and not re.fullmatch(r"[a-z0-9]+", stage):
            raise InputError(f"checkpoint stage must be lower-case letters and digits; got {stage!r}.")
        self.dir = Path(directory)
        self.flag = flag
        self.owned = owned_dir(self.dir, flag)
        self.every, self.strategy, self.algorithm = int(every), strategy, algorithm
        self.config = config or {}
        self.stage = stage
        self.G = None
        self.hash = None
        self.manifest = None
        self.saved_upto = -1          # last finished panel written
        self.last_checkpoint = -1
        self.generation = 0
        self.bytes_written = 0
        self.saves = 0
        self.pending_updates = False

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def read_manifest(self) -> dict | None:
        return read_manifest(self.dir, self.flag)

    def _open(self, G: SymmetricPanels) -> dict | None:
        self.owned.claim()
        self.G = G
        self.stage = self.stage or np.dtype(G.dtype).name
        self.hash = input_hash(G, self.config)
        return self.read_manifest()

    def _start(self, m: dict | None, first_panel: int) -> None:
        if m is None:
            m = {"format": FORMAT, "run_id": uuid.uuid4().hex, "stages": {}}
        self.manifest = m
        _RUNS[os.path.realpath(self.dir)] = m["run_id"]
        need = sum(P.nbytes for P in self.G.panels[first_panel:])
        try:
            check_free_space(self.dir, need, self.flag, f"the {self.stage} checkpoint (panels {first_panel}..)")
        except InputError as e:
            self.close()
            kept = [s for s in m["stages"] if s != self.stage]
            more = (f" The finished stages ({', '.join(kept)}) are kept; free space and rerun with resume (--resume)."
                    if kept else "")
            raise StorageError(errno.ENOSPC, f"{e}{more}") from None

    def begin(self, G: SymmetricPanels) -> None:
        """Start this stage afresh: refused when the directory holds another run's checkpoint or this stage."""
        m = self._open(G)
        if m is not None and (m["run_id"] != _RUNS.get(os.path.realpath(self.dir)) or self.stage in m["stages"]):
            self.close()
            raise InputError(f"{self.dir} already holds a checkpoint; pass resume=True to continue it, "
                             f"or use an empty directory.")
        self._start(m, 0)

    def _stage_record(self, last: int, complete: bool, files: dict) -> dict:
        return {"n": self.G.n, "block": self.G.block, "dtype": str(np.dtype(self.G.dtype)),
                "input_sha256": self.hash, "config": self.config, "strategy": self.strategy,
                "algorithm": self.algorithm, "last_finished_panel": last, "panels": len(self.G.panels),
                "trailing_generation": self.generation if self._saves_trailing else None,
                "complete": complete, "files": files}

    @property
    def _saves_trailing(self) -> bool:
        return self.strategy == "trailing" and self.algorithm == "right-looking"

    def hook(self, j: int) -> None:
        """on_panel_done(j): checkpoint every ``every`` panels and at the end."""
        last = len(self.G.panels) - 1
        if j - self.last_checkpoint >= self.every or j == last:
            self.save(j)

    def _name(self, kind: str, i: int) -> str:
        if kind == "L":
            return f"{self.stage}.L_{i:05d}.npy"
        return f"{self.stage}.T{self.generation:05d}_{i:05d}.npy"

    def save(self, last: int) -> None:
        G = self.G
        prev = self.manifest["stages"].get(self.stage)
        old = {} if prev is None else prev["files"]
        files = {k: v for k, v in old.items() if f"{self.stage}.L_" in k}
        written = []
        gen = self.generation
        name = None
        try:
            for k in range(self.saved_upto + 1, last + 1):
                name = self._name("L", k)
                files[name] = self._write(name, G.panels[k])
                written.append(name)
            if self._saves_trailing and last < len(G.panels) - 1:
                self.generation += 1
                for i in range(last + 1, len(G.panels)):
                    name = self._name("T", i)
                    files[name] = self._write(name, G.panels[i])
                    written.append(name)
            name = MANIFEST
            self.manifest["stages"][self.stage] = self._stage_record(last, last == len(G.panels) - 1, files)
            with atomic_file(self.manifest_path, "w") as f:
                json.dump(self.manifest, f, indent=1, sort_keys=True)
        except OSError as e:
            for w in written:   # ours, never listed: the checkpoint stays as the manifest on disk says
                (self.dir / w).unlink(missing_ok=True)
            self.generation = gen
            if prev is None:
                self.manifest["stages"].pop(self.stage, None)
            else:
                self.manifest["stages"][self.stage] = prev
            if self.saved_upto >= 0:
                kept = (f"The checkpoint keeps panels 0..{self.saved_upto} of the {self.stage} factorization "
                        f"({MANIFEST}); free space and rerun with resume (--resume) to continue from panel "
                        f"{self.saved_upto + 1}.")
            else:
                kept = (f"No {self.stage} panel was kept" + (" (the finished stages " + ", ".join(
                    self.manifest["stages"]) + " are, and resume (--resume) continues them)"
                    if self.manifest["stages"] else "") + "; free space and rerun.")
            raise StorageError(e.errno or errno.EIO, f"could not write the checkpoint file {name} in {self.dir} "
                                                     f"({e.strerror or e}). {kept}") from None
        for k in old:          # the previous trailing generation, replaced by the manifest just written
            if k not in files:
                (self.dir / k).unlink(missing_ok=True)
        self.saved_upto = self.last_checkpoint = last
        self.saves += 1

    def _write(self, name: str, P) -> dict:
        rec = save_npy(self.dir / name, _host(P))
        self.bytes_written += P.nbytes
        return rec

    # --- resume --------------------------------------------------------------------------------
    def resume(self, G: SymmetricPanels, backend: str = "numpy", apply_updates: bool = True) -> int:
        """Load this stage's checkpoint into G (the rebuilt *input*); return the panel to continue from
        (0 when the directory holds no checkpoint of this stage). Raises InputError when the checkpoint
        is for another input, ChecksumError when a panel file is not the one the manifest recorded.
        apply_updates=False leaves the 'recompute' updates of the trailing panels to the caller (e.g.
        on a GPU, after the panels are moved there); ``pending_updates`` then says whether any are due."""
        self.pending_updates = False
        m = self._open(G)
        st = None if m is None else m["stages"].get(self.stage)
        if st is None:
            self._start(m, 0)
            return 0
        expected = {"n": G.n, "block": G.block, "dtype": str(np.dtype(G.dtype)), "input_sha256": self.hash,
                    "algorithm": self.algorithm}
        diffs = [f"{k}: checkpoint has {st.get(k)!r}, this run has {v!r}" for k, v in expected.items() if st.get(k) != v]
        if diffs:
            self.close()
            raise InputError(f"checkpoint in {self.dir} belongs to a different factorization ("
                             + "; ".join(diffs) + "). Use another checkpoint_dir, delete this one, or pass the "
                             "same input and options to resume.")
        last = int(st["last_finished_panel"])
        gen = st.get("trailing_generation")
        trailing = self.algorithm == "right-looking" and last < len(G.panels) - 1 and st["strategy"] == "trailing" \
            and bool(gen)
        try:
            for k in range(last + 1):
                _load_into(G.panels[k], self._load(st, f"{self.stage}.L_{k:05d}.npy"))
            if trailing:
                for i in range(last + 1, len(G.panels)):
                    _load_into(G.panels[i], self._load(st, f"{self.stage}.T{gen:05d}_{i:05d}.npy"))
        except BaseException:
            self.close()
            raise
        if self.algorithm == "right-looking" and last < len(G.panels) - 1 and not trailing:
            if apply_updates:
                apply_finished_updates(G, last, backend)
            else:
                self.pending_updates = True
        self.saved_upto = self.last_checkpoint = last
        self.generation = int(gen or 0)
        self._start(m, last + 1)
        return last + 1

    def _load(self, st: dict, name: str) -> np.ndarray:
        rec = st["files"].get(name)
        path = self.dir / name
        if rec is None or not path.is_file():
            why = "is not listed in" if rec is None else "is missing, though listed in"
            raise ChecksumError(f"checkpoint {self.dir}: panel file {name} {why} {MANIFEST}; the checkpoint is "
                                f"incomplete and is not used. Fix: delete the directory and start afresh.")
        if not matches_record(path, rec):
            raise ChecksumError(f"checkpoint {self.dir}: panel file {name} does not match the checksum in "
                                f"{MANIFEST} (modified, truncated, or written by another run); its panels are never "
                                f"mixed into this factorization. Fix: delete the directory and start afresh.")
        return np.load(path, allow_pickle=False)

    def close(self) -> None:
        """Release the directory's lock (taken by begin / resume)."""
        self.owned.release()


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
