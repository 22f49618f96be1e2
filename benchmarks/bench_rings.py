"""Ring suppression on reconstructed CT, tried on the scanned phantom (issue 23; not in the
package: neither estimator below removes enough of the phantom's rings to ship).

Rings come from detector columns whose gain is a little off: every projection carries the
same error at one distance from the rotation axis, and filtered back-projection turns it
into a circle about the axis in every axial slice. Both estimators take, per annulus of
``--bin`` px about the axis, the angular median of a signal, then its median over
``--slices`` neighbouring slices (a gain error lasts, noise does not), and subtract it from
every pixel of the annulus (linear in the radius):

* ``radial``: the grey values, minus their running median over ``--window`` px of radius
  (rings are narrow, a grey-value step or cupping is broad);
* ``thin``: what a ``--size``² median filter removes from the slice (lines and specks
  thinner than about half of it; a median keeps the edges of larger structures).

Each phantom is scanned twice by the tomography chain without Poisson noise (flux 0), with
and without the gain errors, so their difference is the rings alone. Reported inside the
reconstruction circle in % of the bone-background gap (label medians): the rings' RMS
before and after, what the filter changes on the ring-free scan (damage, the sample tube's
2-px wall apart), and on that wall.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rings.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcstain.phantom import LABELS, make_volume
from hpcstain.phantom.tomo import TomoParams

BONE = (LABELS["cortical_bone"], LABELS["trabecular_bone"])
MIN_PIXELS = 16     # annuli with fewer pixels (the axis) are left alone


def annulus_medians(planes: np.ndarray, radius: np.ndarray, width: float) -> np.ndarray:
    """(nz, n) median of each annulus ``width`` px wide of each plane."""
    index = (radius / width).astype(np.int64).reshape(-1)
    n = int(index.max()) + 1
    counts = np.bincount(index, minlength=n)
    order = np.argsort(index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    key = np.repeat(np.arange(n), counts)
    lo, hi = starts[:-1] + (counts - 1) // 2, starts[:-1] + counts // 2
    out = np.zeros((len(planes), n))
    for i, plane in enumerate(planes):
        v = np.asarray(plane, np.float64).reshape(-1)[order]
        v = v[np.lexsort((v, key))]
        out[i] = 0.5 * (v[np.minimum(lo, len(v) - 1)] + v[np.minimum(hi, len(v) - 1)])
    out[:, counts < MIN_PIXELS] = 0.0
    return out


def suppress(ct: np.ndarray, method: str, args: argparse.Namespace) -> np.ndarray:
    ny, nx = ct.shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    radius = np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2)
    if method == "thin":
        signal = ct - ndimage.median_filter(ct, size=(1, args.size, args.size), mode="mirror")
    else:
        signal = ct
    prof = annulus_medians(signal, radius, args.bin)
    prof = ndimage.median_filter(prof, size=(min(args.slices, 2 * len(ct) - 1), 1),
                                 mode="nearest")
    if method == "radial":
        width = max(3, round(args.window / args.bin) | 1)
        prof = prof - ndimage.median_filter(prof, size=(1, width), mode="nearest")
    centres = (np.arange(prof.shape[1]) + 0.5) * args.bin
    out = ct.copy()
    for i in range(len(ct)):
        out[i] -= np.interp(radius, centres, prof[i]).astype(np.float32)
    return out


def rows(material: str, seed: int, args: argparse.Namespace) -> list[str]:
    shape = (args.depth, args.size_xy, args.size_xy)
    on = make_volume(shape, material, seed, tomo=TomoParams(flux=0.0, rings=1.0))
    off = make_volume(shape, material, seed, tomo=TomoParams(flux=0.0, rings=0.0))
    a, b = np.asarray(on.ct, np.float32), np.asarray(off.ct, np.float32)
    labels = np.asarray(on.labels)
    gap = float(np.median(b[np.isin(labels, BONE)]) - np.median(b[labels == LABELS["background"]]))
    ny, nx = shape[1:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    fov = np.broadcast_to(np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) < min(ny, nx) / 2 - 2,
                          shape)
    tube = labels == LABELS["tube"]

    def rms(d: np.ndarray, where: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.square(d[where])))) * 100.0 / gap

    out = []
    for method in ("radial", "thin"):
        fa, fb = suppress(a, method, args), suppress(b, method, args)
        out.append(f"| {material} {seed} | {method} | {rms(a - b, fov):.2f} | "
                   f"{rms(fa - b, fov):.2f} | {rms(fb - b, fov & ~tube):.2f} | "
                   f"{rms(fb - b, tube):.2f} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phantoms", nargs="+", default=["mg:11", "ti:3", "peek:5"],
                   metavar="MATERIAL:SEED")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--size-xy", type=int, default=128)
    p.add_argument("--bin", type=float, default=0.5, help="annulus width, px")
    p.add_argument("--slices", type=int, default=9, help="median over this many slices")
    p.add_argument("--window", type=float, default=6.0, help="radial: running median, px")
    p.add_argument("--size", type=int, default=3, help="thin: median filter edge, px")
    args = p.parse_args()
    print("| phantom | estimator | rings RMS, % of gap | after | damage on the ring-free scan "
          "| … on the tube wall |")
    print("|---|---|---|---|---|---|")
    for spec in args.phantoms:
        material, seed = spec.split(":")
        print("\n".join(rows(material, int(seed), args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
