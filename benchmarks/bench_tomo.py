"""What the CT-only steps read on physically scanned phantoms (``--physics tomo``).

For held-out 128³ phantoms (Mg seed 11, Ti seed 3, PEEK seed 5), scanned at low / medium /
high flux, rings on/off, phase contrast on/off (and the renderer as the baseline), reports

* ``hpcstain levels`` (``level_sample`` + ``estimate_ct_levels``, what the CLI prints):
  bone and background read vs the medians of the bone labels (cortical + trabecular) and
  of the air label in that CT, errors in % of the true bone–air gap, and the confidence;
* the outside-the-sample test of ``hpcstain fuse`` (``ct.outside.outside_of_sample`` on the
  whole volume at the levels read) vs the labels' inside/outside (outside = air/resin and
  the tube, ``metrics.volume.OUTSIDE_LABELS``): voxel agreement, sample voxels painted as
  outside, outside voxels kept inside; and its agreement at the label medians' levels
  (the rule's own share, whatever ``levels`` read);
* the score's CT-only sample mask (``metrics.volume.sample_mask(ct=..., "auto")``, used when
  no labels are given): voxel agreement with the labels.

Measurement only: nothing here changes the pipeline.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tomo.py [--quick] [--size 128]
        [--phantoms mg:9001 ti:9002 peek:9003]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from hpcstain.errors import HpcstainError
from hpcstain.phantom import write_volume_file
from hpcstain.phantom.sample import LABELS
from hpcstain.phantom.tomo import TomoParams

PHANTOMS = (("mg", 11), ("ti", 3), ("peek", 5))
FLUX = {"low": 1e3, "medium": 1e4, "high": 1e5}


def settings(quick: bool) -> list[tuple[str, TomoParams | None]]:
    """(name, params): the renderer, flux × rings without phase, phase ± Paganin at medium."""
    out: list[tuple[str, TomoParams | None]] = [("render (baseline)", None)]
    for fname, flux in FLUX.items():
        for rings in (1.0, 0.0):
            if quick and (fname != "medium" or rings == 0.0):
                continue
            out.append((f"tomo {fname} flux, rings {'on' if rings else 'off'}",
                        TomoParams(flux=flux, rings=rings)))
    out.append(("tomo medium flux, rings on, phase 1 m", TomoParams(phase_distance=1.0)))
    if not quick:
        out.append(("tomo medium flux, rings on, phase 1 m + Paganin 1000",
                    TomoParams(phase_distance=1.0, paganin=1000.0)))
    return out


def measure(path: Path) -> dict[str, object]:
    from hpcstain.ct.levels import estimate_ct_levels
    from hpcstain.ct.outside import outside_of_sample
    from hpcstain.metrics.volume import OUTSIDE_LABELS, sample_mask
    from hpcstain.volume.io import level_sample

    group = zarr.open_group(str(path), mode="r")
    ct, labels = group["ct"][...], group["labels"][...]
    bone_true = float(np.median(ct[np.isin(labels, (LABELS["cortical_bone"],
                                                    LABELS["trabecular_bone"]))]))
    air_true = float(np.median(ct[labels == LABELS["background"]]))
    gap = bone_true - air_true
    row: dict[str, object] = {"bone_true": bone_true, "air_true": air_true}
    truth_out = np.isin(labels, OUTSIDE_LABELS)
    try:
        raw, smoothed, stride, name = level_sample(f"{path}:ct")   # as `hpcstain levels`
        est = estimate_ct_levels(raw, name, stride=stride, smoothed=smoothed)
        row.update(bone=est.bone, background=est.background, confidence=est.confidence,
                   ambiguous=est.ambiguous, bone_err=100 * (est.bone - bone_true) / gap,
                   bg_err=100 * (est.background - air_true) / gap)
        whole = tuple(slice(0, n) for n in ct.shape)
        out = outside_of_sample(ct, whole, whole, (est.bone, est.background))
        row.update(agree=100 * float((out == truth_out).mean()),
                   painted=100 * float(out[~truth_out].mean()),
                   kept=100 * float((~out[truth_out]).mean()))
    except HpcstainError as exc:
        row["error"] = str(exc).splitlines()[0]
    whole = tuple(slice(0, n) for n in ct.shape)
    out = outside_of_sample(ct, whole, whole, (bone_true, air_true))
    row["agree_true"] = 100 * float((out == truth_out).mean())
    mask, _ = sample_mask(ct.shape, labels=None, ct=ct, ct_threshold="auto")
    row["score_agree"] = 100 * float((mask == ~truth_out).mean())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="medium flux and phase only")
    p.add_argument("--materials", nargs="+", default=[m for m, _ in PHANTOMS])
    p.add_argument("--phantoms", nargs="+", metavar="MATERIAL:SEED",
                   help="phantoms instead of Mg 11, Ti 3, PEEK 5 (e.g. held-out seeds)")
    args = p.parse_args()
    n = args.size
    phantoms = PHANTOMS if not args.phantoms else tuple(
        (m, int(s)) for m, s in (a.split(":") for a in args.phantoms))
    print("| phantom | CT | levels bone (labels) | err | background (air) | err | confidence "
          "| outside agreement | sample painted | outside kept | outside at label levels "
          "| score mask agreement | gen s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for material, seed in phantoms:
            if material not in args.materials:
                continue
            for name, params in settings(args.quick):
                dest = Path(tmp) / f"{material}.zarr"
                t0 = time.perf_counter()
                write_volume_file(dest, (n, n, n), material, seed, tomo=params, overwrite=True)
                gen = time.perf_counter() - t0
                r = measure(dest)
                head = f"| {material} {seed} | {name} "
                if "error" in r:
                    print(f"{head}| refused: {r['error']} (labels {r['bone_true']:.0f}) | | "
                          f"(air {r['air_true']:.0f}) | | | | | | {r['agree_true']:.1f} % | "
                          f"{r['score_agree']:.1f} % | {gen:.1f} |", flush=True)
                    continue
                amb = ", ambiguous" if r["ambiguous"] else ""
                print(f"{head}| {r['bone']:.0f} ({r['bone_true']:.0f}) | {r['bone_err']:+.1f} % "
                      f"| {r['background']:.0f} ({r['air_true']:.0f}) | {r['bg_err']:+.1f} % "
                      f"| {r['confidence']:.2f}{amb} | {r['agree']:.1f} % | {r['painted']:.1f} % "
                      f"| {r['kept']:.1f} % | {r['agree_true']:.1f} % | {r['score_agree']:.1f} % "
                      f"| {gen:.1f} |", flush=True)


if __name__ == "__main__":
    main()
