"""``kernelfit plan``: the memory a solve would need, and with a device the strategy it should take.
Allocates nothing; exit status 0 if it fits, 3 if not."""

from __future__ import annotations

from ..catalog import DATASET_NAMES, MODES
from .args import (
    EXIT_DOES_NOT_FIT,
    EXIT_OK,
    add_common,
    add_disk_args,
    add_size_args,
    check_disk_args,
    dataset,
    eprint,
    nonneg_float,
    positive_int,
    refuse,
)
from .output import print_json
from .solve import pixel_grid_products
from .sources import check_data_source, data_shape


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory plan of a solve (dry run, allocates nothing)",
                       description="Print the memory a solve would need, as JSON on stdout and "
                                   "one line on stderr. Exit status 0 if it fits, 3 if not.")
    p.add_argument("--dataset", type=dataset, default=None, metavar="NAME",
                   help=f"sets d, classes and default sizes: one of {', '.join(DATASET_NAMES)} "
                        f"(default mnist-subset)")
    p.add_argument("--data", default=None, metavar="FILE.npz",
                   help="or take d, classes and sizes from your arrays (only their headers and labels are read)")
    for key in ("x-train", "y-train", "x-test", "y-test"):
        p.add_argument(f"--{key}", default=None, metavar="FILE", help=f"your {key.replace('-', '_')} file")
    add_size_args(p)
    p.add_argument("--dim", type=positive_int, default=None, metavar="D",
                   help="feature dimension (default: the dataset's, e.g. 784 for MNIST)")
    p.add_argument("--num-outputs", type=positive_int, default=None, metavar="K",
                   help="right-hand sides (default: the number of classes)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="mixed (default on the host), float32, float64; with a device the default lets the device "
                        "strategy choose")
    p.add_argument("--block-size", type=positive_int, default=None, metavar="B")
    p.add_argument("--available-gib", type=nonneg_float, default=None, metavar="GIB",
                   help="plan for this much free memory instead of what is free now")
    g = p.add_argument_group("device strategy (docs/gpu.md): which precision and path a GPU solve should take")
    g.add_argument("--device", default=None, metavar="cuda[:N]",
                   help="plan for this CUDA device: its free memory, its rates from the table (or measured)")
    g.add_argument("--device-profile", default=None, metavar="NAME",
                   help="plan for a named GPU without having one: h200, h100, h100-pcie, a100, v100, l4, rtx4090")
    g.add_argument("--device-memory-gib", type=nonneg_float, default=None, metavar="GIB",
                   help="the device's memory (overrides the profile's; with both rates below: a device of your own)")
    g.add_argument("--float64-tflops", type=nonneg_float, default=None, metavar="R", help="its float64 GEMM rate")
    g.add_argument("--float32-tflops", type=nonneg_float, default=None, metavar="R", help="its float32 GEMM rate")
    g.add_argument("--measure", action="store_true", help="with --device: measure the GEMM rates (~2 s)")
    g.add_argument("--tf32", action="store_true",
                   help="plan a TF32 float32 factor (refined in float64; may fall back to float64, reported)")
    k = p.add_argument_group("disk out-of-core (the Gram and its factor on disk, exact, resumable)")
    add_disk_args(k, out_of_core_choices=("auto", "no", "disk"))
    add_common(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..planning import plan_solve

    check_disk_args(args, solve=False)
    user = check_data_source(args)
    shape = data_shape(args, user)
    n = args.n_train or shape["n_train"]
    n_test = shape["n_test"] if args.n_test is None else args.n_test
    d = args.dim or shape["d"]
    k = args.num_outputs or shape["num_classes"]
    available = None if args.available_gib is None else int(args.available_gib * 2**30)
    device = _plan_device_profile(args)   # checked before any planning
    plan = plan_solve(n, d, k, args.mode or "mixed", n_test=n_test, block=args.block_size, available=available,
                      grid_products=pixel_grid_products(args, user, d) and not args.dim)
    out = plan.to_dict()
    fits = plan.fits
    if device is not None:
        from ..planning import choose_device_strategy

        ds = choose_device_strategy(n, d, k, device, mode=args.mode, tf32=args.tf32, block=args.block_size)
        out["device_strategy"] = ds
        # resident: the host holds only the data and n x k blocks; out of core it holds the Gram panels
        fits = ds["resident"] or plan.fits
        eprint(f"device {device.name} ({device.source}): {ds['strategy']}"
               f"{' with TF32 factor GEMMs' if ds['tf32'] else ''}, {ds['factor_dtype']} factor; {ds['reason']}")
    else:
        eprint(plan.summary())
        fits = _plan_disk(args, plan, available, out)
    print_json(out)
    return EXIT_OK if fits else EXIT_DOES_NOT_FIT


def _plan_disk(args, plan, available, out: dict) -> bool:
    """The strategy a host solve takes (in RAM, or the disk store when --out-of-core disk asks for it or
    auto finds RAM short and --scratch-dir given), its RAM and disk bytes into ``out``; whether it fits."""
    from ..errors import MemoryPlanError
    from ..linalg.options import FactorOptions
    from ..planning import choose_disk
    from ..results import format_bytes, format_gib

    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    placement = FactorOptions(out_of_core=args.out_of_core,
                              scratch_dir=None if args.scratch_dir is None else str(args.scratch_dir),
                              memory_budget=budget)
    out.update(ram_bytes=plan.total_bytes, disk_bytes=0)
    try:
        disk = None if args.out_of_core == "no" else choose_disk(plan, placement, available=available)
    except MemoryPlanError as e:
        out.update(strategy_chosen=None, disk_refusal=str(e))
        eprint(f"disk: does NOT fit: {e}")
        return False
    if disk is None:
        out["strategy_chosen"] = plan.strategy if plan.fits else None
        return plan.fits
    out.update(strategy_chosen="disk", ram_bytes=disk.ram_bytes + plan.total_bytes - plan.gram_bytes,
               disk_bytes=disk.disk_bytes, disk_plan=disk.to_dict())
    eprint(f"strategy disk ({disk.dtype} factor, block {disk.block}, {disk.slabs} slabs): RAM "
           f"{format_gib(out['ram_bytes'])} (budget {format_bytes(disk.budget_bytes)} + data, vectors, baseline), disk "
           f"{format_gib(disk.disk_bytes)} of {format_gib(disk.free_disk_bytes)} free in {args.scratch_dir}; predicted "
           f"factorization reads {format_gib(disk.factor_read_bytes)}, writes {format_gib(disk.factor_write_bytes)} -> fits")
    return True


def _plan_device_profile(args):
    """The DeviceProfile that ``plan`` plans for (None: no device strategy asked for)."""
    from ..planning import DeviceProfile, live_profile, named_profile

    given = (args.device_memory_gib, args.float64_tflops, args.float32_tflops)
    if args.tf32 and args.mode in ("float32", "float64"):
        refuse(args, f"--tf32 plans a TF32 float32 factor refined in float64; --mode {args.mode} has none. "
                     "Use --mode mixed or leave --mode out.")
    if args.device is None and args.device_profile is None and all(v is None for v in given):
        if args.tf32 or args.measure:
            refuse(args, "--tf32 / --measure belong to a device strategy: add --device cuda or --device-profile NAME.")
        return None
    if args.device is not None and args.device_profile is not None:
        refuse(args, "give --device (a GPU here) or --device-profile (a named GPU), not both.")
    if args.mode == "float32":
        refuse(args, "--mode float32 has float32 accuracy only and is no device strategy; use mixed, float64 or leave "
                     "--mode out so that the device's rates choose.")
    if args.device is not None:
        prof = live_profile(args.device, measure=args.measure)
    elif args.device_profile is not None:
        prof = named_profile(args.device_profile)
    else:
        missing = [f for f, v in zip(("--device-memory-gib", "--float64-tflops", "--float32-tflops"), given) if v is None]
        if missing:
            refuse(args, f"a device of your own needs its memory and both rates; missing {', '.join(missing)} "
                         "(or name one: --device-profile h200).")
        return DeviceProfile("given", int(args.device_memory_gib * 2**30), args.float64_tflops, args.float32_tflops)
    over = {"memory_bytes": None if args.device_memory_gib is None else int(args.device_memory_gib * 2**30),
            "float64_tflops": args.float64_tflops, "float32_tflops": args.float32_tflops}
    over = {key: v for key, v in over.items() if v is not None}
    if over:
        from dataclasses import replace

        prof = replace(prof, **over, source=prof.source + " with given overrides")
    return prof
