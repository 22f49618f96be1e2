"""Time and peak memory of phantom generation (target: 256³ with truth in < 30 s, 2 cores).

    python benchmarks/bench_phantom.py [--shape 256 256 256] [--material mg] [--format zarr]
                                       [--pairs 10 --size 512 512] [--out bench-out]

Peak memory is the process's maximum resident set size minus the resident size after
imports, so it measures what generation itself holds (compare with the output size).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 256])
    p.add_argument("--material", default="mg")
    p.add_argument("--format", choices=("zarr", "h5", "tif"), default="zarr")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--pairs", type=int, default=10, help="0 skips the pairs benchmark")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512])
    p.add_argument("--out", default=None, help="directory for outputs (default: a temp dir)")
    args = p.parse_args(argv)

    from hpcstain.phantom import write_pairs, write_volume_file

    base = rss_mb()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-phantom-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        shape = tuple(args.shape)
        out = root / f"volume.{args.format}"
        t0 = time.perf_counter()
        write_volume_file(out, shape, args.material, seed=1, overwrite=True, chunk=args.chunk)
        dt = time.perf_counter() - t0
        nvox = shape[0] * shape[1] * shape[2]
        out_mb = nvox * (2 + 3 + 1) / 2**20
        peak = rss_mb() - base
        print(f"volume {shape} {args.material} -> {args.format}: {dt:.1f} s, "
              f"{nvox / dt / 1e6:.2f} Mvoxel/s, peak +{peak:.0f} MiB "
              f"({peak / out_mb:.1f}x the {out_mb:.0f} MiB of uncompressed output)")
        if args.pairs > 0:
            t0 = time.perf_counter()
            write_pairs(root / "pairs", args.pairs, seed=1, size=tuple(args.size), overwrite=True)
            dt = time.perf_counter() - t0
            print(f"pairs n={args.pairs} size={tuple(args.size)}: {dt:.1f} s "
                  f"({dt / args.pairs:.2f} s/pair), peak +{rss_mb() - base:.0f} MiB")
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
