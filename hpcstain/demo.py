"""`hpcstain demo`: the whole pipeline on the embedded phantom, in minutes on a laptop CPU.

phantom pairs → train the tissue recipe (a small U-Net, L1 to the paired histology) →
evaluate held-out slides (another seed) against the real (synthetic) histology, the exact
truth and their tissue labels → phantom volume → stain along z, y, x → fuse (and the
paper's slice-wise z volume) → PSNR/SSIM, tissue classes against a CT-threshold baseline,
stripe index, and one PNG of CT | stain | truth on each plane.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.config import load_config
from hpcstain.errors import UsageError
from hpcstain.evaluate import evaluate_manifest
from hpcstain.executors import run_stain
from hpcstain.metrics.stripes import stripe_index
from hpcstain.metrics.tissue import (
    CT_BASELINE,
    STAIN_OWN,
    STAIN_TRUTH,
    TRUTH,
    TissueTally,
    format_tissue_table,
    score_readings,
)
from hpcstain.metrics.volume import prepare_reference, score_volume
from hpcstain.phantom import write_pairs, write_volume_file
from hpcstain.phantom.tomo import PHYSICS, TomoParams
from hpcstain.train.trainer import train
from hpcstain.view import compare_planes
from hpcstain.volume import fuse_run, init_run, make_plan, open_volume


@dataclass(frozen=True)
class DemoSizes:
    n_pairs: int
    n_held: int
    slide: int
    volume: tuple[int, int, int]
    steps: int
    chunk: int
    tile: int
    step: int
    patch: int
    model: tuple[str, ...]


# The tissue recipe (configs/tissue-cpu.yaml, docs/results.md "Where tissue information is
# lost"): a small U-Net trained with plain L1 on 128² slides (the whole slide: context is
# the largest single gain), 8 dihedral transforms, no 3D Gaussian at staining (the profile
# records stain_sigma 0). Pairs sectioned along z, y and x at the pixel scale of the volume
# (the phantom sample scales with the array: slides and volume must share it); held-out
# slides of another seed for the 2D table; a near-cubic volume, as real scans are.
FULL = DemoSizes(n_pairs=48, n_held=8, slide=128, volume=(128, 128, 128), steps=2000,
                 chunk=64, tile=256, step=192, patch=32, model=())
QUICK = DemoSizes(n_pairs=4, n_held=2, slide=64, volume=(32, 48, 48), steps=4,
                  chunk=24, tile=32, step=16, patch=32,
                  model=("data.patch_size=32", "model.ngf=4", "model.ndf=4",
                         "model.n_blocks=5", "data.patches_per_pair=2"))
PROFILE = "tissue-cpu"
TARGETS = {"truth": "exact truth stain (perfectly registered, artefact-free slides)",
           "histology": "phantom's histology as it comes (misaligned, artefacts)"}
TRAIN_SEED, HELD_SEED, VOLUME_SEED = 7, 8, 11


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _read_fused(image: Path) -> np.ndarray:
    import zarr

    level0 = zarr.open_group(str(image), mode="r")["0"][:]  # (4, Z, Y, X) RGBA
    return np.moveaxis(level0[:3], 0, -1)


def _train_config(manifest: Path, n_pairs: int, sizes: DemoSizes) -> Any:
    """The tissue profile for ``sizes.steps`` optimiser steps on every pair (epochs and the
    linear LR decay rescaled so the decay ends at the last step)."""
    import math

    base = [f"data.manifest={manifest}", "data.n_folds=0", "data.n_test=0",
            "data.num_workers=0", "train.log_every=20", *sizes.model]
    cfg = load_config(PROFILE, base)
    per_epoch = max(n_pairs * cfg.data.patches_per_pair // cfg.data.batch_size, 1)
    epochs = max(math.ceil(sizes.steps / per_epoch), 1)
    decay = min(round(epochs * cfg.train.decay_epochs / max(cfg.train.epochs, 1)), epochs)
    return load_config(PROFILE, [*base, f"train.max_steps={sizes.steps}",
                                 f"train.epochs={epochs}", f"train.decay_epochs={decay}",
                                 "train.checkpoint_every=0"])


def truth_manifest(manifest: Path) -> Path:
    """A copy of the phantom's ``manifest`` whose histology column names the exact truth
    stain (``truth/<id>.png``): perfectly registered, artefact-free histology."""
    import csv

    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    out = manifest.with_name("manifest-truth.csv")
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "histology": row["truth"]})
    return out


def run_demo(out: Path, quick: bool = False, physics: str = "render",
             target: str = "truth") -> dict[str, Any]:
    """Run every stage into ``out`` and return (and save) a summary of what it measured.

    ``physics`` picks the phantom's CT: ``render`` (its CT renderer) or ``tomo`` (the
    physical CT chain of :mod:`hpcstain.phantom.tomo` at its default knobs: polychromatic
    projection, Poisson counts, rings, filtered back-projection), for slides and volume.
    ``target`` is what the model learns to paint: ``truth``, the phantom's exact stain
    (the histology a perfect registration of artefact-free slides would give: the
    reference recipe of docs/results.md), or ``histology``, the phantom's synthetic slides
    as they come (warped by 1–3 px, cracks, dirt, stain variation), as your own pairs do.
    """
    if physics not in PHYSICS:
        raise UsageError(f"--physics {physics!r}: choose render or tomo")
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: choose {' or '.join(TARGETS)}")
    sizes = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tomo = TomoParams() if physics == "tomo" else None  # its pairs: z sections only
    summary: dict[str, Any] = {"sizes": sizes.__dict__, "physics": physics,
                               "profile": PROFILE, "target": target}
    t0 = time.perf_counter()

    manifest, held_manifest = _phantom_pairs(out, sizes, tomo, target)
    summary["train"], checkpoint = _train_model(manifest, sizes, target, out / "train", quick)
    summary["evaluate"] = _evaluate(held_manifest, checkpoint, out / "evaluate",
                                    patch=sizes.patch)
    vol_path = _phantom_volume(out, sizes, physics, tomo)
    stain_dir = out / "stain"
    plan, summary["stain_seconds"] = _stain(stain_dir, vol_path, checkpoint, sizes, quick)
    volumes, reference, ct = _fuse_and_score(stain_dir, vol_path, summary)
    view = _orthoviews(out / "orthoviews.png", ct, volumes, reference, plan.fuse_method)
    print(volume_table(summary["volume_scores"], reference.info["mask_fraction"]), end="")
    print(summary["tissue"]["table"], end="")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    _say("stripe index along z (1 = no stripes): "
         + ", ".join(f"{k} {v}" for k, v in summary["stripe_index_z"].items()))
    _say(f"done in {summary['seconds']} s; outputs in {out}/ (summary.json, {view.name}: "
         "CT | fused stain | slice-wise z | truth on each plane, evaluate/, "
         "stain/fused.ome.zarr)")
    return summary


def _phantom_pairs(out: Path, sizes: DemoSizes, tomo: Any, target: str) -> tuple[Path, Path]:
    """Training pairs and held-out pairs (another seed), each written once; returns the
    training manifest (naming the truth stain for ``target`` truth) and the held-out one."""
    pairs_dir, held_dir = out / "pairs", out / "pairs-held-out"
    for folder, n, seed in ((pairs_dir, sizes.n_pairs, TRAIN_SEED),
                            (held_dir, sizes.n_held, HELD_SEED)):
        if not (folder / "manifest.csv").exists():
            _say(f"phantom: {n} paired slides of {sizes.slide}² px (seed {seed}) → {folder}")
            write_pairs(folder, n, seed=seed, size=(sizes.slide, sizes.slide),
                        orientation="z" if tomo else "mixed", tomo=tomo)
    manifest = pairs_dir / "manifest.csv"
    if target == "truth":
        manifest = truth_manifest(manifest)
    return manifest, held_dir / "manifest.csv"


def _train_model(manifest: Path, sizes: DemoSizes, target: str, run_dir: Path, quick: bool
                 ) -> tuple[dict[str, Any], Path]:
    """Train the tissue recipe into ``run_dir``; returns the summary's train entry and the
    checkpoint."""
    cfg = _train_config(manifest, sizes.n_pairs, sizes)
    _say(f"train: {PROFILE} (U-Net, L1 to the {TARGETS[target]}"
         f"{', ' + ', '.join(sizes.model) if sizes.model else ''}), {sizes.steps} steps "
         f"→ {run_dir}")
    t = time.perf_counter()
    result = train(cfg, run_dir, progress=not quick)
    entry = {"status": result.status, "steps": result.step,
             "seconds": round(time.perf_counter() - t, 1),
             "last_losses": result.last_losses}
    return entry, run_dir / "checkpoints" / "latest.pt"


def _phantom_volume(out: Path, sizes: DemoSizes, physics: str, tomo: Any) -> Path:
    """The phantom volume (Mg screw) to stain, written once."""
    vol_path = out / "phantom-volume.zarr"
    if not vol_path.exists():
        _say(f"phantom volume {sizes.volume} (Mg screw, {physics} CT, seed {VOLUME_SEED}) "
             f"→ {vol_path}")
        write_volume_file(vol_path, sizes.volume, "mg", seed=VOLUME_SEED, tomo=tomo)
    return vol_path


def _stain(stain_dir: Path, vol_path: Path, checkpoint: Path, sizes: DemoSizes, quick: bool
           ) -> tuple[Any, float]:
    """Stain the volume's CT along z, y, x into ``stain_dir``; returns the plan and the
    seconds it took."""
    source = open_volume(f"{vol_path}:ct")
    # Same pixel scale as the training slides; Hann blending; planes up to 512² are single
    # tiles; the 3D Gaussian as the checkpoint records (the tissue profile: none).
    plan = make_plan(source, chunk=sizes.chunk, axes="z,y,x", tile=sizes.tile, step=sizes.step,
                     window="hann", max_tile=0 if quick else 512, checkpoint=str(checkpoint))
    init_run(stain_dir, plan, overwrite=False)
    _say(f"stain: {plan.n_units} slabs over 3 axes → {stain_dir}")
    t = time.perf_counter()
    run_stain(stain_dir, executor="local", batch_size=16, device="cpu", progress=False)
    return plan, round(time.perf_counter() - t, 1)


def _fuse_and_score(stain_dir: Path, vol_path: Path, summary: dict[str, Any]
                    ) -> tuple[dict[str, np.ndarray], Any, np.ndarray]:
    """Fuse the stain three ways (the checkpoint's method, the mean, slice-wise z) and score
    each against the truth: the summary's stripe index, 3D scores and tissue classes.
    Returns the volumes (truth included), the scoring reference and the CT."""
    import zarr

    group = zarr.open_group(str(vol_path), mode="r")
    truth, labels, ct = group["stain"][:], group["labels"][:], group["ct"][:]
    # the truth in the model's colour space (§2.5 with label ROIs), inside the sample mask
    reference = prepare_reference(truth.shape[:3], truth, labels=labels, ct=ct)
    volumes = {"truth": truth}
    scores: dict[str, Any] = {}
    # fused: the checkpoint's fuse method (tissue-cpu: median); the mean beside it
    for name, kwargs in (("fused", {}),
                         ("fused-mean", {"method": "mean", "out": "fused-mean.ome.zarr"}),
                         ("slicewise-z", {"single_axis": "z"})):
        report = fuse_run(stain_dir, **kwargs)
        volumes[name] = _read_fused(Path(report.output))
        scores[name] = score_volume(volumes[name], reference).summary
    summary["stripe_index_z"] = {name: round(float(stripe_index(rgb, axis=0)), 3)
                                 for name, rgb in volumes.items()}
    summary["volume_scores"] = {
        name: {"psnr": sc["psnr"], "psnr_calibrated": sc["psnr_calibrated"],
               "ssim": {f: sc["planes"][f]["ssim"] for f in sc["planes"]},
               "stripe_ratio": sc["stripe_ratio"]} for name, sc in scores.items()}
    summary["tissue"] = _tissue(volumes, labels, ct, reference)
    return volumes, reference, ct


def _orthoviews(path: Path, ct: np.ndarray, volumes: dict[str, np.ndarray], reference: Any,
                fuse_method: str) -> Path:
    """One PNG: CT | fused stain | slice-wise z | truth on each plane."""
    # the truth as scored: in the model's colour space (§2.5), the sample's outside filled
    shown = np.where(reference.mask[..., None], reference.rgb, reference.fill)
    return compare_planes(ct, [(f"stain (fused, 3 axes, {fuse_method})", volumes["fused"]),
                               ("stain (slice-wise z)", volumes["slicewise-z"]),
                               ("truth (as scored: §2.5 colours)", shown)], path)


def _tissue(volumes: dict[str, np.ndarray], labels: np.ndarray, ct: np.ndarray,
            reference: Any) -> dict[str, Any]:
    """Tissue classes of the fused and the slice-wise stain read with the truth's palette,
    the CT-threshold baseline and the truth (Dice, BV/TV, BIC, layer thickness)."""
    rows: dict[str, Any] = {}
    readings: dict[str, Any] = {}
    for name in ("fused", "fused-mean", "slicewise-z"):
        tally = TissueTally()
        score_readings(tally, volumes[name], labels, reference.mask, reference.rgb, ct)
        readings = tally.summary()
        rows[f"stain {name}"] = readings[STAIN_TRUTH]
        if name == "fused":  # the reading blind to the colour convention
            rows[f"stain {name}, own class means"] = readings[STAIN_OWN]
    rows[CT_BASELINE], rows[TRUTH] = readings[CT_BASELINE], readings[TRUTH]
    note = (f"Tissue classes inside the sample ({int(reference.mask.sum())} voxels): the "
            "stain read with the truth's colour per class (and with the stain's own mean "
            "colour per true class, blind to the colour convention), beside a grey-value "
            "threshold of the CT (the baseline a stain must beat); thickness in voxels.")
    return {"readings": rows, "table": "3D tissue classes:\n"
            + format_tissue_table(rows, "voxels", note)}


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


def _evaluate(manifest: Path, checkpoint: Path, out: Path, patch: int) -> dict[str, Any]:
    """Score the held-out slides (another phantom seed) against histology and truth (the
    paper's §2.10 protocol) and their tissue classes."""
    _say(f"evaluate: held-out slides of {manifest.parent} → {out}")
    report = evaluate_manifest(manifest, checkpoint, out, patch=patch, overwrite=True,
                               log=_say)
    print(report.table, end="")
    return report.summary
