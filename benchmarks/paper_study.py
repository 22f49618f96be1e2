"""The paper's comparison on the phantom (Table 1 style) and the 3D stripe study.

    .venv/bin/python benchmarks/paper_study.py --out study/            # CPU, tiny models
    .venv/bin/python benchmarks/paper_study.py --out study/ --smoke    # minutes (the test)

1. Phantom pairs (Mg:Ti:PEEK ~ 7:1:2), a held-out test set; the four variants (modified
   CycleGAN, Pix2Pix, standard CycleGAN, standard CycleGAN + inverted CT) trained with the
   same budget; `evaluate` on train/test; a Table-1-style table plus the raw-CT row.
2. A held-out phantom volume stained with the best variant along z, y and x; single-axis
   (the paper's slice-wise volume), 2-axis and 3-axis fusions with each method, scored
   with `hpcstain.metrics.volume` against the §2.5-normalised truth inside the sample
   mask (PSNR, SSIM per plane family, stripe ratio per axis; docs/evaluation.md).
Writes OUT/results.json, OUT/table.md and OUT/orthoviews-*.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("modcyclegan", "pix2pix", "cyclegan", "cyclegan_invct")
NAMES = {"modcyclegan": "Mod. CycleGAN", "pix2pix": "Pix2Pix",
         "cyclegan": "Std. CycleGAN", "cyclegan_invct": "Std. CycleGAN + inv. CT"}
FUSIONS = (("z", "single"), ("z,y", "mean"), ("z,y", "median"), ("z,y", "consistency"),
           ("z,y,x", "mean"), ("z,y,x", "median"), ("z,y,x", "consistency"))


def stain_axes(run_dir: Path, plan: Any) -> tuple[dict[str, np.ndarray], float]:
    """Stain ``plan`` along its axes in-process: the per-axis RGB volumes, seconds per axis."""
    import zarr

    from hpcstain.executors import run_stain
    from hpcstain.volume import init_run
    from hpcstain.volume.rundir import axis_store

    run = init_run(run_dir, plan, overwrite=True)
    t0 = time.perf_counter()
    run_stain(run, executor="local", progress=False)
    per_axis_s = (time.perf_counter() - t0) / len(plan.axes)
    return ({a: zarr.open_array(str(axis_store(run, a)), mode="r")[:] for a in plan.axes},
            per_axis_s)

def train_and_evaluate(variant: str, manifest: Path, out: Path, epochs: int, patch: int
                       ) -> dict[str, Any]:
    from hpcstain.config import load_config
    from hpcstain.evaluate import evaluate_manifest
    from hpcstain.train.trainer import train

    cfg = load_config(f"{variant}-tiny", [f"data.manifest={manifest}", "data.n_folds=0",
                                          "data.n_test=2", f"train.epochs={epochs}"])
    t0 = time.perf_counter()
    result = train(cfg, out / variant, progress=False)
    seconds = time.perf_counter() - t0
    evaluate_manifest(manifest, result.checkpoint, out / f"eval-{variant}",
                      split=out / variant, patch=patch, overwrite=True, log=lambda _m: None)
    summary = json.loads((out / f"eval-{variant}" / "summary.json").read_text())
    return {"variant": variant, "steps": result.step, "train_seconds": round(seconds, 1),
            "checkpoint": str(result.checkpoint), "splits": summary["splits"]}


def volume_study(checkpoint: Path, out: Path, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Stain once per axis, then score every fusion of axis subsets against the truth."""
    import zarr

    from hpcstain.metrics.volume import prepare_reference, score_volume
    from hpcstain.phantom import write_volume_file
    from hpcstain.volume import make_plan, open_volume
    from hpcstain.volume.fuse import fuse_block

    vol = out / "volume.zarr"
    if not vol.exists():
        write_volume_file(vol, shape, "mg", seed=101)
    group = zarr.open_group(str(vol), mode="r")
    truth = group["stain"][:]
    # the truth in the model's colour space (§2.5 with label ROIs), mask from the labels
    reference = prepare_reference(truth.shape[:3], truth, labels=group["labels"][:],
                                  ct=group["ct"][:])
    from hpcstain.checkpoint import load_checkpoint

    unet = load_checkpoint(checkpoint)["architecture"]["generator"] == "unet256"
    tile, step = (256, 128) if unet else (64, 32)  # the U-Net-256 needs 256² tiles
    plan = make_plan(open_volume(f"{vol}:ct"), chunk=64, axes="z,y,x", tile=tile, step=step,
                     window="hann", sigma=1.0,
                     checkpoint=str(checkpoint))
    preds, per_axis_s = stain_axes(out / "stain", plan)
    rows = []
    for axes_text, method in FUSIONS:
        axes = tuple(axes_text.split(","))
        t0 = time.perf_counter()
        rgb = fuse_block(np.stack([preds[a] for a in axes]), tuple("zyx".index(a) for a in axes),
                         "mean" if method == "single" else method)
        fuse_s = time.perf_counter() - t0
        score = score_volume(rgb, reference).summary
        planes, ratio = score["planes"], score["stripe_ratio"]
        rows.append({"axes": axes_text, "method": method, "psnr": _round(score["psnr"], 2),
                     **{f"ssim_{f}": _round(planes[f]["ssim"], 3) for f in ("xy", "xz", "yz")},
                     **{f"stripe_{a}": _round(ratio[a], 3) for a in "zyx"},
                     "seconds": round(per_axis_s * len(axes) + fuse_s, 1)})
        _save_orthoview(rgb, out / f"orthoview-{axes_text.replace(',', '')}-{method}.png")
    _save_orthoview(reference.rgb, out / "orthoview-truth.png")
    return {"shape": list(shape), "mask_fraction": round(reference.info["mask_fraction"], 3),
            "truth_anisotropy": {a: _round(v, 3) for a, v in
                                 score_volume(reference.rgb, reference)
                                 .summary["anisotropy_reference"].items()},
            "rows": rows}


