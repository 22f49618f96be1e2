"""Volume engine v2 against its own generator, its memory bound and two peers (issue #12).

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--only cost,overhead,memory,fuse,peers]

Parts (each prints one table; numbers go to docs/benchmarks.md):

* ``cost``: generator input pixels per output voxel·axis at the default tiling (256/192
  Hann, planes covered by equal tiles of up to 512 px), counted by the engine itself (the
  run's completion records), on 37×131×97, 256³, 24×512² and 64×1024² volumes, 3 axes.
  The plan takes a ResNet checkpoint's conventions (tiles in multiples of 4); a stand-in
  per-pixel map runs in its place to keep this fast: the count does not depend on the
  network.
* ``overhead``: ``hpcstain stain`` (3 axes, in-process, 2 threads, 96×256×256) vs the bare
  generator run over the same slices with the same tiling (no I/O, no Gaussian, no writes),
  with a real ResNet generator (modcyclegan-tiny architecture, ngf 8, 2 blocks).
* ``memory``: peak RSS of an in-process ``hpcstain stain`` of a 64×1024×1024 uint16 volume
  (3 axes, ResNet ngf 4 / 1 block), in a child process.
* ``fuse``: ``fuse`` (mean, 3 axes, 128×384×384, chunk 64, outside fill from the CT) with
  and without the confidence image vs a plain zarr copy of the same RGB data (read the
  three per-axis arrays, write one RGB array), and fuse with 2 dask workers; best of 3
  interleaved repetitions.
* ``peers``: slice-wise staining of a 32×512×512 volume with the same generator and tile
  size and the same pixels per generator call: hpcstain, MONAI
  ``sliding_window_inference`` (overlap 0.25, Gaussian blending), dask ``map_overlap``
  (256² blocks + 32 px overlap); seconds and the seam index relative to one untiled pass
  of each whole slice (1 = no seams).
* ``null`` (issue 25): the whole engine (plan → ``run_stain`` local, 3 axes, chunk 128,
  default tiling) with a generator that costs nothing (it returns its input's first three
  channels), on 64×512×512 and 128×1024×1024 uint16 (``--quick``: 32×256×256 and
  64×512×512), each in a child process with one thread: voxel·axis/s per wall second and
  per CPU second (the prefetch thread can use a second core), peak RSS
  (``ru_maxrss``), and where the time goes (read, prepare = cupping/Gaussian/levels/pad,
  generator, tiles = gather + blend, convert to uint8, write = encode + fsync, and the
  main thread's wait for the prefetched unit). ``--baseline DIR`` runs the same children
  against another checkout's ``hpcstain`` package (e.g. ``git archive`` of an older
  commit) interleaved with this one, for a before/after measured side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from hpcstain.executors import run_stain
from hpcstain.inference import load_generator
from hpcstain.tiles import DEFAULT_TILING, auto_batch, stain_image
from hpcstain.volume import fuse_run, init_run, make_plan, open_volume
from hpcstain.volume.plan import load_plan
from hpcstain.volume.rundir import axis_store
from hpcstain.volume.stain import generator_cost

MAX_TILE = DEFAULT_TILING.max_tile  # what `hpcstain stain` uses by default


def synthetic_ct(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """A bone-like uint16 volume (smooth structures + noise), written slab by slab."""
    rng = np.random.default_rng(seed)
    arr = zarr.create_array(str(path), shape=shape, chunks=(16, 256, 256), dtype="uint16")
    y, x = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    for z0 in range(0, shape[0], 16):
        z = np.arange(z0, min(shape[0], z0 + 16))[:, None, None]
        bone = (np.sin(z / 7.0) + np.cos(y / 11.0) * np.sin(x / 13.0)) > 0.3
        vol = np.where(bone, 30000, 10000) + rng.normal(0, 1500, bone.shape)
        arr[z0:z0 + len(z)] = np.clip(vol, 0, 65535).astype(np.uint16)
    return path


def checkpoint(path: Path, ngf: int, blocks: int) -> Path:
    from hpcstain.checkpoint import save_checkpoint
    from hpcstain.config import Config, to_dict
    from hpcstain.models import architecture_of, build_model

    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = ngf, 8, blocks
    model = build_model(cfg.model, cfg.loss, "cpu", seed=0)
    save_checkpoint(path, {"architecture": architecture_of(cfg.model), "config": to_dict(cfg),
                           "model": model.state_dict()})
    return path


def best_of(repeats: int, **runs) -> dict[str, float]:
    """Minimum wall time of each zero-argument callable, run interleaved ``repeats`` times
    (the machines are shared: interleaving exposes each to the same load)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def per_pixel(batch: torch.Tensor) -> torch.Tensor:
    return torch.tanh(batch[:, :1]).expand(-1, 3, -1, -1)


