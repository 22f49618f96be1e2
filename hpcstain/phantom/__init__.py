"""The embedded phantom: synthetic bone-implant CT with exact toluidine-blue truth.

``make_volume``/``write_volume_file`` give a CT volume with its stain and label volumes;
``write_pairs`` gives paired 2D whole slides (CT, histology, correspondence mask, truth)
and a manifest. ``tomo=TomoParams(...)`` scans the CT through a physical chain instead of
rendering it (``phantom.tomo``). Everything is a deterministic function of the seed.
"""

from __future__ import annotations

from hpcstain.phantom.pairs import (
    MANIFEST_COLUMNS,
    MATERIAL_RATIO,
    Pair,
    allocate_materials,
    render_pair,
    write_pairs,
)
from hpcstain.phantom.render import CT_RANGES, PALETTE, SCREW_ATTENUATION
from hpcstain.phantom.sample import BONE_LABELS, LABELS, MATERIALS, RIGID_LABELS
from hpcstain.phantom.tomo import TomoParams
from hpcstain.phantom.volume import (
    PHANTOM_VERSION,
    VOXEL_SIZE_UM,
    PhantomVolume,
    iter_slabs,
    make_volume,
    write_volume_file,
)

__all__ = [
    "BONE_LABELS", "CT_RANGES", "LABELS", "MANIFEST_COLUMNS", "MATERIALS", "MATERIAL_RATIO",
    "PALETTE", "PHANTOM_VERSION", "RIGID_LABELS", "SCREW_ATTENUATION", "VOXEL_SIZE_UM", "Pair",
    "PhantomVolume", "TomoParams", "allocate_materials", "iter_slabs", "make_volume", "render_pair",
    "write_pairs", "write_volume_file",
]
