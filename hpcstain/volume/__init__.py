"""Volume engine: chunked, multi-axis virtual staining of CT volumes, then fusion.

The path of one voxel: :mod:`.plan` cuts the volume into slabs per axis → :mod:`.io` reads a
slab + halo → :mod:`.stain` smooths it, normalises it with the checkpoint's conventions
(:mod:`hpcstain.inference`) and stains it on the global tile grid (:mod:`hpcstain.tiles`) →
``RUN_DIR/axis-*.zarr`` + completion records (the run directory: :mod:`.rundir`) →
:mod:`.fuse` blends the axes → :mod:`.omezarr` writes the RGBA OME-Zarr pyramid. Both are
block tasks (:mod:`.tasks`) run by :mod:`hpcstain.executors` (in-process, local processes,
dask, MPI, SLURM arrays), one after the other or as one graph.
"""

from __future__ import annotations

from hpcstain.volume.fuse import METHODS, FuseReport, fuse_run, stripe_index
from hpcstain.volume.io import VolumeSource, estimate_levels, open_volume
from hpcstain.volume.plan import Plan, load_plan, make_plan
from hpcstain.volume.stain import (
    PinnedStainer,
    init_run,
    pending_units,
    stain_unit,
)

__all__ = [
    "METHODS", "FuseReport", "PinnedStainer", "Plan", "VolumeSource", "estimate_levels",
    "fuse_run", "init_run", "load_plan", "make_plan", "open_volume", "pending_units",
    "stain_unit", "stripe_index",
]
