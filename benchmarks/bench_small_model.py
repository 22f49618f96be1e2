"""Small-model speed inside the engine: a teacher against its student (issue 25 item 5).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_small_model.py \
        [--teacher CKPT] [--student CKPT] [--repeats 3] [--memory-format contiguous,channels_last]

Both networks go through the code path `hpcstain stain` runs for one slab unit,
:func:`hpcstain.volume.stain.stain_slab` (tile gather from the slab, the generator, blending
on the global grid, the uint8 conversion into the output layout), on a slab of normalised
random CT already in memory (no reading, Gaussian or writing: those cost the same for any
model). Parts:

* ``engine``: 32 planes of 128² (one 128² tile each) and 4 planes of 512² (tiles 256, step
  192, Hann: 9 tiles per plane, blended), at the CPU default batch (2^17 px: 8 tiles of
  128², 2 of 256²) and at 8 and 32 tiles per generator call; the teacher and the student
  timed interleaved in this process, best of ``--repeats``; the measured
  speed-up against the FLOP ratio (counted by :class:`torch.utils.flop_counter.FlopCounterMode`
  on one 128² tile);
* ``bare``: the networks alone on one batch of 8×128² (torch's up-levels or fused, contiguous
  or channels_last);
* ``phases``: the student's time in the engine split into gather (reading the tile context,
  cutting tiles, mirror padding), network (the tile function: sign, the module, the copy
  back), blend (placing and normalising the tiles), convert (to uint8 into the output
  layout) and the rest, wall seconds of the best repeat (timers wrap the engine's functions).

``--memory-format`` times the engine with each memory format the generator supports
(:func:`hpcstain.inference.load_generator`'s ``memory_format``; a checkout without it runs
only ``contiguous``), and ``before``: the generator as loaded before
:mod:`hpcstain.models.fastpath` (torch's own upsample and pad, contiguous), for a
before/after measured side by side in one process.
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hpcstain import tiles
from hpcstain.checkpoint import read_checkpoint
from hpcstain.geometry import Region
from hpcstain.inference import generator_net, load_generator
from hpcstain.volume import stain as S
from hpcstain.volume.plan import Plan

TEACHER = "/tmp/ts/L6/run/checkpoints/latest.pt"
STUDENT = "/tmp/ts/DU128-student/checkpoints/latest.pt"
# (label, planes, edge, tile, step, max_tile)
SHAPES = [("32 planes of 128²", 32, 128, 256, 192, 512),
          ("4 planes of 512² (tiles 256)", 4, 512, 256, 192, 0)]
BATCHES = (0, 8, 32)  # 0: the engine's default (tiles.auto_batch: 2^17 px on a CPU)


def flops_per_pixel(ckpt: str) -> float:
    """Forward FLOPs per input pixel of a checkpoint's generator on one 3×128² tile."""
    from torch.utils.flop_counter import FlopCounterMode

    net = generator_net(read_checkpoint(ckpt).data, "ct2hist", ckpt, "cpu")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, 3, 128, 128))
    return counter.get_total_flops() / 128 ** 2


