"""CT levels from the CT alone (hpcstain.ct.levels) against the phantom's label medians.

Matrix: screw material (mg, ti, peek) × screw size (--screw-scale 1 and 1.6) × cupping
(none, 3× the phantom's default) × seeds, on phantom volumes (default 48×192×192). For each
volume the estimate of ``hpcstain.volume.io.estimate_levels`` (the path of ``stain``) is
compared with the median CT of the bone labels (cortical + trabecular; both also shown)
and of the background label, next to the estimator it replaced (2-class Otsu, median of the
bright class below its 95th percentile). A second table does the same on 2D phantom slides
through ``find_ct_rois`` (the path of ``predict``), also against the histology-aided levels
of training (``find_pair_rois``). A third shows what the normalised CT of a Ti volume looks
like with the old and the new levels (bone should land at 30000, the screw far above).

    .venv/bin/python benchmarks/bench_levels.py                 # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_levels.py --seeds 31 --shape 32 128 128
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcstain.data.normalise import ct_levels, find_ct_rois, find_pair_rois
from hpcstain.errors import InputError
from hpcstain.phantom import LABELS, make_volume, render_pair
from hpcstain.phantom import render as phantom_render
from hpcstain.volume.io import estimate_levels

BONE = (LABELS["cortical_bone"], LABELS["trabecular_bone"])


class ArraySource:
    """The VolumeSource interface over an in-memory array (what estimate_levels reads)."""

    def __init__(self, ct: np.ndarray, name: str) -> None:
        self.ct, self.shape, self.spec = ct, ct.shape, name

    def read(self, region: tuple[slice, slice, slice]) -> np.ndarray:
        return self.ct[region]


@contextmanager
def cupping(value: float):
    old = phantom_render.CUPPING
    phantom_render.CUPPING = value
    try:
        yield
    finally:
        phantom_render.CUPPING = old


def old_levels(sample: np.ndarray) -> tuple[float, float]:
    """The estimator this replaced (2-class Otsu; bright class median below its P95)."""
    from skimage.filters import threshold_otsu

    s = sample[np.isfinite(sample)].astype(np.float64).ravel()
    t = float(threshold_otsu(s))
    dark, bright = s[s <= t], s[s > t]
    return float(np.median(bright[bright <= np.percentile(bright, 95)])), float(np.median(dark))


def medians(ct: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    c = ct.astype(np.float64)
    out = {"bone": float(np.median(c[np.isin(labels, BONE)])),
           "cortical": float(np.median(c[labels == LABELS["cortical_bone"]])),
           "background": float(np.median(c[labels == LABELS["background"]]))}
    trab = labels == LABELS["trabecular_bone"]
    out["trabecular"] = float(np.median(c[trab])) if trab.any() else float("nan")
    screw = labels == LABELS["screw"]
    out["screw"] = float(np.median(c[screw])) if screw.any() else float("nan")
    return out


def pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+5.1f}"


def volume_table(shape: tuple[int, int, int], seeds: list[int], cups: list[float],
                 scales: list[float]) -> list[float]:
    print(f"### Volumes {shape[0]}×{shape[1]}×{shape[2]} (estimate_levels, as `stain`)\n")
    print("| material | screw | cupping | seed | bone ref (cort / trab) | background ref | "
          "bone est | err % | background est | err % | confidence | old bone err % | "
          "old background err % | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    errors: list[float] = []
    for material in ("mg", "ti", "peek"):
        for scale in scales:
            for cup in cups:
                for seed in seeds:
                    with cupping(cup):
                        v = make_volume(shape, material, seed, screw_scale=scale)
                    ref = medians(v.ct, v.labels)
                    t0 = time.perf_counter()
                    try:
                        bone, bg = estimate_levels(ArraySource(v.ct, "phantom"))
                        from hpcstain.ct.levels import volume_levels

                        conf = volume_levels(ArraySource(v.ct, "phantom")).confidence
                        eb, eg = pct(bone, ref["bone"]), pct(bg, ref["background"])
                        errors += [abs(bone / ref["bone"] - 1), abs(bg / ref["background"] - 1)]
                        est = f"{bone:.0f} | {eb} | {bg:.0f} | {eg} | {conf:.2f}"
                    except InputError as exc:
                        est = f"error: {exc} | | | | "
                        errors.append(float("inf"))
                    dt = time.perf_counter() - t0
                    ob, og = old_levels(v.ct[::2, ::2, ::2])
                    print(f"| {material} | {scale:g} | {cup:g} | {seed} | {ref['bone']:.0f} "
                          f"({ref['cortical']:.0f} / {ref['trabecular']:.0f}) | "
                          f"{ref['background']:.0f} | {est} | {pct(ob, ref['bone'])} | "
                          f"{pct(og, ref['background'])} | {dt:.2f} |")
    print(f"\nworst |error|: {100 * max(errors):.1f} % over {len(errors) // 2} volumes\n")
    return errors


def slide_table(n: int, size: int) -> None:
    print(f"### 2D slides {size}² (find_ct_rois, as `predict`)\n")
    print("| material | slide | bone err % (labels) | background err % (labels) | "
          "bone err % (training ROIs) | background err % (training ROIs) | old bone err % |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for material in ("mg", "ti", "peek"):
        for i in range(n):
            p = render_pair(material, 60 + i, (size, size), 9, i)
            ref = medians(p.ct, p.labels)
            try:
                bone, bg = ct_levels(p.ct.astype(np.float64), find_ct_rois(p.ct))
            except InputError as exc:
                print(f"| {material} | {i} | error: {exc} | | | | |")
                continue
            tb, tg = ct_levels(p.ct.astype(np.float64), find_pair_rois(p.ct, p.histology))
            ob, _ = old_levels(p.ct)
            worst = max(worst, abs(bone / ref["bone"] - 1), abs(bg / ref["background"] - 1))
            print(f"| {material} | {i} | {pct(bone, ref['bone'])} | "
                  f"{pct(bg, ref['background'])} | {pct(bone, tb)} | {pct(bg, tg)} | "
                  f"{pct(ob, ref['bone'])} |")
    print(f"\nworst |error| against the labels: {100 * worst:.1f} %\n")


def normalised_table(shape: tuple[int, int, int], seed: int) -> None:
    """Normalised CT (bone → 30000, background → 10000) of a Ti volume, old vs new levels."""
    from hpcstain.ct.signed import normalise_ct

    v = make_volume(shape, "ti", seed)
    new = estimate_levels(ArraySource(v.ct, "ti"))
    old = old_levels(v.ct[::2, ::2, ::2])
    print(f"### Normalised CT of a Ti volume {shape} seed {seed}, default cupping (label "
          "medians after bone → 30000, background → 10000)\n")
    print("| levels | bone, background | cortical | trabecular | soft tissue | screw | "
          "background |")
    print("|---|---|---|---|---|---|---|")
    for name, (b, g) in (("old (Otsu)", old), ("new (hpcstain.ct.levels)", new)):
        ct16 = normalise_ct(v.ct.astype(np.float32), b, g)
        cells = [float(np.median(ct16[v.labels == LABELS[k]])) for k in
                 ("cortical_bone", "trabecular_bone", "soft_tissue", "screw", "background")]
        print(f"| {name} | {b:.0f}, {g:.0f} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 192, 192])
    ap.add_argument("--seeds", type=int, nargs="+", default=[31, 32])
    ap.add_argument("--cupping", type=float, nargs="+", default=[0.0, 0.15],
                    help="cupping depths (attenuation units; the phantom's default is 0.05)")
    ap.add_argument("--screw-scales", type=float, nargs="+", default=[1.0, 1.6])
    ap.add_argument("--slides", type=int, default=4, help="2D slides per material")
    ap.add_argument("--slide-size", type=int, default=384)
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    errors = volume_table(shape, args.seeds, args.cupping, args.screw_scales)  # type: ignore[arg-type]
    if args.slides:
        slide_table(args.slides, args.slide_size)
    normalised_table(shape, args.seeds[0])  # type: ignore[arg-type]
    return 0 if max(errors) <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
