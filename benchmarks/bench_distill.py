"""Distillation benchmark (issue 14): student vs teacher speed, cost and quality.

For a trained teacher checkpoint and its training manifest this script

1. writes held-out phantom slides (an unseen seed) and a held-out 128³ phantom volume
   (the target volume; the teacher never saw it);
2. distils the teacher into students with ``hpcstain distill`` (subprocesses, exact
   commands recorded): each student profile on the pairs' CT only and on pairs + the
   target volume's own slices along z, y and x (equal numbers of steps: the pairs-only
   run samples more patches per plane);
3. measures throughput on one CPU thread (``torch.set_num_threads(1)``): the tile engine
   over a 1024² plane with the default tiling (256/192 Hann, planes in tiles ≤ 512 px),
   and the bare generator on a batch of four 256² tiles; FLOP per pixel and parameters
   (``hpcstain.models.flops``) for the teacher, the students and the paper's ResNet-9/64;
4. quality on the held-out slides against the phantom truth (``hpcstain evaluate --patch
   32``: medians of the per-patch PSNR/SSIM, model vs truth), and on the held-out volume: stain
   along z, y, x, fuse (mean), ``hpcstain score`` against the truth (PSNR, SSIM per plane
   family, stripe ratios);
5. projects the generator time of a 2048³ volume × 3 axes on one H100 from FLOPs (the
   method of docs/hpc.md: 3.3·10¹⁰ generator pixels at 25 % of the bf16 peak or 50 % of
   fp32), with a memory-traffic floor for nets whose FLOPs are too few to bound them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distill.py \\
        --teacher demo-out/train/checkpoints/latest.pt \\
        --pairs demo-out/pairs/manifest.csv --work bench-out/distill

Stages already done in ``--work`` are reused (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
HPCSTAIN = [sys.executable, "-m", "hpcstain.cli"]
# 2048³ × 3 axes at the engine's 1.28 generator px per voxel·axis (docs/hpc.md)
GENERATOR_PIXELS_2048 = 2048**3 * 3 * 1.28
PATCH = 32  # evaluate's patch: 128² slides hold few 64² patches with ≥ 50 % sample
H100 = {"bf16": 0.25 * 990e12, "fp32": 0.50 * 67e12, "hbm_bytes_s": 3.35e12}


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (one thread), append it and its output to ``log``; seconds taken."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t


# --------------------------------------------------------------------------- data


def make_data(work: Path, n_heldout: int, volume_size: int) -> dict[str, Path]:
    from hpcstain.phantom import write_pairs, write_volume_file

    heldout = work / f"heldout-pairs-{n_heldout}"
    if not (heldout / "manifest.csv").exists():
        write_pairs(heldout, n_heldout, seed=99, size=(128, 128), orientation="mixed")
    volume = work / "target.zarr"
    if not volume.exists():  # the demo's volume recipe (hpcstain demo): Mg screw, seed 11
        write_volume_file(volume, (volume_size,) * 3, "mg", seed=11)
    return {"heldout": heldout / "manifest.csv", "volume": volume}


# --------------------------------------------------------------------------- distil


def distil(work: Path, name: str, profile: str, teacher: Path, pairs: Path,
           volume: Path | None, overrides: list[str]) -> dict[str, Any]:
    run = work / "runs" / name
    record = run / "bench.json"
    if record.exists():
        return json.loads(record.read_text())
    cmd = [*HPCSTAIN, "distill", "--teacher", str(teacher), "--config", profile, "--out",
           str(run), "--pairs", str(pairs), "--no-progress"]
    if volume is not None:
        cmd += ["--volume", f"{volume}:ct"]
    cmd += overrides
    seconds = sh(cmd, work / "commands.log")
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    out = {"name": name, "profile": profile, "with_volume": volume is not None,
           "command": " ".join(cmd[2:]).replace("hpcstain.cli", "hpcstain"),
           "seconds": round(seconds, 1), "steps": rows[-1]["step"],
           "final_l1": float(np.mean([r["distill_l1"] for r in rows[-20:]])),
           "checkpoint": str(run / "checkpoints" / "latest.pt")}
    record.write_text(json.dumps(out, indent=2))
    return out


def n_train_pairs(pairs: Path, n_test: int) -> int:
    from hpcstain.data.manifest import read_manifest

    return len(read_manifest(pairs)) - n_test


# --------------------------------------------------------------------------- speed


def _net(ckpt: str) -> torch.nn.Module:
    from hpcstain.checkpoint import load_checkpoint
    from hpcstain.inference import generator_net

    return generator_net(load_checkpoint(ckpt), "ct2hist", ckpt, "cpu")


def throughput(ckpts: dict[str, str], reps: int = 5) -> dict[str, dict[str, Any]]:
    """Mpx/s of the tile engine (1024² plane, default tiling) and of the bare generator
    (four 256² tiles), every model timed in turn within each repetition (the machine is
    shared: interleaving exposes all models to the same load), best of ``reps``."""
    from hpcstain.inference import load_generator
    from hpcstain.tiles import auto_batch, plane_tiles, resolve_tiling, stain_image

    tiling = resolve_tiling("default")
    rng = np.random.default_rng(0)
    plane = np.clip(rng.normal(0, 0.5, (1024, 1024)), -1, 1).astype(np.float32)
    setups = {}
    for name, ckpt in ckpts.items():
        stainer = load_generator(ckpt)
        image = np.repeat(plane[None], stainer.in_channels, axis=0)
        tile, step = plane_tiles(plane.shape, tiling.tile, tiling.step,
                                 stainer.conventions.size_multiple, max_tile=tiling.max_tile)
        x = torch.from_numpy(np.repeat(image[None, :, :256, :256], 4, axis=0).copy())
        setups[name] = (stainer, image, tile, step, _net(ckpt), x)
    engine = {n: float("inf") for n in ckpts}
    bare = {n: float("inf") for n in ckpts}
    with torch.inference_mode():
        for _ in range(reps):
            for name, (stainer, image, tile, step, net, x) in setups.items():
                t = time.perf_counter()
                stain_image(image, stainer.fn, tile=tile, step=step, window=tiling.window,
                            batch_size=auto_batch(tile, "cpu", 0))
                engine[name] = min(engine[name], time.perf_counter() - t)
                for _ in range(2):
                    t = time.perf_counter()
                    net(x)
                    bare[name] = min(bare[name], time.perf_counter() - t)
    return {n: {"engine_mpx_s": plane.size / engine[n] / 1e6,
                "generator_mpx_s": 4 * 256 * 256 / bare[n] / 1e6,
                "tile": list(setups[n][2]), "step": list(setups[n][3])} for n in ckpts}


def cost(net: torch.nn.Module, in_channels: int = 3) -> dict[str, float]:
    from hpcstain.models.flops import flops_per_pixel, parameter_count

    return {"flop_per_px": flops_per_pixel(net, in_channels),
            "parameters": parameter_count(net), "bytes_per_px": activation_bytes(net)}


def activation_bytes(net: torch.nn.Module, size: int = 256) -> float:
    """fp32 bytes each conv/norm/activation layer reads + writes per output pixel (a floor
    for the memory traffic of an unfused forward pass)."""
    total = [0.0]

    def hook(_m: Any, inputs: Any, output: Any) -> None:
        total[0] += (inputs[0].numel() + output.numel()) * 4.0

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            net(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return total[0] / (size * size)


def projection(flop_per_px: float, bytes_per_px: float) -> dict[str, float]:
    """Generator minutes for 2048³ × 3 axes on one H100 (FLOP bound; memory floor)."""
    px = GENERATOR_PIXELS_2048
    return {"flop_total": px * flop_per_px,
            "bf16_min": px * flop_per_px / H100["bf16"] / 60,
            "fp32_min": px * flop_per_px / H100["fp32"] / 60,
            "hbm_floor_fp32_min": px * bytes_per_px / H100["hbm_bytes_s"] / 60}


# --------------------------------------------------------------------------- quality


def slides(work: Path, name: str, ckpt: str, heldout: Path) -> dict[str, float]:
    from hpcstain.evaluate import evaluate_manifest

    out = work / "evaluate" / f"{heldout.parent.name}-{name}"
    if not (out / "summary.json").exists():
        evaluate_manifest(heldout, ckpt, out, patch=PATCH, log=lambda _m: None)
    summary = json.loads((out / "summary.json").read_text())
    med = summary["splits"]["all"]["model_vs_truth"]
    return {"psnr": med["psnr"], "ssim": med["ssim"], "patches": med.get("patches")}


def paired(work: Path, heldout: Path, name: str) -> dict[str, float]:
    """Per-patch PSNR/SSIM of ``name`` minus the teacher's on the same patches (mean, s.e.)."""
    import csv

    def rows(model: str) -> dict[tuple[str, str, str], tuple[float, float]]:
        path = work / "evaluate" / f"{heldout.parent.name}-{model}" / "metrics.csv"
        with open(path) as fh:
            return {(r["pair"], r["row"], r["col"]): (float(r["psnr"]), float(r["ssim"]))
                    for r in csv.DictReader(fh)
                    if r["method"] == "model" and r["reference"] == "truth"}

    t, s = rows("teacher"), rows(name)
    keys = sorted(set(t) & set(s))
    d = np.array([[s[k][0] - t[k][0], s[k][1] - t[k][1]] for k in keys])
    se = d.std(axis=0, ddof=1) / np.sqrt(len(keys)) if len(keys) > 1 else np.zeros(2)
    return {"patches": len(keys), "dpsnr": float(d[:, 0].mean()), "dpsnr_se": float(se[0]),
            "dssim": float(d[:, 1].mean()), "dssim_se": float(se[1])}