def part_cost(root: Path, quick: bool) -> None:
    print("\n## cost: generator pixels per output voxel·axis (defaults 256/192 hann)")
    print("| volume | z | y | x | all |\n|---|---|---|---|---|")
    shapes = [(37, 131, 97), (64, 128, 128)] if quick else [(37, 131, 97), (256, 256, 256),
                                                           (24, 512, 512), (64, 1024, 1024)]
    ckpt = checkpoint(root / "cost.pt", 4, 1)
    for shape in shapes:
        vol = synthetic_ct(root / f"cost-{shape[0]}.zarr", shape)
        plan = make_plan(open_volume(vol), chunk=128, levels=(30000.0, 10000.0),
                         checkpoint=ckpt, max_tile=MAX_TILE)
        run = init_run(root / f"cost-run-{shape[0]}", plan)
        run_stain(run, per_pixel, progress=False)
        c = generator_cost(run)
        print(f"| {'×'.join(map(str, shape))} | {c['z']:.2f} | {c['y']:.2f} | {c['x']:.2f} "
              f"| {c['all']:.2f} |")


def bare_generator_seconds(vol: Path, plan_dir: Path, fn) -> float:
    """The generator alone over every slice of every axis, same tiling as the plan (the
    volume is already in memory and normalised; nothing is written)."""
    plan = load_plan(plan_dir)
    ct = np.asarray(zarr.open_array(str(vol), mode="r")[...], np.float32)
    unit = np.clip((ct - 10000.0) / 20000.0 * 0.3 - 0.7, -1, 1)
    t0 = time.perf_counter()
    for a, axis in enumerate(plan.axes):
        tile, step = plan.plane_tiling(axis)
        planes = np.moveaxis(unit, a, 0)
        for s in range(0, planes.shape[0], 16):
            stack = np.repeat(planes[s:s + 16, None], 3, axis=1)
            stain_image(stack, fn, tile=tile, step=step, window=plan.window,
                        batch_size=auto_batch(tile))
    return time.perf_counter() - t0


def part_overhead(root: Path, quick: bool) -> None:
    print("\n## overhead: hpcstain stain vs the bare generator (3 axes, 2 threads)")
    shape = (32, 128, 128) if quick else (96, 256, 256)
    vol = synthetic_ct(root / "over.zarr", shape)
    ckpt = checkpoint(root / "over.pt", 8, 2)
    plan = make_plan(open_volume(vol), chunk=64, levels=(30000.0, 10000.0), checkpoint=ckpt,
                     max_tile=MAX_TILE)
    runs = iter(range(100))
    fn = load_generator(ckpt).fn

    def engine() -> None:
        run = init_run(root / f"over-run-{next(runs)}", plan)
        run_stain(run, progress=False)

    t = best_of(3, engine=engine,
                bare=lambda: bare_generator_seconds(vol, root / "over-run-0", fn))
    print("| volume | stain s | bare generator s | ratio |\n|---|---|---|---|")
    print(f"| {'×'.join(map(str, shape))} | {t['engine']:.1f} | {t['bare']:.1f} | "
          f"{t['engine'] / t['bare']:.2f} |")


