"""Patches per second of PairedPatchDataset in one loader process (§2.7 augmentation on).

    .venv/bin/python benchmarks/bench_sampler.py [--pairs 4] [--size 1024] [--patch 256]
        [--n 400] [--manifest PATH] [--min-coverage 0.0] [--threads 1]

Synthetic in-memory slides by default (normalisation is not timed: it runs once per pair
before training); ``--manifest`` loads real pairs instead. Prints one line per setting.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hpcstain.config import DataConfig
from hpcstain.data.sampler import PairedPatchDataset, Slide, load_slides


def synthetic_slides(n: int, size: int, seed: int = 0) -> list[Slide]:
    rng = np.random.default_rng(seed)
    slides = []
    for i in range(n):
        image = rng.uniform(-1, 1, size=(4, size, size)).astype(np.float32)
        mask = np.zeros((size, size), dtype=bool)
        mask[size // 8: -size // 8, size // 8: -size // 8] = True
        slides.append(Slide(f"s{i}", "mg", image, mask))
    return slides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--manifest", default="")
    ap.add_argument("--min-coverage", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (loader workers: 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DataConfig(patch_size=args.patch, min_mask_coverage=args.min_coverage)
    if args.manifest:
        from hpcstain.data.manifest import read_manifest

        slides = load_slides(read_manifest(args.manifest), cfg)
    else:
        slides = synthetic_slides(args.pairs, args.size)
    for augment in (True, False):
        ds = PairedPatchDataset(slides, cfg, ct_channels=3, seed=0, augment=augment)
        for i in range(10):  # warm-up
            ds[i]
        t = time.perf_counter()
        for i in range(args.n):
            ds[i % len(ds)]
        dt = time.perf_counter() - t
        print(f"augment={augment!s:5} patch={args.patch} slides={len(slides)}×"
              f"{slides[0].shape[0]}² threads={args.threads}: {args.n / dt:7.1f} patches/s "
              f"({1e3 * dt / args.n:.2f} ms/patch)")


if __name__ == "__main__":
    main()
