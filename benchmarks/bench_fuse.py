"""`hpcstain fuse` against a plain zarr copy of its inputs (issue 25 item 3).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fuse.py [--quick] [--repeats 3]
        [--before DIR] [--workers 2] [--codecs]

The run: the synthetic CT of ``bench_engine.py`` (128×384×384 uint16, or 32×128×128 with
``--quick``), chunk 64, stained on three axes by the stand-in per-pixel map. Every side runs
in a fresh child process (``PYTHONPATH`` = this tree, or ``--before DIR``: a tree holding an
older ``hpcstain/``, e.g. ``git archive <commit> hpcstain | tar -x -C DIR``), interleaved,
best of ``--repeats``; wall clock and the child's CPU time (all its threads):

* ``copy``: the issue's plain zarr copy of fuse's inputs: the three per-axis RGB arrays read
  chunk by chunk (the output's 64³ chunks), the CT read once in its own storage chunks, one
  RGBA array (4, Z, Y, X) written chunk by chunk with the same codec as the fused image
  (zstd level 1, zarr v2);
* ``copy-all``: ``copy`` by blocks of 2×2×2 chunks (as fuse goes) that also writes what
  fuse writes besides the RGBA level 0 (a one-channel level 0, and level 1 of both, taken
  by striding: no arithmetic): the I/O floor of fuse with its confidence image;
* ``copy-rgb``: the older baseline of ``bench_engine.py --only fuse`` (three axes read, one
  RGB array written with zarr's defaults, no CT);
* ``fuse``: ``fuse_run(method="mean")``, confidence on (the default), outside fill on;
* ``fuse-noconf``: the same with ``confidence=False``;
* ``--perturb``: uniform noise (±40 on y, ±80 on x) on two axes, so that the axes
  disagree and the outputs compress like real stains rather than 16×;
* ``fuse-N``: ``fuse`` on ``--workers`` local processes (wall clock only: the workers' CPU is
  not the child's);
* with ``--before``: ``fuse`` and ``fuse-noconf`` of the older tree beside this one's.

``--codecs`` writes the fused level-0 RGBA of the run with several codecs and reports write
speed and size (how the image's codec was chosen).

``--hashes`` (with or without ``--before DIR``) checks byte identity instead of timing:
on a 37×131×97 run (odd shape, 6 chunks) and the benchmark's run, both with perturbed
axes, it fuses with mean, median, consistency, ``single_axis="y"`` and
``confidence=False, fill_outside=False`` in a child per tree and prints the sha256 of every
level of the RGBA and disagreement images and of every file name and content of the image;
with ``--before`` it compares the two trees and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TREE = HERE.parent


def make_run(root: Path, shape: tuple[int, int, int], perturb: bool = False) -> Path:
    sys.path.insert(0, str(HERE))
    from bench_engine import per_pixel, synthetic_ct

    from hpcstain.executors import run_stain
    from hpcstain.volume import init_run, make_plan, open_volume
    from hpcstain.volume.rundir import axis_store

    vol = synthetic_ct(root / "ct.zarr", shape)
    plan = make_plan(open_volume(vol), chunk=64, levels=(30000.0, 10000.0))
    run = init_run(root / "run", plan)
    run_stain(run, per_pixel, progress=False)
    if perturb:  # the axes disagree (the stand-in gives three equal axes): uniform noise
        import numpy as np
        import zarr

        rng = np.random.default_rng(1)
        for k, a in enumerate("yx", 1):
            arr = zarr.open_array(str(axis_store(run, a)), mode="r+")
            d = np.asarray(arr[:]).astype(np.int16)
            d += rng.integers(-40 * k, 40 * k, d.shape, dtype=np.int16)
            arr[:] = np.clip(d, 0, 255).astype(np.uint8)
    return Path(run)


# --------------------------------------------------------------------------- children


def child(side: str, run: str, out: str, workers: int) -> dict[str, float]:
    """One timed side, in this (fresh) process."""
    import numpy as np
    import zarr

    from hpcstain.volume import fuse_run
    from hpcstain.volume.plan import input_at, load_plan
    from hpcstain.volume.rundir import axis_store

    plan = load_plan(run)
    t0, c0 = time.perf_counter(), time.process_time()
    if side.startswith("copy"):
        arrays = [zarr.open_array(str(axis_store(run, a)), mode="r") for a in "zyx"]
        if side in ("copy", "copy-all"):
            from numcodecs import Zstd

            ct = zarr.open_array(str(input_at(plan, run)), mode="r")
            step = ct.chunks[0]
            for z in range(0, ct.shape[0], step):  # the CT once, in its own chunks
                np.asarray(ct[z:z + step])

            def create(path: str, channels: int, shape: tuple[int, ...]) -> object:
                return zarr.create_array(path, shape=(channels, *shape),
                                         chunks=(channels, *plan.chunk), dtype="uint8",
                                         zarr_format=2, compressors=Zstd(level=1),
                                         chunk_key_encoding={"name": "v2", "separator": "/"})

            dst = create(out, 4, plan.shape)
            if side == "copy":
                for i in range(plan.n_chunks):
                    region = plan.write_region(i)
                    blocks = [np.asarray(a[(*region, slice(None))]) for a in arrays]
                    rgba = np.empty((4, *blocks[0].shape[:3]), np.uint8)
                    rgba[:3] = np.moveaxis(blocks[0], -1, 0)
                    rgba[3] = blocks[1][..., 0]
                    dst[(slice(None), *region)] = rgba
            else:  # by 2×2×2 chunks, as fuse: each level-1 chunk written once, whole
                half = tuple((n + 1) // 2 for n in plan.shape)
                extra = [(create(out + "-c0", 1, plan.shape), 1, 1),
                         (create(out + "-r1", 4, half), 4, 2), (create(out + "-c1", 1, half), 1, 2)]
                step = tuple(2 * c for c in plan.chunk)
                for z in range(0, plan.shape[0], step[0]):
                    for y in range(0, plan.shape[1], step[1]):
                        for x in range(0, plan.shape[2], step[2]):
                            region = tuple(slice(o, min(o + k, n)) for o, k, n in
                                           zip((z, y, x), step, plan.shape, strict=True))
                            blocks = [np.asarray(a[(*region, slice(None))]) for a in arrays]
                            rgba = np.empty((4, *blocks[0].shape[:3]), np.uint8)
                            rgba[:3] = np.moveaxis(blocks[0], -1, 0)
                            rgba[3] = blocks[1][..., 0]
                            dst[(slice(None), *region)] = rgba
                            for arr, channels, k in extra:  # what fuse writes besides
                                part = tuple(slice(r.start // k, (r.stop + k - 1) // k)
                                             for r in region)
                                arr[(slice(None), *part)] = np.ascontiguousarray(
                                    rgba[:channels, ::k, ::k, ::k])
        else:
            dst = zarr.create_array(out, shape=(*plan.shape, 3), chunks=(64, 64, 64, 3),
                                    dtype="uint8")
            for i in range(plan.n_chunks):
                region = (*plan.write_region(i), slice(None))
                blocks = [np.asarray(a[region]) for a in arrays]
                dst[region] = blocks[0]
    else:
        name = Path(out).name
        kwargs = {"confidence": "noconf" not in side}
        if side.endswith("-par"):
            kwargs["workers"] = workers
        fuse_run(run, method="mean", out=name, **kwargs)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


HASH_SETTINGS: dict[str, dict[str, object]] = {
    "mean": {"method": "mean"}, "median": {"method": "median"},
    "consistency": {"method": "consistency"}, "single-y": {"single_axis": "y"},
    "mean-noconf-nofill": {"method": "mean", "confidence": False, "fill_outside": False}}


def hash_child(run: str, setting: str) -> dict[str, str]:
    """Fuse ``run`` with ``HASH_SETTINGS[setting]`` into a fresh image; its hashes."""
    import hashlib

    import numpy as np
    import zarr

    from hpcstain.volume import fuse_run

    name = f"h-{setting}.ome.zarr"  # the name is in the attributes: fixed
    fuse_run(run, out=name, **HASH_SETTINGS[setting])  # type: ignore[arg-type]
    image = Path(run) / name
    out: dict[str, str] = {}
    for sub in ("", "disagreement"):
        for level in range(8):
            path = image / sub / str(level)
            if not path.is_dir():
                continue
            data = np.asarray(zarr.open_array(str(path), mode="r")[...])
            out[f"{sub or 'rgba'}/{level}"] = hashlib.sha256(data.tobytes()).hexdigest()[:16]
    files = hashlib.sha256()
    for f in sorted(p for p in image.rglob("*") if p.is_file()):
        files.update(str(f.relative_to(image)).encode())
        files.update(f.read_bytes())
    out["files"] = files.hexdigest()[:16]
    import shutil

    shutil.rmtree(image)  # and its chunk records: the next child fuses afresh
    shutil.rmtree(Path(run) / "done" / name.removesuffix(".ome.zarr"))
    return out


def part_hashes(root: Path, before: Path | None, quick: bool) -> int:
    trees = {"this": TREE, **({"before": before} if before else {})}
    shapes = [(37, 131, 97)] + ([] if quick else [(128, 384, 384)])
    differ = 0
    for k, shape in enumerate(shapes):
        run = make_run(root / f"hash{k}", shape, perturb=True)
        print(f"\n## byte identity, {'×'.join(map(str, shape))} (axes perturbed)")
        for setting in HASH_SETTINGS:
            got = {}
            for label, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
                res = subprocess.run([sys.executable, __file__, "--child", f"hash:{setting}",
                                      "--run", str(run)], env=env, capture_output=True,
                                     text=True, check=False)
                if res.returncode:
                    raise SystemExit(f"{setting} ({tree}) failed:\n{res.stderr[-3000:]}")
                got[label] = json.loads(res.stdout.strip().splitlines()[-1])
            same = len({json.dumps(h, sort_keys=True) for h in got.values()}) == 1
            differ += not same
            print(f"{setting}: {'same' if same else 'DIFFER'} "
                  + " ".join(f"{key}={val}" for key, val in got["this"].items()))
            if not same:
                print(f"  before: {got['before']}")
    return 1 if differ else 0


def timed(side: str, tree: Path, run: Path, out: Path, workers: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, "--child", side, "--run", str(run),
                          "--out", str(out), "--workers", str(workers)],
                         env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{side} ({tree}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- codecs


def part_codecs(run: Path, root: Path) -> None:
    import numpy as np
    import zarr
    from numcodecs import LZ4, Blosc, Zstd

    from hpcstain.volume import fuse_run

    fuse_run(run, method="mean", out="codecs.ome.zarr")
    data = np.asarray(zarr.open_array(str(run / "codecs.ome.zarr" / "0"), mode="r")[:])
    raw = data.nbytes
    print(f"\n## codec: write speed vs size (fused level 0, {data.shape}, {raw / 2**20:.0f} MiB)")
    print("| codec | write MB/s | read MB/s | size MiB | ratio |")
    print("|---|---|---|---|---|")
    codecs = {"none": None, "zstd 1 (the image's)": Zstd(level=1), "zstd 3": Zstd(level=3),
              "zstd 5": Zstd(level=5), "lz4": LZ4(),
              "blosc lz4 shuffle (zarr v2 default)": Blosc("lz4", 5, Blosc.SHUFFLE),
              "blosc zstd 1 bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE)}
    for k, (label, codec) in enumerate(codecs.items()):
        best_w = best_r = float("inf")
        path = root / f"codec-{k}.zarr"
        for _ in range(3):
            arr = zarr.create_array(str(path), shape=data.shape, chunks=(4, 64, 64, 64),
                                    dtype="uint8", zarr_format=2, overwrite=True,
                                    compressors=codec if codec is None else [codec],
                                    chunk_key_encoding={"name": "v2", "separator": "/"})
            t0 = time.perf_counter()
            arr[:] = data
            best_w = min(best_w, time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.asarray(arr[:])
            best_r = min(best_r, time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"| {label} | {raw / best_w / 1e6:.0f} | {raw / best_r / 1e6:.0f} | "
              f"{size / 2**20:.1f} | {raw / size:.1f}× |")


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", type=Path, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--codecs", action="store_true")
    p.add_argument("--perturb", action="store_true",
                   help="add noise to the y and x axes (±40, ±80: the axes disagree)")
    p.add_argument("--hashes", action="store_true",
                   help="byte identity of the fused images (against --before if given)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child and args.child.startswith("hash:"):
        print(json.dumps(hash_child(args.run, args.child.removeprefix("hash:"))))
        return
    if args.child:
        print(json.dumps(child(args.child, args.run, args.out, args.workers)))
        return
    if args.hashes:
        with tempfile.TemporaryDirectory() as tmp:
            raise SystemExit(part_hashes(Path(tmp), args.before, args.quick))
    shape = (32, 128, 128) if args.quick else (128, 384, 384)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(root, shape, args.perturb)
        sides: dict[str, Path] = {"copy": TREE, "copy-rgb": TREE, "copy-all": TREE}
        if args.before:
            sides.update({"before:fuse": args.before, "before:fuse-noconf": args.before})
        sides.update({"fuse": TREE, "fuse-noconf": TREE})
        if args.workers > 1:
            sides["fuse-par"] = TREE
        best = {s: {"wall": float("inf"), "cpu": float("inf")} for s in sides}
        n = 0
        for _ in range(args.repeats):
            for side, tree in sides.items():
                n += 1
                kind = side.split(":")[-1]
                out = (root / f"c{n}.zarr") if kind.startswith("copy") else run / f"f{n}.ome.zarr"
                t = timed(kind, tree, run, out, args.workers)
                for k in t:
                    best[side][k] = min(best[side][k], t[k])
        shape_s = "×".join(map(str, shape))
        print(f"\n## fuse vs a zarr copy of its inputs ({shape_s}, chunk 64, mean of 3 axes"
              f"{', axes perturbed' if args.perturb else ''}, best of {args.repeats}, "
              "interleaved)")
        print("| side | wall s | wall ratio to copy | CPU s | CPU ratio to copy |")
        print("|---|---|---|---|---|")
        base = best["copy"]
        for side, t in best.items():
            label = side.replace("fuse-par", f"fuse, {args.workers} local processes")
            cpu = "–" if side.endswith("-par") else f"{t['cpu']:.2f}"
            cpu_r = "–" if side.endswith("-par") else f"{t['cpu'] / base['cpu']:.2f}×"
            print(f"| {label} | {t['wall']:.2f} | {t['wall'] / base['wall']:.2f}× | {cpu} | "
                  f"{cpu_r} |")
        if args.codecs:
            part_codecs(run, root)


if __name__ == "__main__":
    main()
