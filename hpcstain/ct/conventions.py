"""What a checkpoint records about its CT input, read from the checkpoint in one place.

A generator wants its CT as it was trained on (:class:`Conventions`):

* the §2.5 target levels (raw bone level → ``ct_bone_level``, raw background level →
  ``ct_background_level`` on the 16-bit scale; :class:`~hpcstain.ct.levels.TargetLevels`);
* whether the CT is inverted before the generator (``data.invert_ct``);
* the number of CT and histology channels, the histology stretch margins;
* ``context_slices`` k: a 2.5D generator sees the k CT planes about the slice it stains
  (``model.context_slices``; checkpoints without the record read as 1);
* the generator's size multiple (tiles must be multiples of it: 4 for the ResNet,
  256 for the U-Net-256);
* the CT cupping correction (``data.cupping``) and, for ``radial``, the training set's
  fit per slide size (checkpoint key ``cupping_fits``, :func:`hpcstain.ct.cupping.fits_record`),
  which ``predict``/``evaluate`` apply to slides of those sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from hpcstain.config import DataConfig
from hpcstain.ct.cupping import fits_from_record, fits_record
from hpcstain.ct.levels import DEFAULT_TARGET, TargetLevels

# the data-config keys a pinned generator keeps (the rest of a checkpoint's config is training)
CONVENTION_KEYS = ("ct_bone_level", "ct_background_level", "stretch_c", "stretch_c_prime",
                   "invert_ct", "cupping", "stain_sigma", "fuse_method")


@dataclass(frozen=True)
class Conventions:
    """How a checkpoint's generator wants its input (and what it returns)."""

    target_levels: TargetLevels = DEFAULT_TARGET  # (bone, background), 16-bit
    invert_ct: bool = False
    ct_channels: int = 3
    histology_channels: int = 3
    stretch_c: tuple[float, float] = (0.0, 0.0)
    size_multiple: int = 4
    cupping: str = "none"  # CT preprocessing trained with: none | radial (hpcstain.ct.cupping)
    # radial: the training set's fit per slide size ((ny, nx), Cupping), sorted by size
    cupping_fits: tuple[tuple[tuple[int, int], Any], ...] = ()
    context_slices: int = 1  # k CT planes about the slice as the generator's input (2.5D)
    stain_sigma: float = 1.0  # the volume engine's 3D Gaussian before staining (voxels)
    fuse_method: str = "mean"  # how `fuse` merges the axes by default

    @property
    def generator_channels(self) -> int:
        """Input channels of the CT→histology generator: k planes, or the slice repeated."""
        return self.context_slices if self.context_slices > 1 else self.ct_channels

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["cupping_fits"] = fits_record(dict(self.cupping_fits))
        return out

    @property
    def stored_fits(self) -> dict[tuple[int, int], Any]:
        """Slide shape → the training set's :class:`~hpcstain.ct.cupping.Cupping`."""
        return dict(self.cupping_fits)



def conventions_of(ckpt: dict[str, Any], source: str = "checkpoint") -> Conventions:
    """The input conventions recorded in a loaded checkpoint (config.data + architecture,
    and the stored cupping fits; a checkpoint from before they were stored has none)."""
    config = ckpt.get("config", {}) if isinstance(ckpt.get("config"), dict) else {}
    data = config.get("data", {}) if isinstance(config.get("data"), dict) else {}
    d = DataConfig()
    get = {k: data.get(k, getattr(d, k)) for k in CONVENTION_KEYS}
    arch = ckpt["architecture"]
    return Conventions(
        target_levels=TargetLevels(float(get["ct_bone_level"]),
                                   float(get["ct_background_level"])),
        invert_ct=bool(get["invert_ct"]), ct_channels=int(arch["ct_channels"]),
        histology_channels=int(arch["histology_channels"]),
        stretch_c=(float(get["stretch_c"]), float(get["stretch_c_prime"])),
        size_multiple=256 if arch.get("generator") == "unet256" else 4,
        cupping=str(get["cupping"]),
        cupping_fits=tuple(sorted(fits_from_record(ckpt.get("cupping_fits"), source).items())),
        context_slices=int(arch.get("context_slices", 1)),
        stain_sigma=float(get["stain_sigma"]), fuse_method=str(get["fuse_method"]))
