"""Argument types and shared argument groups of the ``kernelfit`` commands.

Every type says what it expected and what it found; a malformed value is an argparse error (usage
line and exit 2). A well-formed command line that cannot run (an existing --out, sizes past the
split, conflicting options) is refused by :func:`refuse`: one line ``kernelfit CMD: error: ...`` and
exit 2, without the usage dump. numpy-free, so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import NoReturn

from ..catalog import DATASET_NAMES
from ..errors import KernelfitError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def number(kind=int, min=None, max=None, inclusive=(True, True), what: str | None = None):
    """An argparse type for a number of ``kind`` (int or float) in [min, max] (``inclusive`` says
    which ends belong); floats must be finite. ``what`` names the expectation in the error."""
    lo_in, hi_in = inclusive

    def describe() -> str:
        if what:
            return what
        noun = "an integer" if kind is int else "a finite number"
        parts = [] if min is None else [f"{'>=' if lo_in else '>'} {min:g}"]
        parts += [] if max is None else [f"{'<=' if hi_in else '<'} {max:g}"]
        if kind is int and min == 1 and lo_in and max is None:
            return "a positive integer"
        return f"{noun} {' and '.join(parts)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {describe()}, got {text!r}") from None
        bad = (kind is float and not math.isfinite(value)) \
            or (min is not None and (value < min if lo_in else value <= min)) \
            or (max is not None and (value > max if hi_in else value >= max))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {describe()}, got {text!r}")
        return value

    parse.__name__ = kind.__name__   # argparse names the type in "invalid <name> value" messages
    return parse


positive_int = number(int, min=1)
nonneg_int = number(int, min=0)
nonneg_float = number(float, min=0.0)
probability = number(float, min=0.0, max=1.0, what="a probability in [0, 1]")


def bandwidth(text: str):
    """sigma > 0, 'median' or 'F*median' (``validate.bandwidth_rule`` decides what is usable)."""
    from ..errors import InputError
    from ..validate import check_bandwidth_spec

    try:
        return check_bandwidth_spec(text.strip(), "--bandwidth")
    except InputError as e:
        raise argparse.ArgumentTypeError(
            f"expected a positive number (sigma, e.g. 5.0 for MNIST pixels / 255), 'median' or 'F*median' (e.g. "
            f"0.5*median), got {text!r}: {e}") from None


def subset_seed(text: str):
    if text.strip().lower() == "first":
        return None
    try:
        return nonneg_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 (seeded stratified sample) or 'first' (the first n examples), "
            f"got {text!r}") from None


def device(text: str) -> str:
    """cpu, cuda or cuda:N; checked here so that a typo fails before any data is read."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", text.strip()):
        return text.strip()
    raise argparse.ArgumentTypeError(f"expected 'cpu', 'cuda' or 'cuda:N' (e.g. cuda:0), got {text!r}")


def dataset(text: str) -> str:
    name = text.strip().lower().replace("_", "-")
    name = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist"}.get(name, name)
    if name not in DATASET_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; expected one of {', '.join(DATASET_NAMES)}")
    return name


# ------------------------------------------------------------------------------ refusals
def placement(args):
    """Where the factorization runs: the placement flags of ``solve`` as a linalg FactorOptions."""
    from ..linalg.options import FactorOptions

    scratch, budget = getattr(args, "scratch_dir", None), getattr(args, "memory_budget", None)
    out_of_core = {"auto": "auto", "yes": True, "no": False, "disk": "disk"}[args.out_of_core]
    if out_of_core == "auto" and args.resume and scratch is not None and args.checkpoint_dir is None:
        out_of_core = "disk"    # --resume with --scratch-dir continues the disk store that auto chose before
    return FactorOptions(block_size=args.block_size, progress=not args.no_progress, device=args.device,
                         tf32=getattr(args, "tf32", False), out_of_core=out_of_core,
                         checkpoint_dir=None if args.checkpoint_dir is None else str(args.checkpoint_dir),
                         resume=args.resume, scratch_dir=None if scratch is None else str(scratch),
                         memory_budget=None if budget is None else int(budget * 2**30))


memory_gib = number(float, min=0.0, inclusive=(False, True), what="a size in GiB > 0 (e.g. 4 or 0.5)")


def add_disk_args(g, out_of_core_choices=("auto", "yes", "no", "disk")) -> None:
    """--out-of-core, --scratch-dir, --memory-budget: shared by ``solve`` and ``plan``."""
    g.add_argument("--out-of-core", choices=out_of_core_choices, default="auto",
                   help="yes: stream panels through the GPU (--device cuda) from RAM; disk: keep the Gram and its "
                        "factor on disk in --scratch-dir (exact, resumable, RAM bounded by --memory-budget); with "
                        "--device, the slabs factor on the device (disk -> RAM -> device); no: in "
                        "RAM / on the device only; auto (default): the GPU path from its measured free memory, and "
                        "the disk when the in-RAM plan does not fit and --scratch-dir is given")
    g.add_argument("--scratch-dir", type=Path, default=None, metavar="DIR",
                   help="disk out-of-core: where the Gram panels and the factor live (an empty or new directory, "
                        "or one an interrupted disk solve left: add --resume). Removed after a successful solve")
    g.add_argument("--memory-budget", type=memory_gib, default=None, metavar="GIB",
                   help="disk out-of-core: RAM for the factorization's slabs (default: available memory minus what "
                        "the solve keeps besides the Gram: data, vectors, workspace)")


