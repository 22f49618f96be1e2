"""Volume-engine throughput: stain a phantom with a small conv net, then fuse.

    .venv/bin/python benchmarks/bench_volume.py [--shape 48 96 96] [--chunk 48] [--tile 64]

Prints voxels/s for staining (per axis and in total, with the halo/context overhead of the
chunking) and seconds per fuse method. The stand-in net is a 4-layer conv net of 32
features (the real ResNet generator is ~100× more work per pixel): the numbers measure
the engine's overhead, not the model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hpcstain.executors import run_stain
from hpcstain.phantom import write_volume_file
from hpcstain.volume import fuse_run, init_run, make_plan, open_volume


def small_net(width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, 3, 3, padding=1), torch.nn.Tanh()).eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96])
    p.add_argument("--chunk", type=int, nargs="+", default=[48, 24])
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--step", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net = small_net()

    def fn(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(batch)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src_path = write_volume_file(root / "ph.zarr", tuple(args.shape), "mg", 0)
        src = open_volume(src_path)
        n_vox = src.shape[0] * src.shape[1] * src.shape[2]
        for chunk in args.chunk:
            plan = make_plan(src, chunk=chunk, tile=args.tile, step=args.step)
            run = init_run(root / f"run-{chunk}", plan)
            t0 = time.perf_counter()
            run_stain(run, fn, batch_size=args.batch_size, progress=False)
            dt = time.perf_counter() - t0
            print(f"stain shape={tuple(src.shape)} chunk={chunk} ({plan.n_chunks} chunks) "
                  f"tile={args.tile}/{args.step} axes=zyx: {dt:.2f} s, "
                  f"{3 * n_vox / dt / 1e3:.1f} kvoxel-axes/s")
            for method in ("mean", "median", "consistency"):
                t0 = time.perf_counter()
                fuse_run(run, method=method, out=f"fused-{method}.ome.zarr")  # type: ignore[arg-type]
                print(f"  fuse {method:<12} {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
