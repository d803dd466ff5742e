"""``solve --checkpoint-dir``: claim a checkpoint directory before the work, remove it after the result
is written. A directory kernelfit did not write is never written into; a file it did not write is
never deleted."""

from __future__ import annotations

from pathlib import Path

from ..errors import KernelfitError
from .args import eprint, refuse


def claim_checkpoint_dir(args, directory: Path | None, resume: bool,
                          n: int | None = None, block: int | None = None, dtype: str | None = None):
    """--resume continues a checkpoint that exists; without it a checkpoint is never silently reused
    or overwritten; a directory kernelfit did not write is never written into. Writability and free
    space for the planned panels are checked too; then the directory is claimed (marker, lock held
    by this run, which a second run sees with our PID). Returns the claimed directory: hold it."""
    if directory is None:
        return None
    from ..errors import InputError
    from ..linalg.checkpoint import MANIFEST, checkpoint_bytes, owned_dir, read_manifest
    from ..places import check_free_space, check_writable_dir
    from ..storage import MARKER

    own = owned_dir(directory, "--checkpoint-dir")
    try:
        own.check()
    except InputError as e:
        hint = (f" (A checkpoint directory kernelfit wrote carries {MARKER}; for such a directory, pass --resume "
                f"to continue it.)" if (directory / MANIFEST).exists() else "")
        refuse(args, f"{e}{hint}")
    manifest = read_manifest(directory, "--checkpoint-dir") if own.marker_path.is_file() else None
    if resume and manifest is None:
        what = "does not exist" if not directory.exists() else f"holds no checkpoint (no {MANIFEST})"
        refuse(args, f"--resume: --checkpoint-dir {directory} {what}; nothing to resume. Fix: name the "
                     f"directory the interrupted run saved to, or drop --resume to start afresh.")
    if not resume and manifest is not None:
        refuse(args, f"--checkpoint-dir {directory} already holds a checkpoint; pass --resume to continue it, "
                     f"or choose an empty directory (or delete this one) to start afresh.")
    done = 0
    if resume and n is not None:
        stages = manifest["stages"]
        if not any(st["n"] == n and st["block"] == block for st in stages.values()):
            have = "; ".join(f"{k}: n = {st['n']}, block {st['block']}" for k, st in stages.items()) or "no stages"
            refuse(args, f"--resume: the checkpoint in {directory} is of another problem ({have}); this run has "
                         f"n = {n}, block {block}. Fix: pass the options of the interrupted run, or drop --resume "
                         f"and use a new directory.")
        done = sum(f["bytes"] for f in stages.get(str(dtype), {"files": {}})["files"].values()
                   if isinstance(f.get("bytes"), int))
    try:
        check_writable_dir(directory, "--checkpoint-dir")
        if n is not None:
            check_free_space(directory, checkpoint_bytes(n, block, dtype) - done, "--checkpoint-dir",
                             f"the checkpoint ({dtype} factor panels, n = {n})")
    except InputError as e:
        refuse(args, str(e))
    return own.claim()


def remove_checkpoint(directory: Path, held=None, keep: bool = False) -> None:
    """After the result is written: delete exactly the files the checkpoint's manifest lists (and our
    marker and lock, and the directory when that leaves it empty and we created it); never a file
    kernelfit did not write. ``keep``: only release the directory."""
    from ..linalg.checkpoint import remove_checkpoint

    if keep:
        if held is not None:
            held.release()
        return
    try:
        left = remove_checkpoint(directory, "--checkpoint-dir", owned=held)
    except KernelfitError as e:   # e.g. a manifest damaged meanwhile: keep everything, say why
        eprint(f"kept the checkpoint in {directory}: {e}")
        return
    extra = f"; the directory stays: it also holds files kernelfit did not write ({', '.join(left[:5])})" if left else ""
    eprint(f"removed the checkpoint in {directory} (keep it with --keep-checkpoint){extra}")