def volume(work: Path, name: str, ckpt: str, vol: Path) -> dict[str, Any]:
    from hpcstain.executors import run_stain
    from hpcstain.score import score_files
    from hpcstain.volume import fuse_run, init_run, make_plan, open_volume

    run = work / "stain" / name
    score_dir = work / "score" / name
    if not (score_dir / "summary.json").exists():
        source = open_volume(f"{vol}:ct")
        plan = make_plan(source, chunk=64, axes="z,y,x", tile=256, step=192, window="hann",
                         sigma=1.0, max_tile=512, checkpoint=ckpt)
        init_run(run, plan, overwrite=False)
        t = time.perf_counter()
        run_stain(run, executor="local", batch_size=16, device="cpu", progress=False)
        (run / "bench-stain-seconds.txt").write_text(f"{time.perf_counter() - t:.2f}\n")
        fuse_run(run, method="mean", progress=False)
        score_files(run, score_dir, reference=vol)
    s = json.loads((score_dir / "summary.json").read_text())
    return {"psnr": s["psnr"], "ssim": {f: s["planes"][f]["ssim"] for f in s["planes"]},
            "stripe_ratio": s["stripe_ratio"],
            "stain_seconds": float((run / "bench-stain-seconds.txt").read_text())}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--pairs", required=True, type=Path, help="the teacher's training manifest")
    p.add_argument("--work", type=Path, default=Path("bench-out/distill"))
    p.add_argument("--profiles", default="student-fast,student-small",
                   help="comma list of student profiles")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patches", type=int, default=16,
                   help="patches per plane and epoch with the volume (pairs-only: scaled up)")
    p.add_argument("--slices", type=int, default=16, help="volume slices per axis")
    p.add_argument("--n-heldout", type=int, default=16)
    p.add_argument("--volume-size", type=int, default=128)
    p.add_argument("--n-test", type=int, default=1, help="the teacher run's data.n_test")
    p.add_argument("--skip-volume", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, args.n_heldout, args.volume_size)
    teacher = str(args.teacher.resolve())

    # equal steps: pairs-only runs draw (planes with volume / pair planes) × more patches
    n_pairs = n_train_pairs(args.pairs, args.n_test)
    n_with = n_pairs + 3 * args.slices
    common = [f"train.epochs={args.epochs}", f"train.decay_epochs={args.epochs // 2}",
              "data.n_folds=0", f"data.n_test={args.n_test}",
              f"distill.slices_per_axis={args.slices}"]
    runs = []
    for profile in [s.strip() for s in args.profiles.split(",") if s.strip()]:
        short = profile.removeprefix("student-")
        ppp_pairs = round(args.patches * n_with / n_pairs)
        runs.append(distil(work, f"{short}-pairs", profile, args.teacher, args.pairs, None,
                           [*common, f"data.patches_per_pair={ppp_pairs}"]))
        runs.append(distil(work, f"{short}-pairs+volume", profile, args.teacher, args.pairs,
                           data["volume"], [*common, f"data.patches_per_pair={args.patches}"]))

    models = {"teacher": teacher, **{r["name"]: r["checkpoint"] for r in runs}}
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "runs": runs, "models": {}}
    from hpcstain.models.networks import ResnetGenerator

    paper = cost(ResnetGenerator(3, 3, 64, 9))
    results["paper_resnet9_64"] = {**paper, "h100": projection(paper["flop_per_px"],
                                                               paper["bytes_per_px"])}
    speed = throughput(models)
    for name, ckpt in models.items():
        c = cost(_net(ckpt))
        m = {**c, **speed[name], "h100": projection(c["flop_per_px"], c["bytes_per_px"]),
             "slides": slides(work, name, ckpt, data["heldout"])}
        if not args.skip_volume:
            m["volume"] = volume(work, name, ckpt, data["volume"])
        results["models"][name] = m
    for name, m in results["models"].items():
        m["slides_vs_teacher"] = paired(work, data["heldout"], name)
        print(f"{name}: {json.dumps(m)}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    return 0


def report(r: dict[str, Any]) -> str:
    t = r["models"]["teacher"]
    lines = ["| model | params | kFLOP/px | FLOP vs teacher | FLOP vs paper | engine Mpx/s "
             "| × teacher | bare Mpx/s | × teacher | slides PSNR | slides SSIM | H100 bf16 / fp32 "
             "/ HBM floor (min) |", "|" + "---|" * 13]
    paper = r["paper_resnet9_64"]["flop_per_px"]
    for name, m in r["models"].items():
        h = m["h100"]
        lines.append(
            f"| {name} | {m['parameters']:,} | {m['flop_per_px'] / 1e3:.1f} | "
            f"{t['flop_per_px'] / m['flop_per_px']:.1f}× | {paper / m['flop_per_px']:.0f}× | "
            f"{m['engine_mpx_s']:.2f} | {m['engine_mpx_s'] / t['engine_mpx_s']:.1f}× | "
            f"{m['generator_mpx_s']:.2f} | {m['generator_mpx_s'] / t['generator_mpx_s']:.1f}× | "
            f"{m['slides']['psnr']:.2f} | {m['slides']['ssim']:.3f} | "
            f"{h['bf16_min']:.2f} / {h['fp32_min']:.2f} / {h['hbm_floor_fp32_min']:.2f} |")
    lines += ["", "| student | held-out patches | ΔPSNR vs teacher (dB, mean ± s.e.) | "
              "ΔSSIM vs teacher |", "|---|---|---|---|"]
    for name, m in r["models"].items():
        d = m.get("slides_vs_teacher")
        if name != "teacher" and d:
            lines.append(f"| {name} | {d['patches']} | {d['dpsnr']:+.2f} ± {d['dpsnr_se']:.2f} "
                         f"| {d['dssim']:+.3f} ± {d['dssim_se']:.3f} |")
    if any("volume" in m for m in r["models"].values()):
        lines += ["", "| model | volume PSNR | SSIM xy | SSIM xz | SSIM yz | stripe z | "
                  "stripe y | stripe x | stain s (3 axes) |", "|" + "---|" * 9]
        for name, m in r["models"].items():
            v = m.get("volume")
            if v is None:
                continue
            lines.append(f"| {name} | {v['psnr']:.2f} | " + " | ".join(
                f"{v['ssim'][f]:.3f}" for f in ("xy", "xz", "yz")) + " | " + " | ".join(
                f"{v['stripe_ratio'][a]:.2f}" for a in "zyx") + f" | {v['stain_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