MEMORY_CHILD = """
import sys, resource, time
from hpcstain.executors import run_stain
from hpcstain.volume import init_run, make_plan, open_volume
vol, ckpt, run = sys.argv[1:4]
plan = make_plan(open_volume(vol), chunk=128, levels=(30000.0, 10000.0), checkpoint=ckpt,
                 max_tile=512)
init_run(run, plan)
t0 = time.perf_counter()
run_stain(run, progress=False)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def part_memory(root: Path, quick: bool) -> None:
    print("\n## memory: peak RSS of an in-process stain (3 axes)")
    shape = (32, 512, 512) if quick else (64, 1024, 1024)
    vol = synthetic_ct(root / "mem.zarr", shape)
    ckpt = checkpoint(root / "mem.pt", 4, 1)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(vol), str(ckpt),
                          str(root / "mem-run")], capture_output=True, text=True, check=True)
    seconds, kib = out.stdout.split()
    print("| volume | input | seconds | peak RSS |\n|---|---|---|---|")
    print(f"| {'×'.join(map(str, shape))} uint16 | {np.prod(shape) * 2 / 2**30:.2f} GiB | "
          f"{float(seconds):.0f} | {int(kib) / 2**20:.2f} GiB |")


def part_fuse(root: Path, quick: bool) -> None:
    print("\n## fuse vs a plain zarr copy of the same RGB data")
    shape = (32, 128, 128) if quick else (128, 384, 384)
    vol = synthetic_ct(root / "fuse.zarr", shape)
    plan = make_plan(open_volume(vol), chunk=64, levels=(30000.0, 10000.0))
    run = init_run(root / "fuse-run", plan)
    run_stain(run, per_pixel, progress=False)
    n = iter(range(100))

    def copy() -> None:
        arrays = [zarr.open_array(str(axis_store(run, a)), mode="r") for a in "zyx"]
        out = zarr.create_array(str(root / f"copy-{next(n)}.zarr"), shape=(*shape, 3),
                                chunks=(64, 64, 64, 3), dtype="uint8")
        for i in range(plan.n_chunks):
            region = (*plan.write_region(i), slice(None))
            blocks = [np.asarray(a[region]) for a in arrays]
            out[region] = blocks[0]

    runs = {"copy": copy,
            "fuse": lambda: fuse_run(run, method="mean", out=f"s{next(n)}.ome.zarr"),
            "bare": lambda: fuse_run(run, method="mean", out=f"b{next(n)}.ome.zarr",
                                     confidence=False),
            "parallel": lambda: fuse_run(run, method="mean", out=f"p{next(n)}.ome.zarr",
                                         workers=2)}
    wall, cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
    for _ in range(3):  # interleaved: every side sees the same load; best of 3 each
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)  # this process, all threads
    print("| volume | clock | zarr copy s | fuse s (ratio) | fuse --no-confidence s (ratio) "
          "| confidence cost | fuse, 2 workers s (speed-up) |")
    print("|---|---|---|---|---|---|---|")
    for clock, t in (("wall", wall), ("CPU", cpu)):
        par = (f"{t['parallel']:.2f} ({t['fuse'] / t['parallel']:.2f}×)" if clock == "wall"
               else "–")
        print(f"| {'×'.join(map(str, shape))} | {clock} | {t['copy']:.2f} | {t['fuse']:.2f} "
              f"({t['fuse'] / t['copy']:.2f}×) | {t['bare']:.2f} ({t['bare'] / t['copy']:.2f}×)"
              f" | {t['fuse'] / t['bare'] - 1:+.0%} | {par} |")


def part_peers(root: Path, quick: bool) -> None:
    from hpcstain.metrics.seams import seam_index

    print("\n## peers: slice-wise staining, same generator and tile edge (z axis)")
    shape = (4, 384, 384) if quick else (32, 512, 512)
    vol = synthetic_ct(root / "peer.zarr", shape)
    ckpt = checkpoint(root / "peer.pt", 8, 2)
    fn = load_generator(ckpt).fn
    ct = np.asarray(zarr.open_array(str(vol), mode="r")[...], np.float32)
    unit = np.clip((ct - 10000.0) / 20000.0 * 0.3 - 0.7, -1, 1)
    untiled = np.stack([fn(torch.from_numpy(np.repeat(s[None, None], 3, 1)))[0].numpy()
                        for s in unit])
    results = {}

    plan = make_plan(open_volume(vol), chunk=(8, 512, 512), axes="z", sigma=0.0,
                     levels=(30000.0, 10000.0), checkpoint=ckpt, max_tile=MAX_TILE)
    outputs: dict[str, np.ndarray] = {}
    n = iter(range(100))

    def ours() -> None:
        run = init_run(root / f"peer-run-{next(n)}", plan)
        run_stain(run, progress=False)
        out = zarr.open_array(str(axis_store(run, "z")), mode="r")[...]
        outputs["ours"] = np.asarray(out, np.float32)[..., 0] / 127.5 - 1.0

    from monai.inferers import sliding_window_inference

    def monai() -> None:
        parts = []
        with torch.inference_mode():
            for s0 in range(0, shape[0], 8):
                batch = torch.from_numpy(np.repeat(unit[s0:s0 + 8, None], 3, 1))
                parts.append(sliding_window_inference(batch, (256, 256), auto_batch(256), fn,
                                                      overlap=0.25,
                                                      mode="gaussian").numpy()[:, 0])
        outputs["monai"] = np.concatenate(parts)

    import dask.array as da

    def block_fn(block: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.repeat(block[:, None], 3, 1).astype(np.float32))
        return fn(t)[:, 0].numpy()  # one channel: map_overlap keeps the block shape

    def dask_overlap() -> None:
        darr = da.from_array(unit, chunks=(2, 256, 256))  # ~ the same pixels per call
        outputs["dask"] = darr.map_overlap(block_fn, depth=(0, 32, 32), boundary="reflect",
                                           dtype=np.float32).compute(scheduler="threads")

    t = best_of(2, ours=ours, monai=monai, dask=dask_overlap)
    results["hpcstain (default: one 512² tile)"] = (t["ours"], outputs["ours"], (512, 512))
    results["MONAI sliding_window (0.25, gaussian)"] = (t["monai"], outputs["monai"],
                                                        (256, 192))
    results["dask map_overlap (256 + 32)"] = (t["dask"], outputs["dask"], (256, 256))

    print("| method | seconds | seam index rel. untiled (R) |\n|---|---|---|")
    for name, (sec, img, (tile, step)) in results.items():
        seams = np.median([seam_index(img[s], tile, step, untiled[s, 0])
                           for s in range(shape[0])])
        print(f"| {name} | {sec:.1f} | {seams:.3f} |")


NULL_CHILD = r"""
import json, os, resource, sys, threading, time
import torch
torch.set_num_threads(1)
import hpcstain.volume.stain as S
from hpcstain.executors import run_stain
from hpcstain.volume import init_run, make_plan, open_volume
from hpcstain.volume.io import VolumeSource

