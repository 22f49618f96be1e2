"""CT levels of scanned phantoms (``--physics tomo``) over volume shapes, seeds and flux.

``bench_tomo.py`` reads levels on 128³ phantoms; this bench varies the shape (the phantom's
sample scales with the array, so a flat 48×160² volume holds a screw of 12 % of its
voxels), the seed and the flux, and reports for each CT the bone level ``hpcstain levels``
reads (``level_sample`` + ``estimate_ct_levels``, the path of ``stain``) against the median
of the bone labels, its confidence and whether it is refused (ambiguous). The CTs are
cached under ``--cache`` (written once).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_levels_shapes.py [--cache DIR]
        [--specs ti:3:64x128x128:1e4 ...]     # MATERIAL:SEED:ZxYxX:FLUX (0: the renderer)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import zarr

from hpcstain.ct.levels import estimate_ct_levels
from hpcstain.errors import InputError
from hpcstain.phantom import LABELS, write_volume_file
from hpcstain.phantom.tomo import TomoParams
from hpcstain.volume.io import level_sample

BONE = (LABELS["cortical_bone"], LABELS["trabecular_bone"])
SHAPES = ("64x128x128", "96x96x96", "48x160x160")


def default_specs() -> list[str]:
    out = [f"ti:{s}:{sh}:{f}" for s in (3, 7, 11, 21, 9002) for sh in SHAPES
           for f in ("1e3", "1e4", "1e5")]
    out += [f"{m}:{s}:{sh}:{f}" for m in ("mg", "peek") for s in (3, 7) for sh in SHAPES[:2]
            for f in ("1e3", "1e4", "0")]
    return out + [f"ti:{s}:{sh}:0" for s in (3, 7) for sh in SHAPES[:2]]


def read(spec: str, cache: Path) -> str:
    material, seed, shape_s, flux_s = spec.split(":")
    shape = tuple(int(n) for n in shape_s.split("x"))
    flux = float(flux_s)
    path = cache / f"{material}{seed}-{shape_s}-{flux:g}.zarr"
    if not path.exists():
        write_volume_file(path, shape, material, int(seed),
                          tomo=TomoParams(flux=flux) if flux else None, overwrite=True)
    group = zarr.open_group(str(path), mode="r")
    ct, labels = group["ct"][...], group["labels"][...]
    bone = float(np.median(ct[np.isin(labels, BONE)]))
    raw, smoothed, stride, name = level_sample(f"{path}:ct")
    try:
        est = estimate_ct_levels(raw, name, stride=stride, smoothed=smoothed)
    except InputError as exc:
        return f"| {spec} | {bone:.0f} | error: {str(exc).splitlines()[0][:80]} | | | |"
    err = 100 * (est.bone - bone) / bone
    verdict = "refused" if est.ambiguous else ("ok" if abs(err) <= 5 else "off")
    return (f"| {spec} | {bone:.0f} | {est.bone:.0f} | {err:+.1f} % | {est.confidence:.2f} "
            f"| {verdict} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("bench-out/levels-shapes"))
    p.add_argument("--specs", nargs="+", default=None)
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print("| CT | bone labels | read | err | confidence | verdict |")
    print("|---|---|---|---|---|---|")
    counts: dict[str, int] = {}
    for spec in args.specs or default_specs():
        row = read(spec, args.cache)
        print(row, flush=True)
        m = re.search(r"\| (ok|off|refused) \|$", row)
        counts[m.group(1) if m else "error"] = counts.get(m.group(1) if m else "error", 0) + 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
