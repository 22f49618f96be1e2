"""Learned alignment (issue #15, item 1): the same recipe with and without ``model.align``
on phantom pairs of zero and strong misalignment, scored on held-out slides of an unseen seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py --out /tmp/align
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py --out /tmp/align --only 3:on
    .venv/bin/python benchmarks/bench_align.py --out /tmp/align --table      # collect only
    .venv/bin/python benchmarks/bench_align.py --out /tmp/align --quick      # smoke run

1. Phantom pairs (``hpcstain phantom pairs --misalignment S``) for every strength S of
   ``--strengths`` (default 0 and 3): ``--train-pairs`` (16) slides of ``--size`` (128²)
   from ``--train-seed`` (101) and ``--held-pairs`` (6) from ``--held-seed`` (202). The
   random draws do not depend on S, so the sets differ only in the histology's warp.
2. For every S, the reduced CPU recipe (``modcyclegan-cpu`` at ngf 16, 4 blocks, 96²
   patches, ``--steps`` steps with the profile's LR decay rescaled) is trained with
   ``model.align=false`` ("off"), ``model.align=true`` ("on") and, "reg", with
   ``model.align=false`` on the training pairs co-registered first by ``hpcstain
   register`` (OUT/reg-…, made once); same seed, same patches.
3. ``evaluate_manifest`` on the held-out pairs of the same S (the paper's tiling, 64²
   patches with ≥ 50 % mask coverage, medians); the model is loaded by the one inference
   path (``load_generator``: generator only, the registration net is ignored).

Each run writes OUT/runs/s<S>-<off|on|reg><tag>/result.json; the table (Markdown) is
printed from whatever results exist, with the targets for on and reg against off of the
same tag: at every S > 0, ≥ off + 0.05 SSIM (model vs truth); at S = 0, |Δ| ≤ 0.01.
``benchmarks/align_field.py`` compares a run's learned field with the phantom's true warp.
Results: docs/results.md, "Learned alignment".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_recipe import evaluate_profile, profile_overrides, train_profile

PROFILE = "modcyclegan-cpu"
RECIPE = ["data.patch_size=96", "model.ngf=16", "model.ndf=16", "model.n_blocks=4"]
TARGET_GAIN, TARGET_TIE = 0.05, 0.01


def make_pairs(out: Path, n: int, seed: int, size: int, strength: float) -> Path:
    from hpcstain.phantom import write_pairs

    folder = out / f"pairs-s{seed}-n{n}-{size}-m{strength:g}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        print(f"[align] phantom: {n} pairs of {size}² from seed {seed}, misalignment "
              f"{strength:g} → {folder}", flush=True)
        write_pairs(folder, n, seed=seed, size=(size, size), misalignment=strength)
    return manifest


def registered_pairs(manifest: Path) -> Path:
    """The pairs of ``manifest`` co-registered by ``hpcstain register`` (made once)."""
    from hpcstain.data.coregister import register_pairs

    folder = manifest.parent.with_name("reg-" + manifest.parent.name.removeprefix("pairs-"))
    if not (folder / "manifest.csv").exists():
        print(f"[align] register {manifest} → {folder}", flush=True)
        register_pairs(manifest, folder, progress=lambda m: print(f"[align]   {m}", flush=True))
    return folder / "manifest.csv"


def run_one(args: argparse.Namespace, strength: float, mode: str, extra: list[str]) -> None:
    """``mode``: "off" (plain), "on" (``model.align``) or "reg" (pairs co-registered first)."""
    align = mode == "on"
    train_manifest = make_pairs(args.out, args.train_pairs, args.train_seed, args.size, strength)
    held_manifest = make_pairs(args.out, args.held_pairs, args.held_seed, args.size, strength)
    if mode == "reg":
        train_manifest = registered_pairs(train_manifest)
    name = f"s{strength:g}-{mode}{args.tag}"
    run_dir = args.out / "runs" / name
    t = time.perf_counter()
    row: dict[str, Any] = {"run": name, "strength": strength, "align": align,
                           "registered": mode == "reg",
                           "profile": args.profile, "threads": torch.get_num_threads()}
    if args.eval_only:
        row.update(trained_info(run_dir))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        overrides = profile_overrides(args.profile, train_manifest, args.train_pairs,
                                      args.steps,
                                      [*RECIPE, *extra, f"model.align={str(align).lower()}"])
        row.update(train_profile(args.profile, overrides, run_dir))
    row.update(evaluate_profile(held_manifest, run_dir, args.patch))
    row["total_s"] = round(time.perf_counter() - t, 1)
    (run_dir / "result.json").write_text(json.dumps(row, indent=2, default=str))
    print(f"[align] {name}: model vs truth {fmt(row['model_vs_truth'])} "
          f"({row['train_s']:.0f} s training)", flush=True)


def trained_info(run_dir: Path) -> dict[str, Any]:
    """What ``train_profile`` reports, read back from a finished run (``--eval-only``)."""
    from hpcstain.checkpoint import load_checkpoint
    from hpcstain.train.logs import read_losses

    ckpt = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    rows = read_losses(run_dir)
    model = ckpt["config"]["model"]
    return {"status": "max_steps", "steps": ckpt["step"], "epochs": ckpt["epoch"],
            "train_s": round(sum(r["step_s"] + r["data_wait_s"] for r in rows), 1),
            "last_losses": rows[-1] if rows else {}, "ngf": model["ngf"],
            "n_blocks": model["n_blocks"],
            "patch_size": ckpt["config"]["data"]["patch_size"],
            "lambda_px": ckpt["config"]["loss"]["lambda_px"]}


def fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("ssim") is None:
        return "–"
    return f"{m['ssim']:.3f} / {m['psnr']:.2f}"


def mode_of(r: dict[str, Any]) -> str:
    return "reg" if r.get("registered") else ("on" if r["align"] else "off")


def table(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    if not rows:
        print(f"[align] no results under {out / 'runs'}")
        return
    rows.sort(key=lambda r: (r["strength"], mode_of(r), r["run"]))
    print("| misalignment | alignment | steps | train s | model vs truth (SSIM / PSNR) | "
          "model vs histology | histology vs truth | raw CT vs truth |")
    print("|---|---|---|---|---|---|---|---|")
    label = {"off": "off", "on": "model.align", "reg": "pairs registered"}
    for r in rows:
        tag = r["run"].split("-", 2)[2] if r["run"].count("-") >= 2 else ""
        mode = label[mode_of(r)] + (f" ({tag})" if tag else "")
        print(f"| {r['strength']:g} | {mode} | {r['steps']} | "
              f"{r['train_s']:.0f} | {fmt(r['model_vs_truth'])} | "
              f"{fmt(r.get('model_vs_histology'))} | {fmt(r.get('histology_vs_truth'))} | "
              f"{fmt(r.get('raw_ct_vs_truth'))} |")
    by: dict[tuple[str, float, str], float] = {}   # (tag, S, mode) → SSIM vs truth
    for r in rows:
        tag = r["run"].split("-", 2)[2] if r["run"].count("-") >= 2 else ""
        by[(tag, r["strength"], mode_of(r))] = r["model_vs_truth"]["ssim"]
    print()
    for (tag, s, mode), ssim in sorted(by.items()):
        if mode == "off" or (tag, s, "off") not in by:
            continue
        gain = ssim - by[(tag, s, "off")]
        if s == 0:
            ok, goal = abs(gain) <= TARGET_TIE, f"|Δ| ≤ {TARGET_TIE}"
        else:
            ok, goal = gain >= TARGET_GAIN, f"≥ +{TARGET_GAIN}"
        print(f"misalignment {s:g}{f' ({tag})' if tag else ''}: {label[mode]} − off = "
              f"{gain:+.3f} SSIM (target {goal}: {'met' if ok else 'not met'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder (pairs, runs)")
    p.add_argument("--profile", default=PROFILE)
    p.add_argument("--strengths", default="0,3", help="misalignment strengths (default 0,3)")
    p.add_argument("--only", default=None, metavar="S:on|off",
                   help="train and score one run (e.g. 3:on), for running runs side by side")
    p.add_argument("--table", action="store_true", help="only print the table of results")
    p.add_argument("--tag", default="", help="suffix of the run names (variants of a recipe)")
    p.add_argument("--eval-only", action="store_true",
                   help="score the runs already trained under OUT/runs (no training)")
    p.add_argument("--steps", type=int, default=360, help="optimizer steps per run (360)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--train-pairs", type=int, default=16)
    p.add_argument("--held-pairs", type=int, default=6)
    p.add_argument("--size", type=int, default=128, help="slide edge in px (default 128)")
    p.add_argument("--train-seed", type=int, default=101)
    p.add_argument("--held-seed", type=int, default=202)
    p.add_argument("--patch", type=int, default=64, help="evaluation patch edge (64)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny everything")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for every run")
    args = p.parse_args()
    if args.train_seed == args.held_seed:
        p.error("--held-seed must differ from --train-seed (unseen samples)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        table(args.out)
        return
    extra = list(args.overrides)
    if args.quick:
        args.train_pairs, args.held_pairs, args.size, args.patch, args.steps = 4, 2, 64, 32, 4
        extra = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "data.patches_per_pair=4",
                 "data.patch_size=32", *extra]
    torch.set_num_threads(args.threads)
    if args.only:
        s, _, mode = args.only.partition(":")
        if mode not in ("on", "off", "reg"):
            p.error("--only needs S:on, S:off or S:reg")
        run_one(args, float(s), mode, extra)
    else:
        for s in (float(v) for v in args.strengths.split(",") if v.strip()):
            for mode in ("off", "on", "reg"):
                run_one(args, s, mode, extra)
    table(args.out)


if __name__ == "__main__":
    main()