vol, ckpt, run, real = sys.argv[1:5]
real = real == "1"  # ckpt is a trained checkpoint: stain with it (its conventions, its net)
spent, total = {}, {}
lock = threading.Lock()
local = threading.local()
main = threading.main_thread()


def timed(name, f):
    # CPU seconds of this thread inside f (the machine is shared: wall seconds of a phase
    # include other processes), minus those of timed calls nested in it (each phase counted
    # once); "unit" also in wall seconds, for the main thread's wait
    def wrapper(*a, **k):
        outer = getattr(local, "stack", None)
        if outer is None:
            outer = local.stack = []
        outer.append(0.0)
        t0, w0 = time.thread_time(), time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            cpu, wall = time.thread_time() - t0, time.perf_counter() - w0
            inner = outer.pop()
            if outer:
                outer[-1] += cpu
            with lock:
                # zarr decodes and encodes in threads of its own: read/write count the wait
                spent[name] = spent.get(name, 0.0) + (wall if name in ("read", "write")
                                                      else cpu - inner)
                total[name] = total.get(name, 0.0) + cpu
                if name in ("unit", "generator"):
                    total[f"{name}_wall"] = total.get(f"{name}_wall", 0.0) + wall
                if name == "prepare" and threading.current_thread() is not main:
                    total["prefetch"] = total.get("prefetch", 0.0) + cpu
    return wrapper


def null(batch):
    return batch[:, :3]


VolumeSource.read = timed("read", VolumeSource.read)
S.prepare_context = timed("prepare", S.prepare_context)
S.stain_region = timed("tiles", S.stain_region)
for name in ("to_uint8", "to_uint8_into"):
    if hasattr(S, name):
        setattr(S, name, timed("convert", getattr(S, name)))
S.write_axis_region = timed("write", S.write_axis_region)
import hpcstain.executors.local as L
L.stain_unit = S.stain_unit = timed("unit", S.stain_unit)
s0 = time.perf_counter()
plan = make_plan(open_volume(vol), chunk=128, levels=(30000.0, 10000.0), checkpoint=ckpt,
                 max_tile=512)
init_run(run, plan)
if real:  # the run's pinned generator, as `hpcstain stain` loads it
    from hpcstain.volume.stain import PinnedStainer
    fn = timed("generator", PinnedStainer(run)())
else:
    fn = timed("generator", null)
t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
setup = t0 - s0  # plan, run directory, pinning and loading the generator (wall)
run_stain(run, fn, progress=False)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
main_cpu = time.thread_time() - m0
spent["wait"] = max(0.0, wall - total.get("unit_wall", 0.0))  # main thread outside units
# CPU of every other thread: zarr's codec and file I/O threads (and torch's, if any)
spent["other threads"] = cpu - main_cpu - total.get("prefetch", 0.0)

