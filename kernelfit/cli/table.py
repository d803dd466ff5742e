"""``kernelfit table``: the kernel table of Zhang et al. (Section 5), see :mod:`kernelfit.table`.

The arguments are parsed here with the same validated types as every command and turned into a frozen
:class:`kernelfit.table.TableOptions`, the one home of the table's defaults: an option not given is left
out of the namespace (``SUPPRESS``) and takes the dataclass default. The feature-map options are shared
with ``solve`` and carry its defaults (a test checks they agree with TableOptions'). kernelfit.table is
imported only in run(): it loads numpy, which ``--help`` must not.
"""

from __future__ import annotations

from argparse import SUPPRESS

from ..catalog import DEFAULT_BANDWIDTH, MODES
from .args import (
    EXIT_OK,
    add_common,
    add_feature_map_args,
    bandwidth,
    device,
    eprint,
    nonneg_float,
    nonneg_int,
    positive_int,
    refuse,
)


def bandwidth_text(text: str) -> str:
    """A bandwidth checked as ``solve --bandwidth`` checks it, kept as the text the table records."""
    bandwidth(text)
    return text.strip()

# kernelfit.table.ROWS, for the help text (a test checks they agree; catalog.py is their place to be)
ROW_NAMES = ("mnist-pixels", "mnist-gabor", "cifar-pixels", "cifar-randconv")


def register(sub) -> None:
    p = sub.add_parser("table", help="the kernel table of Zhang et al. (see 'kernelfit table --help')",
                       description="The kernel table of Zhang et al. (2017), Section 5: exact kernel interpolation "
                                   "with better features.")
    p.add_argument("--rows", default=SUPPRESS, help=f"comma list among {', '.join(ROW_NAMES)}")
    p.add_argument("--data-dir", default=SUPPRESS, help="directory with mnist.npz / CIFAR-10 (else $KERNELFIT_DATA ...)")
    p.add_argument("--mnist-data", default=SUPPRESS, metavar="NAME|FILE.npz",
                   help="data of the mnist-* rows: a registered dataset (mnist, fashion-mnist, kmnist, ...) or "
                        "your .npz with x_train, y_train, x_test, y_test (default mnist)")
    p.add_argument("--cifar-data", default=SUPPRESS, metavar="NAME|FILE.npz",
                   help="data of the cifar-* rows, likewise (default cifar10)")
    p.add_argument("--n-train-mnist", type=positive_int, default=SUPPRESS, help="MNIST training points (60000 = full)")
    p.add_argument("--n-train-cifar", type=positive_int, default=SUPPRESS, help="CIFAR-10 training points (50000 = full)")
    p.add_argument("--n-test", type=positive_int, default=SUPPRESS, help="test points per dataset (10000 = full)")
    add_feature_map_args(p)   # the same feature options (and defaults) as kernelfit solve --features
    rule = "(default {}: the measured rule of this feature map, the same as 'kernelfit solve --features {}')"
    p.add_argument("--bandwidth-mnist-pixels", type=bandwidth_text, default=SUPPRESS, metavar="SIGMA|F*median",
                   help="(default 5: Zhang et al.'s sigma for MNIST pixels / 255, kept so that this row reproduces "
                        "the paper's; 'kernelfit solve' defaults to " + DEFAULT_BANDWIDTH["pixels"] + ")")
    p.add_argument("--bandwidth-mnist-gabor", type=bandwidth_text, default=SUPPRESS, metavar="SIGMA|F*median",
                   help=rule.format(DEFAULT_BANDWIDTH["gabor"], "gabor"))
    p.add_argument("--bandwidth-cifar-pixels", type=bandwidth_text, default=SUPPRESS, metavar="SIGMA|F*median",
                   help=rule.format(DEFAULT_BANDWIDTH["pixels"], "pixels"))
    p.add_argument("--bandwidth-cifar-randconv", type=bandwidth_text, default=SUPPRESS, metavar="SIGMA|F*median",
                   help=rule.format(DEFAULT_BANDWIDTH["randconv"], "randconv"))
    p.add_argument("--lambdas", type=nonneg_float, nargs="+", default=SUPPRESS,
                   help="ridge path (0 = interpolant); lambda chosen by leave-one-out error")
    p.add_argument("--eigh-max-n", type=nonneg_int, default=SUPPRESS,
                   help="largest n for the dense eigh path (~32 n^2 bytes); above it: tiled Cholesky, no ridge")
    p.add_argument("--mode", default=SUPPRESS, choices=MODES, help="precision of the tiled Cholesky (large n only)")
    p.add_argument("--max-refine", type=nonneg_int, default=SUPPRESS,
                   help="mixed mode: at most this many refinement steps")
    p.add_argument("--progress", action="store_true", default=SUPPRESS, help="progress bars on stderr (large n)")
    p.add_argument("--device", type=device, default=SUPPRESS,
                   help="torch device for random-conv features + Grams and the large-n Cholesky (e.g. cuda); "
                        "default: CPU")
    p.add_argument("--no-random-labels", action="store_true", default=SUPPRESS)
    p.add_argument("--seed", type=nonneg_int, default=SUPPRESS)
    _add_output_args(p)
    add_common(p)
    p.set_defaults(run=run)


def _add_output_args(p) -> None:
    p.add_argument("--cache-dir", default=SUPPRESS,
                   help="cache root for features and random-conv Grams (default: $KERNELFIT_CACHE or the user cache dir)")
    p.add_argument("--no-gram-cache", action="store_true", default=SUPPRESS,
                   help="do not save / reuse the accumulated random-conv Gram (n^2/2 x 8 bytes + test block on disk)")
    p.add_argument("--gram-checkpoint-minutes", type=nonneg_float, default=SUPPRESS,
                   help="with the Gram cache, save the unfinished random-conv Gram this often so that an interrupted "
                        "run continues where it stopped when rerun (0: never; default 30)")
    p.add_argument("--out-dir", default=SUPPRESS,
                   help="where table_<tag>.json / .md are written (default: the current directory)")
    p.add_argument("--tag", default=SUPPRESS,
                   help="file name tag (default: the rows run and their sizes, e.g. mnist-pixels_mnist5000)")
    p.add_argument("--overwrite", action="store_true", default=SUPPRESS, help="allow replacing existing table_<tag> files")


def options_from_args(args):
    """The table's fields of a parsed ``kernelfit table`` command line, as a frozen TableOptions."""
    from dataclasses import fields

    from ..table import TableOptions

    given = {f.name: getattr(args, f.name) for f in fields(TableOptions) if hasattr(args, f.name)}
    return TableOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def run(args) -> int:
    from ..errors import InputError
    from ..table import output_paths, write_table

    options = options_from_args(args)
    try:
        output_paths(options)   # an existing or unwritable output is refused before any row runs
    except InputError as e:
        refuse(args, str(e))
    argv = args.argv[args.argv.index("table") + 1:]   # the record names the command as given
    _, md, (json_path, md_path) = write_table(options, argv)
    print(md)
    eprint(f"[table] wrote {json_path} and {md_path}")
    return EXIT_OK
