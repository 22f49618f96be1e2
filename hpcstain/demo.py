"""`hpcstain demo`: the whole pipeline on the embedded phantom, in minutes on a laptop CPU.

phantom pairs → train a tiny modified CycleGAN → evaluate held-out slides against the real
(synthetic) histology and the exact truth → phantom volume → stain along z, y, x →
fuse (and the paper's slice-wise z volume) → stripe index and orthoview PNGs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DemoSizes:
    n_pairs: int
    slide: int
    volume: tuple[int, int, int]
    epochs: int
    patches_per_pair: int
    chunk: int
    tile: int
    step: int
    patch: int
    model: tuple[str, ...]


# The CPU recipe (docs/results.md): a ResNet of 16 features and 4 blocks on 96² patches,
# 720 steps with linear LR decay over the second half, sections along z, y and x plus the
# 8 dihedral transforms, at the pixel scale of the volume (the phantom sample scales with
# the array: slides and volume must share it); a near-cubic volume, as real scans are.
FULL = DemoSizes(n_pairs=16, slide=128, volume=(128, 128, 128), epochs=12, patches_per_pair=15,
                 chunk=64, tile=256, step=192, patch=64,
                 model=("model.ngf=16", "model.ndf=16", "model.n_blocks=4",
                        "data.patch_size=96", "train.decay_epochs=6", "data.rot90=true"))
QUICK = DemoSizes(n_pairs=4, slide=96, volume=(24, 48, 48), epochs=1, patches_per_pair=4,
                  chunk=24, tile=32, step=16, patch=32,
                  model=("data.patch_size=32", "model.ngf=4", "model.ndf=4",
                         "model.n_blocks=1"))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def orthoviews(rgb: np.ndarray) -> np.ndarray:
    """XY, XZ and YZ centre planes of a (Z, Y, X, 3) volume side by side (uint8)."""
    z, y, x = (s // 2 for s in rgb.shape[:3])
    planes = [rgb[z], rgb[:, y], rgb[:, :, x]]
    height = max(p.shape[0] for p in planes)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0)), constant_values=255)
              for p in planes]
    return np.concatenate(padded, axis=1)


def _read_fused(image: Path) -> np.ndarray:
    import zarr

    level0 = zarr.open_group(str(image), mode="r")["0"][:]  # (4, Z, Y, X) RGBA
    return np.moveaxis(level0[:3], 0, -1)


def run_demo(out: Path, quick: bool = False, physics: str = "render") -> dict[str, Any]:
    """Run every stage into ``out`` and return (and save) a summary of what it measured.

    ``physics`` picks the phantom's CT: ``render`` (its CT renderer) or ``tomo`` (the
    physical CT chain of :mod:`hpcstain.phantom.tomo` at its default knobs: polychromatic
    projection, Poisson counts, rings, filtered back-projection), for slides and volume.
    """
    from PIL import Image

    from hpcstain.config import load_config
    from hpcstain.executors import run_stain
    from hpcstain.metrics.stripes import stripe_index
    from hpcstain.phantom import write_pairs, write_volume_file
    from hpcstain.phantom.tomo import TomoParams
    from hpcstain.train.trainer import train
    from hpcstain.volume import fuse_run, init_run, make_plan, open_volume

    sizes = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if physics not in ("render", "tomo"):
        from hpcstain.errors import UsageError

        raise UsageError(f"--physics {physics!r}: choose render or tomo")
    tomo = TomoParams() if physics == "tomo" else None
    summary: dict[str, Any] = {"sizes": sizes.__dict__, "physics": physics}
    t0 = time.perf_counter()

    pairs_dir = out / "pairs"
    if not (pairs_dir / "manifest.csv").exists():
        _say(f"phantom: {sizes.n_pairs} paired slides of {sizes.slide}² px")
        write_pairs(pairs_dir, sizes.n_pairs, seed=7, size=(sizes.slide, sizes.slide),
                    orientation="z" if quick else "mixed", tomo=tomo)
    manifest = pairs_dir / "manifest.csv"

    run_dir = out / "train"
    cfg = load_config("modcyclegan-tiny", [
        f"data.manifest={manifest}", "data.n_folds=0", "data.n_test=1",
        f"data.patches_per_pair={sizes.patches_per_pair}",
        f"train.epochs={sizes.epochs}", "train.log_every=5", *sizes.model])
    _say(f"train: modified CycleGAN ({', '.join(sizes.model)}), {sizes.epochs} epochs → "
         f"{run_dir}")
    t = time.perf_counter()
    result = train(cfg, run_dir, progress=not quick)
    summary["train"] = {"status": result.status, "steps": result.step,
                        "seconds": round(time.perf_counter() - t, 1),
                        "last_losses": result.last_losses}
    checkpoint = run_dir / "checkpoints" / "latest.pt"

    summary["evaluate"] = _evaluate(manifest, checkpoint, run_dir, out / "evaluate",
                                    patch=sizes.patch)

    vol_path = out / "phantom-volume.zarr"
    if not vol_path.exists():
        _say(f"phantom volume {sizes.volume} (Mg screw, {physics} CT) → {vol_path}")
        write_volume_file(vol_path, sizes.volume, "mg", seed=11, tomo=tomo)
    stain_dir = out / "stain"
    source = open_volume(f"{vol_path}:ct")
    # Same pixel scale as the training slides; Hann blending (the paper's "mean" leaves
    # faint tile seams with a model this small); planes up to 512² are single tiles.
    plan = make_plan(source, chunk=sizes.chunk, axes="z,y,x", tile=sizes.tile, step=sizes.step,
                     window="hann", sigma=1.0, max_tile=0 if quick else 512,
                     checkpoint=str(checkpoint))
    init_run(stain_dir, plan, overwrite=False)
    _say(f"stain: {plan.n_units} slabs over 3 axes → {stain_dir}")
    t = time.perf_counter()
    run_stain(stain_dir, executor="local", batch_size=16, device="cpu", progress=False)
    summary["stain_seconds"] = round(time.perf_counter() - t, 1)

    import zarr

    from hpcstain.metrics.volume import prepare_reference, score_volume

    group = zarr.open_group(str(vol_path), mode="r")
    truth = group["stain"][:]
    # the truth in the model's colour space (§2.5 with label ROIs), inside the sample mask
    reference = prepare_reference(truth.shape[:3], truth, labels=group["labels"][:],
                                  ct=group["ct"][:])
    volumes = {"truth": truth}
    scores: dict[str, Any] = {}
    for name, kwargs in (("fused-consistency", {"method": "consistency"}),
                         ("fused-mean", {"method": "mean", "out": "fused-mean.ome.zarr"}),
                         ("slicewise-z", {"single_axis": "z"})):
        report = fuse_run(stain_dir, **kwargs)
        volumes[name] = _read_fused(Path(report.output))
        scores[name] = score_volume(volumes[name], reference).summary
    stripes: dict[str, float] = {}
    for name, rgb in volumes.items():
        stripes[name] = round(float(stripe_index(rgb, axis=0)), 3)
        Image.fromarray(orthoviews(rgb)).save(out / f"orthoview-{name}.png")
    summary["stripe_index_z"] = stripes
    summary["volume_scores"] = {
        name: {"psnr": sc["psnr"], "psnr_calibrated": sc["psnr_calibrated"],
               "ssim": {f: sc["planes"][f]["ssim"] for f in sc["planes"]},
               "stripe_ratio": sc["stripe_ratio"]} for name, sc in scores.items()}
    print(volume_table(summary["volume_scores"], reference.info["mask_fraction"]), end="")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    _say("stripe index along z (1 = no stripes): "
         + ", ".join(f"{k} {v}" for k, v in stripes.items()))
    _say(f"done in {summary['seconds']} s; outputs in {out}/ (summary.json, orthoview-*.png, "
         "evaluate/, stain/fused.ome.zarr)")
    return summary


def volume_table(scores: dict[str, Any], mask_fraction: float) -> str:
    """One line per stained volume: PSNR, SSIM per plane family, stripe ratio per axis."""
    def f(v: Any, d: int) -> str:
        return f"{v:.{d}f}" if isinstance(v, float) else str(v)

    lines = [f"3D: stained volume vs the §2.5-normalised truth, inside the sample "
             f"({mask_fraction:.0%} of voxels); PSNR cal. after a per-channel colour "
             "gain/offset fit; stripe ratio 1 = no excess stripes",
             "| volume | PSNR ↑ | PSNR cal. ↑ | SSIM XY ↑ | SSIM XZ ↑ | SSIM YZ ↑ | stripe z | "
             "stripe y | stripe x |", "|" + "---|" * 9]
    for name, sc in scores.items():
        ssim = " | ".join(f(sc["ssim"][fam], 3) for fam in ("xy", "xz", "yz"))
        stripes = " | ".join(f(sc["stripe_ratio"][a], 2) for a in "zyx")
        lines.append(f"| {name} | {f(sc['psnr'], 2)} | {f(sc.get('psnr_calibrated'), 2)} | "
                     f"{ssim} | {stripes} |")
    return "\n".join(lines) + "\n"


def _evaluate(manifest: Path, checkpoint: Path, run_dir: Path, out: Path, patch: int
              ) -> dict[str, Any]:
    """Score the held-out slide(s) against histology and truth (paper §2.10 protocol)."""
    from hpcstain.evaluate import evaluate_manifest

    _say(f"evaluate: every slide, by split (train/test) → {out}")
    report = evaluate_manifest(manifest, checkpoint, out, split=run_dir, patch=patch,
                               overwrite=True, log=_say)
    print(report.table, end="")
    return report.summary