spent["generator wall"] = total.get("generator_wall", 0.0)
print(json.dumps({"wall": wall, "cpu": cpu, "setup": setup, "voxel_axes": int(plan.n_units and
                  len(plan.axes) * plan.shape[0] * plan.shape[1] * plan.shape[2]),
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "phases": spent}))
"""
WALL_PHASES = ("read", "write", "wait", "generator wall")
PHASES = ("read", "prepare", "generator", "tiles", "convert", "write", "unit", "wait",
          "other threads", "generator wall")
# CPU seconds of the thread doing each (the prefetch thread reads and prepares), but wall
# seconds for read and write (zarr decodes and encodes in threads of its own); "unit": the
# rest of a unit (records, markers, reshaping); "wait": wall seconds of the main thread
# outside units (waiting for the prefetched unit, the run's set-up and its summary); "other
# threads": CPU seconds of every thread but the main and the prefetch one (zarr's decoding,
# encoding and file I/O)


def null_run(root: Path, vol: Path, ckpt: Path, package: Path | None, tag: str,
             real: bool = False) -> dict:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if package is not None:
        env["PYTHONPATH"] = str(package)
    run = root / f"null-run-{tag}"
    out = subprocess.run([sys.executable, "-c", NULL_CHILD, str(vol), str(ckpt), str(run),
                          "1" if real else "0"],
                         capture_output=True, text=True, env=env, cwd=root)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_null(root: Path, quick: bool, baseline: Path | None = None, repeats: int = 1,
              shapes: list[tuple[int, ...]] | None = None, real: Path | None = None) -> None:
    if real is None:
        print("\n## null: the engine with a generator that costs nothing (3 axes, 1 thread)")
    else:
        print(f"\n## the engine with the generator of {real} (3 axes, 1 thread)")
    shapes = shapes or ([(32, 256, 256), (64, 512, 512)] if quick else [(64, 512, 512),
                                                                       (128, 1024, 1024)])
    ckpt = checkpoint(root / "null.pt", 4, 1) if real is None else real
    sides = {"this": None} if baseline is None else {"baseline": baseline, "this": None}
    print("| volume | code | wall s | CPU s | M voxel·axis/s (wall) | M voxel·axis/s per CPU s "
          "| peak RSS GiB | " + " | ".join(
              p if p.endswith("wall") else f"{p} {'wall' if p in WALL_PHASES else 'CPU'} s"
              for p in PHASES) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(PHASES))
    for shape in shapes:
        vol = synthetic_ct(root / f"null-{shape[0]}.zarr", shape)
        best: dict[str, dict] = {}
        for r in range(repeats):  # interleaved; the run with the least CPU of each side is kept
            for name, pkg in sides.items():
                res = null_run(root, vol, ckpt, pkg, f"{name}-{r}", real is not None)
                if name not in best or res["cpu"] < best[name]["cpu"]:
                    best[name] = res
        for name, res in best.items():
            n = res["voxel_axes"]
            ph = res["phases"]
            print(f"| {'×'.join(map(str, shape))} | {name} | {res['wall']:.1f} | "
                  f"{res['cpu']:.1f} | {n / res['wall'] / 1e6:.1f} | {n / res['cpu'] / 1e6:.1f}"
                  f" | {res['rss_kib'] / 2**20:.2f} | "
                  + " | ".join(f"{ph.get(p, 0.0):.1f}" for p in PHASES) + " |")
            if real is not None and ph.get("generator wall"):
                print(f"|   | {name}: stain wall / generator wall "
                      f"{res['wall'] / ph['generator wall']:.3f}× (with the set-up: plan, "
                      f"pinning, loading {res['setup']:.1f} s: "
                      f"{(res['wall'] + res['setup']) / ph['generator wall']:.3f}×), "
                      "stain CPU / generator CPU "
                      f"{res['cpu'] / max(ph.get('generator', 0.0), 1e-9):.3f}× |")
        if baseline is not None:
            b, t = best["baseline"], best["this"]
            print(f"| {'×'.join(map(str, shape))} | speed-up this vs baseline | "
                  f"{b['wall'] / t['wall']:.2f}× | {b['cpu'] / t['cpu']:.2f}× | | | "
                  f"{b['rss_kib'] / t['rss_kib']:.2f}× less |")
        import shutil

        shutil.rmtree(vol, ignore_errors=True)


PARTS = {"null": part_null, "cost": part_cost, "overhead": part_overhead, "memory": part_memory,
         "fuse": part_fuse, "peers": part_peers}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--only", default=",".join(PARTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline", type=Path, default=None,
                   help="null: also run the children against this hpcstain checkout")
    p.add_argument("--repeats", type=int, default=1, help="null: interleaved repetitions")
    p.add_argument("--shapes", default="", help="null: Z,Y,X;Z,Y,X (default: by --quick)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="null: stain with this trained checkpoint's generator instead of the "
                        "null one (its conventions: context slices, σ); prints stain wall / "
                        "generator wall")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            if name == "null":
                shapes = [tuple(int(n) for n in s.split(",")) for s in args.shapes.split(";")
                          if s]
                part_null(Path(tmp), args.quick, args.baseline, args.repeats, shapes,
                          args.checkpoint)
            else:
                PARTS[name](Path(tmp), args.quick)
    print(json.dumps({"maxrss_gib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 2**20}))


if __name__ == "__main__":
    main()