def check_disk_args(args, solve: bool = True) -> None:
    """The disk flags judged before any data is read (one-line refusals, exit 2)."""
    disk = args.out_of_core == "disk"
    if disk and args.scratch_dir is None:
        refuse(args, "--out-of-core disk keeps the Gram and its factor in a directory: add --scratch-dir DIR "
                     "(an empty or new directory on a disk with room; 'kernelfit plan' says how much)")
    if args.memory_budget is not None and (args.scratch_dir is None or args.out_of_core not in ("auto", "disk")):
        refuse(args, "--memory-budget is the RAM of a disk solve: it needs --scratch-dir DIR (with --out-of-core "
                     "disk, or auto)")
    if args.scratch_dir is not None:
        check_dir_path(args, args.scratch_dir, "--scratch-dir")
    if not solve or not disk:
        return
    for flag, bad in (("--scheduler", getattr(args, "scheduler", None) is not None),
                      ("--checkpoint-dir", args.checkpoint_dir is not None),
                      ("--features randconv", getattr(args, "features", None) == "randconv")):
        if bad:
            why = ("the disk store is its own checkpoint (--resume continues it)" if flag == "--checkpoint-dir"
                   else "the disk solve factors in this process")
            refuse(args, f"--out-of-core disk does not combine with {flag}: {why}. Drop one of them")


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def refuse(args, message: str) -> NoReturn:
    """A refusal of well-formed arguments: one line ``PROG: error: MESSAGE`` and exit 2, without the
    usage dump that argparse prints for a malformed command line."""
    eprint(f"{getattr(args, 'prog', 'kernelfit')}: error: {message}")
    raise SystemExit(EXIT_USAGE)


def check_out_path(args, out: Path | None, overwrite: bool, flag: str = "--out", example: str = "result.json") -> None:
    """Refuse a bad output path before any work, so an hour-long run never ends in a refusal: a
    directory, an existing file without --overwrite, or a place where no file can be created."""
    if out is None:
        return
    from ..places import check_output_file

    try:
        check_output_file(out, flag, overwrite=overwrite, example=example)
    except KernelfitError as e:
        refuse(args, str(e))


def check_dir_path(args, directory, flag: str) -> None:
    """The same probe for a directory the command will write into (caches)."""
    if directory is None:
        return
    from ..places import check_writable_dir

    try:
        check_writable_dir(Path(directory), flag)
    except KernelfitError as e:
        refuse(args, str(e))


# ------------------------------------------------------------------------------ shared groups
def add_common(p: argparse.ArgumentParser, threads: bool = True) -> None:
    """-v / -q on every command; --threads on those that compute. Sets ``prog`` for :func:`refuse`."""
    g = p.add_argument_group("run")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log lines (repeat for debug lines)")
    g.add_argument("-q", "--quiet", action="count", default=0, help="fewer log lines: warnings only")
    if threads:
        g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="use at most N threads (BLAS, torch, element-wise passes; default: all cores). On a "
                            "shared or busy machine --threads 1 can be several times faster")
    p.set_defaults(prog=p.prog)


def add_size_args(p) -> None:
    p.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                   help="training points (default: the whole training split)")
    p.add_argument("--n-test", type=nonneg_int, default=None, metavar="N",
                   help="test points; 0 skips the test evaluation (default: the whole test split)")


def add_feature_map_args(f) -> None:
    """The Gabor and random-conv options, shared by ``kernelfit solve --features`` and ``kernelfit table``."""
    f.add_argument("--gabor-frequencies", type=number(float, min=0.0, inclusive=(False, True)), nargs="+",
                   default=[0.15, 0.25, 0.35], metavar="F",
                   help="Gabor frequencies in cycles / pixel (default 0.15 0.25 0.35)")
    f.add_argument("--gabor-orientations", type=positive_int, default=8, metavar="K",
                   help="Gabor orientations (default 8)")
    f.add_argument("--gabor-pool", type=positive_int, default=4, metavar="P",
                   help="Gabor mean-pooling window (default 4)")
    f.add_argument("--filters", type=positive_int, default=1000, metavar="N",
                   help="randconv: random filters (default 1000; Zhang et al.: 32000)")
    f.add_argument("--filter-block", type=positive_int, default=250, metavar="B",
                   help="randconv: filters per feature block (default 250)")
    f.add_argument("--patch-size", type=positive_int, default=6, metavar="P", help="randconv: patch side (default 6)")
    f.add_argument("--filter-kind", choices=("gaussian", "patches"), default="patches",
                   help="randconv: filters drawn as Gaussian noise or as whitened training patches (default)")
    f.add_argument("--randconv-bias", type=number(float), default=0.25, metavar="A",
                   help="randconv: rectifier threshold in max(0, +-w.x - A) (default 0.25)")
    f.add_argument("--randconv-pool-grid", type=positive_int, default=2, metavar="G",
                   help="randconv: sum-pooling grid per side (default 2)")
    f.add_argument("--randconv-zca-eps", type=nonneg_float, default=0.1, metavar="EPS",
                   help="randconv: ZCA whitening regularizer (default 0.1)")
    f.add_argument("--randconv-kernel", choices=("gaussian", "linear"), default="gaussian",
                   help="randconv: kernel on the standardized features (default gaussian, bandwidth from "
                        "--bandwidth, in kernelfit table --bandwidth-cifar-randconv; linear: (phi.phi' + 1) / n_features)")
