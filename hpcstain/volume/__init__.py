"""Volume engine: chunked, multi-axis virtual staining of CT volumes, then fusion.

The path of one voxel: :mod:`.io` reads a chunk + halo → :mod:`.plan` says which →
:mod:`.stain` smooths, normalises and stains it on the global tile grid per axis →
``RUN_DIR/axis-*.zarr`` + completion records → :mod:`.fuse` blends the axes →
:mod:`.omezarr` writes the RGBA OME-Zarr pyramid.
"""

from __future__ import annotations

from typing import Any

from hpcstain.volume.fuse import METHODS, FuseReport, fuse_run, stripe_index
from hpcstain.volume.io import VolumeSource, estimate_levels, open_volume
from hpcstain.volume.plan import Plan, load_plan, make_plan
from hpcstain.volume.stain import (
    CheckpointStainer,
    init_run,
    pending_chunks,
    stain_chunk,
)


def run_stain(run_dir: Any, fn: Any = None, executor: str = "local", **kwargs: Any) -> Any:
    """Stain every pending chunk; see :func:`hpcstain.executors.run_stain`."""
    from hpcstain.executors import run_stain as _run

    return _run(run_dir, fn, executor, **kwargs)


__all__ = [
    "METHODS", "CheckpointStainer", "FuseReport", "Plan", "VolumeSource", "estimate_levels",
    "fuse_run", "init_run", "load_plan", "make_plan", "open_volume", "pending_chunks",
    "run_stain", "stain_chunk", "stripe_index",
]
