"""Random-conv feature throughput: the folded-conv pipeline vs the patch-matrix reference, same process.

``kernelfit.features.RandConvFeatures`` computes Coates & Ng features as one conv2d per filter block
(whitening and patch normalization folded into the filters). The reference here is the direct
pipeline it replaced: build every normalized patch, whiten it (``whitened_patches``), multiply by the
filters, rectify and sum-pool by slicing. Both run on the same images and filters; the JSON line
gives seconds, GFLOP/s (the filter products, 2 x positions x p^2 C x filters per image), the speed
ratio and the largest relative difference of the features.

  python benchmarks/randconv_features.py --data-dir ../shared/data --n-images 2000 --filters 500
  python benchmarks/randconv_features.py --device cuda --n-images 20000 --filters 2000   # on a GPU

Without --data-dir (or $KERNELFIT_DATA) it uses random uint8 images of CIFAR-10's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def reference_features(fmap, x, filt, image_block=64):
    """Patch matrix -> whitening -> filter products -> rectifier -> pooled sums (the direct pipeline)."""
    import torch

    h, w, _ = fmap.image_shape_
    p = fmap.config.patch_size
    oh, ow = h - p + 1, w - p + 1
    a = fmap.config.bias
    fb = torch.from_numpy(np.ascontiguousarray(fmap.filters_[filt]))
    out = []
    for i0 in range(0, len(x), image_block):
        wp = torch.from_numpy(np.ascontiguousarray(fmap.whitened_patches(x[i0 : i0 + image_block]), np.float32))
        z = (wp @ fb.T).reshape(len(wp), oh, ow, -1)
        cells = []
        for m in (torch.clamp_min(z - a, 0.0), torch.clamp_min(-z - a, 0.0)):
            for y0, y1 in fmap._pool_bounds(oh):
                for x0, x1 in fmap._pool_bounds(ow):
                    cells.append(m[:, y0:y1, x0:x1].sum(dim=(1, 2)))
        out.append(torch.cat(cells, dim=1).numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("KERNELFIT_DATA"))
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--filters", type=int, default=500)
    ap.add_argument("--filter-block", type=int, default=500)
    ap.add_argument("--device", default=None, help="torch device for our pipeline (reference: CPU)")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from kernelfit.features.randconv import RandConvConfig, RandConvFeatures
    from kernelfit.provenance import machine_info

    if args.data_dir:
        from kernelfit.data import load_dataset

        ds = load_dataset("cifar10", data_dir=args.data_dir)
        x, fit_on, source = ds.x_train[: args.n_images], ds.x_train[:10000], "CIFAR-10 (JPEG q75 copy)"
    else:
        x = np.random.default_rng(0).integers(0, 256, (args.n_images, 32, 32, 3), dtype=np.uint8)
        fit_on, source = x, "random uint8 images"
    fmap = RandConvFeatures(RandConvConfig(n_filters=args.filters, filters="patches")).fit(fit_on)
    h, w, c = fmap.image_shape_
    p = fmap.config.patch_size
    flops = 2.0 * (h - p + 1) * (w - p + 1) * p * p * c * args.filters * len(x)

    list(fmap.iter_filter_blocks(x[:32], args.filter_block, device=args.device))   # warm-up
    t = time.perf_counter()
    ours = np.empty((len(x), fmap.n_features), np.float32)
    for cols, block in fmap.iter_filter_blocks(x, args.filter_block, device=args.device):
        ours[:, cols] = block
    if args.device and str(args.device).startswith("cuda"):
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t
    rec = {"kind": "randconv_features", "source": source, "n_images": len(x), "filters": args.filters,
           "n_features": fmap.n_features, "device": str(args.device or "cpu"), "ours_s": t_ours,
           "ours_gflops": flops / t_ours / 1e9,
           "machine": {**machine_info(), "torch_threads": torch.get_num_threads()}}
    if not args.no_reference:
        t = time.perf_counter()
        ref = np.empty_like(ours)
        F = args.filters
        cells = 2 * fmap.config.pool_grid ** 2
        for f0 in range(0, F, args.filter_block):
            f1 = min(f0 + args.filter_block, F)
            cols = (np.arange(cells)[:, None] * F + np.arange(f0, f1)[None, :]).ravel()
            ref[:, cols] = reference_features(fmap, x, slice(f0, f1))
        t_ref = time.perf_counter() - t
        rec.update(reference="patch matrix + whitening + matmul + sliced pooling (CPU)", reference_s=t_ref,
                   reference_gflops=flops / t_ref / 1e9, speedup_vs_reference=t_ref / t_ours,
                   max_rel_diff=float(np.abs(ours - ref).max() / np.abs(ref).max()))
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