def make_fn(ckpt: str, memory_format: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tile function ``stain`` runs; ``before``: the generator as loaded before
    :mod:`hpcstain.models.fastpath` (torch's own up-levels, contiguous)."""
    if memory_format == "before":
        from hpcstain.ct.conventions import conventions_of
        from hpcstain.inference import _tile_fn

        data = read_checkpoint(ckpt).data
        net = generator_net(data, "ct2hist", ckpt, "cpu")
        return _tile_fn(net, conventions_of(data, ckpt), False, "cpu", "none")
    if "memory_format" in inspect.signature(load_generator).parameters:
        return load_generator(ckpt, "cpu", memory_format=memory_format).fn
    if memory_format != "contiguous":
        raise SystemExit("this checkout's load_generator has no memory_format")
    return load_generator(ckpt, "cpu").fn


def slab(planes: int, edge: int, tile: int, step: int, max_tile: int
         ) -> tuple[np.ndarray, Region, Plan]:
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1, 1, (planes, edge, edge)).astype(np.float32)
    box = (slice(0, planes), slice(0, edge), slice(0, edge))
    plan = Plan(input="bench", shape=(planes, edge, edge), chunk=(planes, edge, edge),
                tile=tile, step=step, window="hann", max_tile=max_tile, in_channels=3,
                size_multiple=4)
    return ct, box, plan


def batches(plan: Plan) -> list[int]:
    """BATCHES with 0 resolved to the CPU default for the plan's tiles (duplicates once)."""
    return list(dict.fromkeys(tiles.auto_batch(plan.plane_tiling("z")[0], "cpu", b)
                              for b in BATCHES))


def engine_seconds(fn: Callable[[torch.Tensor], torch.Tensor], ct: np.ndarray, box: Region,
                   plan: Plan, batch: int) -> float:
    t0 = time.perf_counter()
    S.stain_slab(ct, box, box, "z", plan, fn, batch)
    return time.perf_counter() - t0


def part_engine(fns: dict[str, Any], ratio: float, repeats: int) -> None:
    print("\n## engine: stain_slab, best of", repeats, "(teacher and student interleaved)")
    formats = list(dict.fromkeys(f for _, f in fns))
    print("| input | batch | format | teacher s | student s | teacher/student | "
          "of FLOP ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, planes, edge, tile, step, max_tile in SHAPES:
        ct, box, plan = slab(planes, edge, tile, step, max_tile)
        for batch in batches(plan):
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(repeats):
                for key, fn in fns.items():
                    best[key] = min(best[key], engine_seconds(fn, ct, box, plan, batch))
            for fmt in formats:
                t, s = best["teacher", fmt], best["student", fmt]
                print(f"| {label} | {batch} | {fmt} | {t:.3f} | {s:.4f} | {t / s:.1f}× | "
                      f"{t / s / ratio:.2f} |")


BARE = {"torch ops, contiguous": (False, "contiguous"),
        "torch ops, channels_last": (False, "channels_last"),
        "fused, contiguous": (True, "contiguous"), "fused, channels_last": (True, "channels_last")}


def part_bare(ckpts: dict[str, str], repeats: int) -> None:
    """The modules alone (no tile function), torch's up-levels or fused, in both layouts."""
    from hpcstain.models.fastpath import MEMORY_FORMATS, fuse_upsample_pad

    print("\n## bare networks: one batch of 8×128², best of", 3 * repeats)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (8, 3, 128, 128))
                         .astype(np.float32))
    runs: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, ckpt in ckpts.items():
        for variant, (fused, fmt) in BARE.items():
            net = generator_net(read_checkpoint(ckpt).data, "ct2hist", ckpt, "cpu")
            if fused:
                fuse_upsample_pad(net, MEMORY_FORMATS[fmt])
            net = net.to(memory_format=MEMORY_FORMATS[fmt])
            xf = x.contiguous(memory_format=MEMORY_FORMATS[fmt])
            runs[name, variant] = lambda net=net, xf=xf: net(xf)
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for _ in range(3 * repeats):
            for key, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[key] = min(best[key], time.perf_counter() - t0)
    print("| network | teacher s | student s | teacher/student |")
    print("|---|---|---|---|")
    for variant in BARE:
        t, s = best["teacher", variant], best["student", variant]
        print(f"| {variant} | {t:.4f} | {s:.4f} | {t / s:.1f}× |")


# the engine's functions, by phase (patched where the checkout has them)
PHASES = {
    "gather": [(tiles, "_read_context"), (tiles._TileGrid, "tile")],
    "blend": [(tiles._TileGrid, "place"), (tiles._TileGrid, "normalise_overlaps")],
    "convert": [(S, "to_uint8_into")],
}


def part_phases(fn: Callable[[torch.Tensor], torch.Tensor], repeats: int) -> None:
    print("\n## phases of the student in the engine (wall s, best repeat)")
    spent: dict[str, float] = {}

    def timed(phase: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t0
        return wrapper

    saved = []
    for phase, places in PHASES.items():
        for owner, name in places:
            if name in vars(owner):
                saved.append((owner, name, vars(owner)[name]))
                setattr(owner, name, timed(phase, vars(owner)[name]))
    net = timed("network", fn)
    print("| input | batch | total s | gather | network | blend | convert | rest |")
    print("|---|---|---|---|---|---|---|---|")
    try:
        for label, planes, edge, tile, step, max_tile in SHAPES:
            ct, box, plan = slab(planes, edge, tile, step, max_tile)
            for batch in batches(plan):
                best: tuple[float, dict[str, float]] = (float("inf"), {})
                for _ in range(repeats):
                    spent.clear()
                    total = engine_seconds(net, ct, box, plan, batch)
                    if total < best[0]:
                        best = (total, dict(spent))
                total, ph = best
                rest = total - sum(ph.values())
                print(f"| {label} | {batch} | {total:.4f} | " + " | ".join(
                    f"{ph.get(p, 0.0):.4f} ({ph.get(p, 0.0) / total:.0%})"
                    for p in ("gather", "network", "blend", "convert"))
                    + f" | {rest:.4f} ({rest / total:.0%}) |")
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--student", default=STUDENT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-format", default="before,contiguous,channels_last",
                    help="comma-separated: before (the generator as loaded before "
                    "hpcstain.models.fastpath), contiguous, channels_last")
    ap.add_argument("--only", default="engine,bare,phases")
    args = ap.parse_args()
    parts = args.only.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), load "
          f"{os.getloadavg()[0]:.2f}")
    ckpts = {"teacher": args.teacher, "student": args.student}
    flops = {k: flops_per_pixel(c) for k, c in ckpts.items()}
    ratio = flops["teacher"] / flops["student"]
    print(f"FLOP/px: teacher {flops['teacher'] / 1e3:.1f} k, student "
          f"{flops['student'] / 1e3:.1f} k: ratio {ratio:.1f}×")
    formats = args.memory_format.split(",")
    fns = {(k, f): make_fn(c, f) for f in formats for k, c in ckpts.items()}
    if "engine" in parts:
        part_engine(fns, ratio, args.repeats)
    if "bare" in parts:
        part_bare(ckpts, args.repeats)
    if "phases" in parts:
        for f in formats:
            print(f"\n(student, {f})")
            part_phases(fns["student", f], args.repeats)


if __name__ == "__main__":
    main()
