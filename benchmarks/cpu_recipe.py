"""The CPU recipe (issue #13): a profile that learns the phantom in ≤ 30 min on 2 cores.

    .venv/bin/python benchmarks/cpu_recipe.py --out /tmp/recipe-run             # the recipe
    .venv/bin/python benchmarks/cpu_recipe.py --out /tmp/r --profiles modcyclegan-cpu,pix2pix-cpu
    .venv/bin/python benchmarks/cpu_recipe.py --out /tmp/r --rate               # steps/s only
    .venv/bin/python benchmarks/cpu_recipe.py --out /tmp/r --quick              # smoke run

1. Phantom pairs: ``--train-pairs`` (16) slides of ``--size`` (384²) from ``--train-seed``
   (101) for training, ``--held-pairs`` (6) from ``--held-seed`` (202), a different seed,
   so the held-out slides are unseen samples (not just unseen slides of one sample set).
2. Each profile is trained on every training pair (``data.n_test=0``, no folds) for its
   ``train.max_steps`` (or ``--steps``; the epoch count, and with it the linear LR decay
   of ``train.decay_epochs``, is rescaled to end with the last step).
3. ``evaluate_manifest`` on the held-out pairs (paper tiling 256/64 mean, ``--patch`` 128²
   patches with ≥ 50 % mask coverage, medians), plus the raw CT vs the normalised truth
   (masked as the raw-CT baseline of ``hpcstain evaluate``).

Prints one Markdown table row per profile and writes OUT/results.json. ``--rate`` instead
measures the training speed of each profile on 1 and 2 torch threads (a few steps each),
from which the step budget of a 30-minute run follows: steps = 1800 s × it/s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

TARGET_SSIM, TARGET_PSNR, TARGET_MARGIN = 0.55, 18.0, 0.30


def make_pairs(out: Path, n: int, seed: int, size: int) -> Path:
    from hpcstain.phantom import write_pairs

    folder = out / f"pairs-s{seed}-n{n}-{size}"
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        print(f"[recipe] phantom: {n} pairs of {size}² from seed {seed} → {folder}", flush=True)
        write_pairs(folder, n, seed=seed, size=(size, size))
    return manifest


def profile_overrides(profile: str, manifest: Path, n_pairs: int, steps: int | None,
                      extra: list[str]) -> list[str]:
    """Train on every pair; with ``steps``, rescale epochs (and decay) to end at that step."""
    from hpcstain.config import load_config

    base = [f"data.manifest={manifest}", "data.n_folds=0", "data.n_test=0",
            "data.num_workers=0", "train.checkpoint_every=0", *extra]
    cfg = load_config(profile, base)
    if steps is None:
        steps = cfg.train.max_steps
    if not steps:
        return base
    per_epoch = max(n_pairs * cfg.data.patches_per_pair // cfg.data.batch_size, 1)
    epochs = max(math.ceil(steps / per_epoch), 1)
    ratio = cfg.train.decay_epochs / max(cfg.train.epochs, 1)
    decay = min(round(ratio * epochs), epochs)
    return [*base, f"train.max_steps={steps}", f"train.epochs={epochs}",
            f"train.decay_epochs={decay}"]


def train_profile(profile: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from hpcstain.config import load_config
    from hpcstain.train.trainer import train

    cfg = load_config(profile, overrides)
    print(f"[recipe] train {profile}: ngf {cfg.model.ngf}, {cfg.model.n_blocks} blocks, "
          f"patch {cfg.data.patch_size}, {cfg.train.max_steps} steps "
          f"({cfg.train.epochs} epochs, decay over {cfg.train.decay_epochs}) → {run_dir}",
          flush=True)
    t = time.perf_counter()
    result = train(cfg, run_dir, progress=False)
    return {"status": result.status, "steps": result.step, "epochs": result.epoch,
            "train_s": round(time.perf_counter() - t, 1), "last_losses": result.last_losses,
            "ngf": cfg.model.ngf, "n_blocks": cfg.model.n_blocks,
            "patch_size": cfg.data.patch_size, "lambda_px": cfg.loss.lambda_px}


def raw_ct_vs_truth(manifest: Path, checkpoint: Path, patch: int) -> dict[str, Any]:
    """Raw CT (normalised grey) vs normalised truth, masked as ``hpcstain evaluate`` does."""
    from hpcstain.data.manifest import read_manifest
    from hpcstain.evaluate import load_pair
    from hpcstain.metrics.patches import apply_mask, evaluate_patches, medians
    from hpcstain.predict import load_stainer, mask_outside, mean_colour

    stainer = load_stainer(checkpoint, "cpu")
    scores = []
    for pair in read_manifest(manifest):
        data = load_pair(pair, stainer)
        if data.truth is None:
            continue
        fill = mean_colour(data.histology, data.rois.background, data.mask)
        truth = apply_mask(data.truth, data.mask, fill)
        raw = mask_outside(data.raw_ct, data.mask, data.rois.background)
        scores += evaluate_patches(raw, truth, data.mask, patch=patch)
    return medians(scores)


def evaluate_profile(manifest: Path, run_dir: Path, patch: int) -> dict[str, Any]:
    from hpcstain.evaluate import evaluate_manifest

    checkpoint = run_dir / "checkpoints" / "latest.pt"
    t = time.perf_counter()
    report = evaluate_manifest(manifest, checkpoint, run_dir / "eval-held", patch=patch,
                               overwrite=True, log=lambda _: None)
    split = report.summary["splits"]["all"]
    out = {k: split[k] for k in ("model_vs_truth", "model_vs_histology",
                                 "raw_ct_vs_histology", "histology_vs_truth") if k in split}
    out["raw_ct_vs_truth"] = raw_ct_vs_truth(manifest, checkpoint, patch)
    out["eval_s"] = round(time.perf_counter() - t, 1)
    return out


def measure_rate(profile: str, manifest: Path, out: Path, threads: int, steps: int,
                 extra: list[str]) -> float:
    """Median it/s (step + data wait) over ``steps`` training steps on ``threads`` threads."""
    from hpcstain.config import load_config
    from hpcstain.train.logs import read_losses
    from hpcstain.train.trainer import train

    torch.set_num_threads(threads)
    run_dir = out / f"rate-{profile}-t{threads}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = load_config(profile, [f"data.manifest={manifest}", "data.n_folds=0", "data.n_test=0",
                                "data.num_workers=0", "train.checkpoint_every=0",
                                f"train.max_steps={steps + 2}", *extra])
    train(cfg, run_dir, progress=False)
    rows = read_losses(run_dir)[2:]  # the first steps pay for allocation
    return 1.0 / statistics.median(r["step_s"] + r["data_wait_s"] for r in rows)


def fmt(m: dict[str, Any] | None) -> str:
    if not m or m.get("ssim") is None:
        return "–"
    return f"{m['ssim']:.2f} / {m['psnr']:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder (pairs, runs, results)")
    p.add_argument("--profiles", default="modcyclegan-cpu",
                   help="comma-separated profiles (default modcyclegan-cpu)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: the profile's train.max_steps)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--train-pairs", type=int, default=16)
    p.add_argument("--held-pairs", type=int, default=6)
    p.add_argument("--size", type=int, default=384, help="slide edge in px (default 384)")
    p.add_argument("--train-seed", type=int, default=101)
    p.add_argument("--held-seed", type=int, default=202)
    p.add_argument("--patch", type=int, default=128, help="evaluation patch edge (128)")
    p.add_argument("--rate", action="store_true",
                   help="only measure it/s on 1 and 2 threads and the 30-min step budget")
    p.add_argument("--rate-steps", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="smoke run (seconds): tiny everything")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for every profile")
    args = p.parse_args()
    if args.train_seed == args.held_seed:
        p.error("--held-seed must differ from --train-seed (unseen samples)")
    extra = list(args.overrides)
    profiles = [s.strip() for s in args.profiles.split(",") if s.strip()]
    if args.quick:  # U-Net-256 (pix2pix) needs slides of at least 256²
        size = 256 if any("pix2pix" in prof for prof in profiles) else 128
        args.train_pairs, args.held_pairs, args.size, args.patch = 4, 2, size, 64
        args.steps, args.rate_steps = 6, 2
        extra = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "data.patches_per_pair=4",
                 *extra]
    args.out.mkdir(parents=True, exist_ok=True)
    train_manifest = make_pairs(args.out, args.train_pairs, args.train_seed, args.size)

    if args.rate:
        print("| profile | threads | it/s | steps in 30 min |")
        print("|---|---|---|---|")
        for prof in profiles:
            quick_patch = (["data.patch_size=32"] if args.quick and "pix2pix" not in prof
                           else [])
            for threads in (1, 2):
                rate = measure_rate(prof, train_manifest, args.out, threads, args.rate_steps,
                                    [*extra, *quick_patch])
                print(f"| {prof} | {threads} | {rate:.3f} | {int(1800 * rate)} |", flush=True)
        return

    torch.set_num_threads(args.threads)
    held_manifest = make_pairs(args.out, args.held_pairs, args.held_seed, args.size)
    results: list[dict[str, Any]] = []
    for prof in profiles:
        quick_patch = ["data.patch_size=32"] if args.quick and "pix2pix" not in prof else []
        overrides = profile_overrides(prof, train_manifest, args.train_pairs, args.steps,
                                      [*extra, *quick_patch])
        run_dir = args.out / "runs" / prof
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        row = {"profile": prof, "threads": args.threads,
               **train_profile(prof, overrides, run_dir)}
        row.update(evaluate_profile(held_manifest, run_dir, args.patch))
        results.append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    print(f"\nHeld-out: {args.held_pairs} pairs of {args.size}² from seed {args.held_seed} "
          f"(training: {args.train_pairs} from seed {args.train_seed}); medians over "
          f"{args.patch}² patches, SSIM / PSNR dB.\n")
    print("| profile | ngf | blocks | patch | steps | threads | train s | model vs truth | "
          "model vs histology | raw CT vs histology | raw CT vs truth | target met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mt, rt = r["model_vs_truth"], r["raw_ct_vs_truth"]
        met = (mt["ssim"] >= TARGET_SSIM and mt["psnr"] >= TARGET_PSNR
               and mt["ssim"] - rt["ssim"] >= TARGET_MARGIN)
        print(f"| {r['profile']} | {r['ngf']} | {r['n_blocks']} | {r['patch_size']} | "
              f"{r['steps']} | {r['threads']} | {r['train_s']:.0f} | {fmt(mt)} | "
              f"{fmt(r['model_vs_histology'])} | {fmt(r['raw_ct_vs_histology'])} | "
              f"{fmt(rt)} | {'yes' if met else 'no'} |")
    print(f"\nTargets (model vs truth): SSIM ≥ {TARGET_SSIM}, PSNR ≥ {TARGET_PSNR} dB, "
          f"SSIM ≥ raw CT + {TARGET_MARGIN}. Results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