def _round(value: float | str | None, digits: int) -> float | str | None:
    """Rounded number; ``"inf"`` (identical volumes) and None pass through."""
    return round(value, digits) if isinstance(value, float) else value


def _save_orthoview(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    from hpcstain.view import orthoviews

    Image.fromarray(orthoviews(rgb)).save(path)


def table(results: dict[str, Any]) -> str:
    """Table-1-style markdown (test and train medians) + the 3D study table."""
    def cell(split: dict[str, Any] | None, key: str, metric: str) -> str:
        value = (split or {}).get(key, {}).get(metric)
        return "–" if value is None else f"{value:.2f}" if metric == "ssim" else f"{value:.1f}"

    lines = ["| Model | test SSIM ↑ | test PSNR ↑ | train SSIM ↑ | train PSNR ↑ | steps |",
             "|---|---|---|---|---|---|"]
    raw = None
    for run in results["variants"]:
        test, tr = run["splits"].get("test"), run["splits"].get("train")
        raw = raw or (test, tr)
        lines.append(f"| {NAMES[run['variant']]} | {cell(test, 'model_vs_histology', 'ssim')} | "
                     f"{cell(test, 'model_vs_histology', 'psnr')} | "
                     f"{cell(tr, 'model_vs_histology', 'ssim')} | "
                     f"{cell(tr, 'model_vs_histology', 'psnr')} | {run['steps']} |")
    if raw:
        lines.append(f"| Raw CT (baseline) | {cell(raw[0], 'raw_ct_vs_histology', 'ssim')} | "
                     f"{cell(raw[0], 'raw_ct_vs_histology', 'psnr')} | "
                     f"{cell(raw[1], 'raw_ct_vs_histology', 'ssim')} | "
                     f"{cell(raw[1], 'raw_ct_vs_histology', 'psnr')} | – |")
    vol = results["volume"]
    lines += ["", f"3D study (volume {vol['shape']}, scored against the §2.5-normalised "
              f"truth inside the sample mask ({vol['mask_fraction']:.0%} of voxels); truth "
              f"anisotropy z/y/x {'/'.join(str(v) for v in vol['truth_anisotropy'].values())}"
              "):", "",
              "| axes | fusion | PSNR vs truth | SSIM XY | SSIM XZ | SSIM YZ | stripe ratio z "
              "| stripe ratio y | stripe ratio x | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in vol["rows"]:
        lines.append(f"| {r['axes']} | {r['method']} | {r['psnr']} | {r['ssim_xy']} | "
                     f"{r['ssim_xz']} | {r['ssim_yz']} | {r['stripe_z']} | {r['stripe_y']} | "
                     f"{r['stripe_x']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def run_study(out: Path, smoke: bool = False) -> dict[str, Any]:
    from hpcstain.phantom import write_pairs

    out.mkdir(parents=True, exist_ok=True)
    n_pairs, size, epochs, patch = (5, 256, 1, 64) if smoke else (20, 256, 20, 64)
    shape = (24, 96, 96) if smoke else (48, 256, 256)
    variants = VARIANTS[:2] if smoke else VARIANTS
    manifest = out / "pairs" / "manifest.csv"
    if not manifest.exists():
        write_pairs(out / "pairs", n_pairs, seed=2024, size=(size, size))
    runs = [train_and_evaluate(v, manifest, out, epochs, patch) for v in variants]
    best = max(runs, key=lambda r: (r["splits"].get("test", {}) or {})
               .get("model_vs_histology", {}).get("ssim") or -1.0)
    results = {"smoke": smoke, "variants": runs, "best": best["variant"],
               "volume": volume_study(Path(best["checkpoint"]), out, shape)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table(results))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="study", type=Path)
    p.add_argument("--smoke", action="store_true", help="two variants, one epoch, tiny volume")
    args = p.parse_args()
    results = run_study(args.out, smoke=args.smoke)
    print(table(results), end="")


if __name__ == "__main__":
    main()
