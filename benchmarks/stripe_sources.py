"""Where a fused stain's excess slice-to-slice change along z (issue 28's z-stripe ratio)
comes from: each axis stain's own ratio, the fused image's, and the fused image with the
sample voxels fuse painted as outside given back their median stain (what the ratio would
be if the outside test painted no sample voxel).

    .venv/bin/python benchmarks/stripe_sources.py /tmp/ts/L6K5/held-mg-s9001-vote/stain \\
        /tmp/ts/held-mg-s9001-128.zarr [...more RUN VOLUME pairs]

RUN: a stained and fused run directory of ``benchmarks/tissue_study.py`` (axes z, y, x);
VOLUME: the phantom volume it stained (labels and truth stain). Prints one table row each.
``--reclaim`` prints instead what a fourth step of the outside test would do (not in
fuse; measured, not adopted: docs/results.md, session 10): outside voxels next to inside
whose 3³ box holds at least VOTES voxels at or above background + FRACTION of the gap
become inside, STEPS times; sample painted, outside kept, voxel agreement with the labels
and the fused z-stripe ratio (painted voxels show the background colour, the others the
median of the axes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tissue_study import z_stripe_ratio

from hpcstain.metrics.volume import OUTSIDE_LABELS
from hpcstain.score import read_rgb


def row(run: Path, volume: Path) -> str:
    import zarr

    group = zarr.open_group(str(volume), mode="r")
    labels, truth = group["labels"][:], group["stain"][:]
    mask = labels > 1                      # tissue_study's mask for the ratio
    sample = ~np.isin(labels, OUTSIDE_LABELS)
    axes = [zarr.open(str(run / f"axis-{a}.zarr"), mode="r")[:] for a in "zyx"]
    fused = np.moveaxis(np.asarray(read_rgb(run / "fused.ome.zarr"))[:3], 0, -1)
    median = np.rint(np.median(np.stack(axes).astype(np.float32), 0)).astype(np.uint8)
    painted = sample & np.any(fused != median, axis=-1)
    unpainted = fused.copy()
    unpainted[painted] = median[painted]
    ratios = [z_stripe_ratio(a, truth, mask) for a in axes]
    f, u = z_stripe_ratio(fused, truth, mask), z_stripe_ratio(unpainted, truth, mask)
    own = " / ".join(f"{r[a]:.2f}" for r, a in zip(ratios, "zyx", strict=True))
    per = " / ".join(f"{f[a]:.2f}" for a in "zyx")
    return (f"| {volume.stem} | {100 * painted.sum() / sample.sum():.1f} % | "
            f"{f['z_over_yx']:.2f} | {u['z_over_yx']:.2f} | {per} | {own} | "
            f"{ratios[0]['z_over_yx']:.2f} |")


RECLAIMS = ((0.13, 10, 2), (0.10, 14, 2), (0.08, 14, 2))   # (fraction, votes, steps)


def reclaim_rows(run: Path, volume: Path) -> list[str]:
    import json

    import zarr

    from hpcstain.ct.outside import outside_of_sample

    group = zarr.open_group(str(volume), mode="r")
    ct, labels, truth = group["ct"][:], group["labels"][:], group["stain"][:]
    plan = json.loads((run / "plan.json").read_text())
    bone, background = plan["bone_level"], plan["background_level"]
    sample, mask = ~np.isin(labels, OUTSIDE_LABELS), labels > 1
    whole = tuple(slice(0, n) for n in ct.shape)
    rule = outside_of_sample(ct, whole, whole, (bone, background))
    axes = [zarr.open(str(run / f"axis-{a}.zarr"), mode="r")[:] for a in "zyx"]
    median = np.rint(np.median(np.stack(axes).astype(np.float32), 0)).astype(np.uint8)
    fill = np.moveaxis(np.asarray(read_rgb(run / "fused.ome.zarr"))[:3], 0, -1)[0, 0, 0]
    rows = []
    for name, out in [("rule", rule), *((f"reclaim {s}× {v}/27 at {f:.0%}",
                                         _reclaim(ct, rule, background + f * (bone - background),
                                                  v, s)) for f, v, s in RECLAIMS)]:
        fused = median.copy()
        fused[out] = fill
        stripe = z_stripe_ratio(fused, truth, mask)["z_over_yx"]
        rows.append(f"| {volume.stem} | {name} | {100 * (out & sample).sum() / sample.sum():.1f} %"
                    f" | {100 * (~out & ~sample).sum() / (~sample).sum():.1f} % | "
                    f"{100 * np.mean(~out == sample):.1f} % | {stripe:.2f} |")
    return rows


def _reclaim(ct: np.ndarray, outside: np.ndarray, threshold: float, votes: int, steps: int
             ) -> np.ndarray:
    from scipy import ndimage

    above = (ct >= threshold).astype(np.float32)
    count = np.rint(ndimage.uniform_filter(above, 3, mode="mirror") * 27) >= votes
    out = outside.copy()
    for _ in range(steps):
        out &= ~(ndimage.binary_dilation(~out) & count)
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--reclaim":
        argv = argv[1:]
        print("| volume | outside test | sample painted | outside kept | agreement | "
              "z-stripe fused |")
        print("|---|---|---|---|---|---|")
        for run, vol in zip(argv[::2], argv[1::2], strict=True):
            print("\n".join(reclaim_rows(Path(run), Path(vol))), flush=True)
        return 0
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__)
        return 2
    print("| volume | sample painted | z-stripe fused | fused, painted voxels unpainted "
          "| fused z / y / x (rel. to truth) | each axis stain along its own axis z / y / x "
          "| z stain's z-stripe |")
    print("|---|---|---|---|---|---|---|")
    for run, vol in zip(argv[::2], argv[1::2], strict=True):
        print(row(Path(run), Path(vol)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
