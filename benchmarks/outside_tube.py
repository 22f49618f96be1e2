"""How much of the phantom's sample tube fuse paints as background, and whether any sample
voxel goes with it (docs/results.md, "Seen in the demo's orthoviews").

For each phantom CT (levels estimated as ``make_plan`` does, no cupping correction) the
outside test of ``hpcstain fuse`` is applied to the whole volume four ways: the 5³ box
mean alone (``box5``, the first rule), the largest connected component of its inside mask
(a candidate), the box mean + opening (``box5-erode3-keep8``, the second rule), and the
vote + thickness test + fill (``ct.outside.outside_of_sample``, the rule now, which fuse
reproduces chunk by chunk, byte for byte). Painted fractions are counted per phantom label
(``metrics.volume.sample_mask``: everything but resin, air and the tube).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/outside_tube.py [--erode 3 --keep 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

import hpcstain.ct.outside as outside
from hpcstain.metrics.volume import sample_mask
from hpcstain.phantom import write_volume_file
from hpcstain.phantom.sample import LABELS
from hpcstain.volume.io import estimate_levels, open_volume

PHANTOMS = [((128, 128, 128), "mg", 11), ((128, 128, 128), "mg", 4), ((128, 128, 128), "ti", 3),
            ((128, 128, 128), "peek", 5), ((128, 256, 256), "mg", 11),
            ((128, 256, 256), "ti", 3), ((128, 256, 256), "peek", 5)]


def rules(ct: np.ndarray, levels: tuple[float, float]) -> dict[str, np.ndarray]:
    """Outside masks of the whole volume by each rule."""
    whole = tuple(slice(0, n) for n in ct.shape)
    box = outside.outside_mask(ct, whole, whole, levels)
    components, _ = ndimage.label(~box)
    largest = components != np.argmax(np.bincount(components.ravel())[1:]) + 1
    core = ndimage.minimum_filter((~box).view(np.uint8), size=7, mode="reflect")
    opened = box | ~ndimage.maximum_filter(core, size=17, mode="reflect").astype(bool)
    return {"box mean (box5)": box, "largest component": largest,
            "box + opening (box5-erode3-keep8)": opened,
            f"vote + thickness {outside.OUTSIDE_ERODE}/{outside.OUTSIDE_KEEP} + fill "
            f"({outside.OUTSIDE_TEST})": outside.outside_of_sample(ct, whole, whole, levels)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--erode", type=int, default=outside.OUTSIDE_ERODE)
    p.add_argument("--keep", type=int, default=outside.OUTSIDE_KEEP)
    args = p.parse_args()
    outside.OUTSIDE_ERODE, outside.OUTSIDE_KEEP = args.erode, args.keep  # read at call time
    outside.OUTSIDE_OPEN = args.erode + args.keep + outside.OUTSIDE_FILL
    print("| phantom | rule | tube painted | tube > 5 voxels from the sample painted "
          "| sample voxels painted |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for shape, material, seed in PHANTOMS:
            dest = Path(tmp) / f"{material}-{seed}-{shape[1]}.zarr"
            path = write_volume_file(dest, shape, material, seed)
            group = zarr.open_group(str(path), mode="r")
            ct, labels = group["ct"][...], group["labels"][...]
            levels = estimate_levels(open_volume(f"{path}:ct", scan=False))
            tube = labels == LABELS["tube"]
            sample, _ = sample_mask(ct.shape, labels=labels)
            far = tube & (ndimage.distance_transform_edt(~sample) > 5)
            name = f"{material} seed {seed}, {'×'.join(map(str, shape))}"
            for rule, out in rules(ct, levels).items():
                print(f"| {name} | {rule} | {out[tube].mean():.1%} | {out[far].mean():.1%} | "
                      f"{out[sample].sum()} ({out[sample].mean():.3%}) |", flush=True)


if __name__ == "__main__":
    main()
