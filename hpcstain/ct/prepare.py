"""Prepare a CT block for a generator: read → correct → smooth → level → signed range [-1, 1].

The one preparation of volume CT, shared by ``stain`` (each slab unit), ``fuse`` (the CT
read for the outside test) and ``distill`` (the teacher's planes): a block is read with the
Gaussian's halo (:func:`corrected_read`), cupping-corrected as a pure function of global
(y, x), smoothed with the 3D Gaussian (§2.11; mirrored where the halo meets the volume
border, exactly like a whole-volume filter, :func:`smooth`), and mapped from the CT's raw
levels onto the checkpoint's target levels and [-1, 1] (:func:`hpcstain.ct.signed.ct_to_signed`).
A 2.5D generator's context slices along the staining axis come from
:func:`prepare_context`. The recipe is :class:`CtRecipe`; a volume run's plan decides it
once (``Plan.ct_recipe``).

2D slides follow the same steps without the Gaussian (``predict``, ``evaluate`` and the
training sampler: cupping → ``ct_levels`` of the ROIs → ``ct_to_signed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from hpcstain.ct.cupping import Cupping, apply_cupping
from hpcstain.ct.levels import DEFAULT_TARGET, RawLevels, TargetLevels
from hpcstain.ct.signed import to_signed_inplace
from hpcstain.geometry import AXIS_INDEX, Region, grow, relative
from hpcstain.tiles import reflect_index


def gaussian_halo(sigma: float, truncate: float = 4.0) -> int:
    """Voxels the 3D Gaussian reads around a block (0 without it)."""
    return math.ceil(truncate * sigma) if sigma > 0 else 0


@dataclass(frozen=True)
class CtRecipe:
    """How a volume's raw CT becomes the generator's input."""

    raw: RawLevels                      # the CT's own bone and background levels
    target: TargetLevels = DEFAULT_TARGET   # the checkpoint's (§2.5)
    sigma: float = 1.0                  # 3D Gaussian, voxels (0: off)
    halo: int = 4                       # voxels read around a block for the Gaussian
    cupping: Cupping | None = None      # fitted once per volume (None: no correction)
    context_halo: int = 0               # 2.5D: (k - 1) / 2 context slices each side


def smooth(raw: np.ndarray, inner: Region, grown: Region, halo: int, sigma: float,
           box: bool = False) -> np.ndarray:
    """3D Gaussian of the ``inner`` box, from ``raw`` read over ``grown`` (⊇ inner).

    Where ``grown`` stops short of ``inner`` ± halo, the volume border was hit: the block
    is reflected there (scipy's "reflect" = numpy's "symmetric"), exactly what a
    whole-volume filter does at its border. Elsewhere the real neighbours are used.
    With ``box`` the filter is a (2·halo + 1)³ mean instead (cheap; ``sigma`` unused).
    Float32 throughout, in one buffer of its own: the padded block is filtered in place and
    the result is a view of it (no copy of the crop); never a view of ``raw``.
    """
    data, crop = padded_for_filter(raw, inner, grown, halo, sigma, box)
    return filter_padded(data, crop, halo, sigma, box)


def padded_for_filter(raw: np.ndarray, inner: Region, grown: Region, halo: int, sigma: float,
                      box: bool = False) -> tuple[np.ndarray, tuple[slice, ...] | None]:
    """The first half of :func:`smooth`: a float32 buffer of its own holding ``raw`` mirrored
    out to ``inner`` ± halo, and the crop of ``inner`` in it (None: no filter, the buffer is
    ``inner`` already). A caller that drops ``raw`` now frees it before the filter runs."""
    if sigma <= 0 and not box:
        return np.array(np.asarray(raw)[relative(inner, grown)], np.float32), None
    pad = [(halo - (i.start - g.start), halo - (g.stop - i.stop))
           for i, g in zip(inner, grown, strict=True)]
    crop = tuple(slice(halo, halo + i.stop - i.start) for i in inner)
    return pad_symmetric(raw, pad), crop


def filter_padded(data: np.ndarray, crop: tuple[slice, ...] | None, halo: int, sigma: float,
                  box: bool = False) -> np.ndarray:
    """The second half of :func:`smooth`: filter ``data`` in place, return its crop (a view)."""
    if crop is None:
        return data
    if box:
        ndimage.uniform_filter(data, 2 * halo + 1, mode="reflect", output=data)
    else:
        ndimage.gaussian_filter(data, sigma, mode="reflect", radius=halo, output=data)
    return data[crop]


def pad_symmetric(raw: np.ndarray, pad: list[tuple[int, int]]) -> np.ndarray:
    """``np.pad(raw.astype(float32), pad, mode="symmetric")`` with one float32 allocation
    (the raw block is converted straight into the middle; the borders are mirrored copies)."""
    raw = np.asarray(raw)
    if any(b > n or a > n for (b, a), n in zip(pad, raw.shape, strict=True)):
        return np.pad(np.asarray(raw, np.float32), pad, mode="symmetric")  # multiple mirrors
    shape = tuple(n + b + a for (b, a), n in zip(pad, raw.shape, strict=True))
    out = np.empty(shape, np.float32)
    out[tuple(slice(b, b + n) for (b, _), n in zip(pad, raw.shape, strict=True))] = raw
    for d, ((b, a), n) in enumerate(zip(pad, raw.shape, strict=True)):
        def at(s: slice, d: int = d) -> tuple[slice, ...]:
            return (slice(None),) * d + (s,)
        if b:  # before: b-1 … 0 mirror b … 2b-1 (the edge repeated)
            out[at(slice(0, b))] = out[at(slice(2 * b - 1, b - 1, -1))]
        if a:
            end = b + n
            out[at(slice(end, end + a))] = out[at(slice(end - 1, end - a - 1 if end - a - 1 >= 0
                                                        else None, -1))]
    return out


def whole_volume_smooth(volume: np.ndarray, sigma: float, halo: int) -> np.ndarray:
    """The reference: the Gaussian over a whole in-memory volume."""
    data = np.asarray(volume, np.float32)
    return ndimage.gaussian_filter(data, sigma, mode="reflect", radius=halo) if sigma > 0 \
        else data


def corrected_read(source: Any, box: Region, reach: int, cupping: Cupping | None,
                   rounded: bool = False) -> tuple[np.ndarray, Region]:
    """Raw CT over ``box`` + ``reach`` voxels (clipped at the volume border), cupping-corrected
    when ``cupping`` is given (``rounded``: back to whole grey values); and that grown box."""
    grown = grow(box, reach, tuple(source.shape))
    raw = source.read(grown)
    if cupping is not None:  # a pure function of global (y, x): any block gets the same
        raw = apply_cupping(raw, cupping, (grown[1].start, grown[2].start))
        if rounded:
            raw = np.rint(raw)
    return raw, grown


def prepare_block(source: Any, box: Region, recipe: CtRecipe) -> np.ndarray:
    """The generator's input over ``box``: float32 in [-1, 1] (before any inversion)."""
    raw, grown = corrected_read(source, box, recipe.halo, recipe.cupping)
    data, crop = padded_for_filter(raw, box, grown, recipe.halo, recipe.sigma)
    del raw  # freed before the filter runs: one block-sized buffer from here on
    ct = filter_padded(data, crop, recipe.halo, recipe.sigma)
    return to_signed_inplace(ct, recipe.raw, recipe.target)


def prepare_context(source: Any, box: Region, axis: str, recipe: CtRecipe) -> np.ndarray:
    """:func:`prepare_block` over ``box`` plus a 2.5D model's context slices on each side
    along ``axis``; past the volume border they are mirrored (edge not repeated, as the tile
    engine pads planes), so each slice's planes never depend on the block."""
    h = recipe.context_halo
    if h == 0:
        return prepare_block(source, box, recipe)
    a = AXIS_INDEX[axis]
    wanted = reflect_index(np.arange(box[a].start - h, box[a].stop + h), source.shape[a])
    read = list(box)
    read[a] = slice(int(wanted.min()), int(wanted.max()) + 1)
    ct = prepare_block(source, tuple(read), recipe)  # type: ignore[arg-type]
    return np.take(ct, wanted - read[a].start, axis=a)
