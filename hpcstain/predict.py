"""Stain 2D slides with a trained checkpoint (§2.9 whole-slide inference).

One slide's path: raw CT → §2.5 normalisation (bone ROI mean → 30000, background ROI mean →
10000 on the 16-bit scale, the training convention read from the checkpoint; ROIs found by
:func:`~hpcstain.data.normalise.find_ct_rois` unless given, or the raw levels given
directly) → [-1, 1] → the generator over the global tile grid (:mod:`hpcstain.tiles`) →
uint8 RGB. With a correspondence mask, pixels outside it become the image's own mean
background colour (§2.8), measured over the background ROI.

The reverse direction (histology → CT) uses the CycleGAN's ``hist2ct`` generator; the
histology is white-balanced and stretched (§2.5) with ROIs from the histology alone.
Pix2Pix checkpoints have no such generator (``UsageError``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hpcstain.atomic import atomic_output, check_output
from hpcstain.ct.cupping import Cupping, apply_cupping, check_fit_choice, slide_fits
from hpcstain.ct.levels import DEFAULT_TARGET
from hpcstain.ct.signed import ct16_to_signed, normalise_ct, signed_to_ct16
from hpcstain.data.manifest import as_ct, as_mask, as_rgb
from hpcstain.data.normalise import (
    NORMALISED_BACKGROUND,
    Rois,
    check_rois,
    ct_levels,
    find_ct_rois,
    find_pair_rois,
    normalise_histology,
    signed_to_rgb8,
)
from hpcstain.data.readers import read_image, split_spec
from hpcstain.errors import InputError, UsageError
from hpcstain.inference import Stainer, load_generator
from hpcstain.metrics.patches import apply_mask
from hpcstain.tiles import (
    DEFAULT_TILING,
    TileFn,
    Tiling,
    auto_batch,
    check_tiling,
    plane_tiles,
    stain_image,
)

IMAGE_SUFFIXES = {".png": "png", ".tif": "tif", ".tiff": "tif"}
BACKGROUND_BAND = 0.25  # with given levels: background = CT within 25 % of the gap of its level


# --------------------------------------------------------------------------- checkpoint

# One inference path: the generator and its CT conventions come from hpcstain.inference.
load_stainer = load_generator


# --------------------------------------------------------------------------- pure core


def mean_colour(image: np.ndarray, region: np.ndarray, mask: np.ndarray | None = None
                ) -> np.ndarray:
    """Mean of ``image`` over ``region`` (else outside ``mask``, else everywhere), per channel."""
    for where in (region, None if mask is None else ~mask):
        if where is not None and where.any():
            return np.asarray(image[where], np.float64).mean(axis=0)
    return np.asarray(image, np.float64).reshape(-1, *image.shape[2:]).mean(axis=0)


def mask_outside(image: np.ndarray, mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """§2.8: pixels outside ``mask`` set to the image's mean over the background ``region``."""
    if mask.shape != image.shape[:2]:
        raise InputError(f"mask of shape {mask.shape} does not match the image "
                         f"{image.shape[0]}×{image.shape[1]}")
    return apply_mask(image, mask, mean_colour(image, region, mask))


def background_region(ct16: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    """Pixels of normalised CT within ``BACKGROUND_BAND`` of the gap from the background level."""
    bone, background = levels
    return np.abs(ct16 - background) <= BACKGROUND_BAND * abs(bone - background)


def normalised_ct(ct: np.ndarray, target: tuple[float, float],
                  levels: tuple[float, float] | None = None, rois: Rois | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(CT on the 16-bit training scale, background region) from raw levels or ROIs.

    ``levels`` are the raw (bone, background) means; without them they come from ``rois``,
    found by :func:`find_ct_rois` when not given.
    """
    if levels is None:
        rois = check_rois(rois if rois is not None else find_ct_rois(ct), "CT")
        levels = ct_levels(ct, rois)
    ct16 = normalise_ct(ct, levels[0], levels[1], target[0], target[1])
    region = rois.background if rois is not None else background_region(ct16, target)
    return ct16, region


def _channels(signed: np.ndarray, n: int) -> np.ndarray:
    """(H, W) → (n, H, W) by repetition."""
    return np.repeat(signed[None], n, axis=0)


def predict_slide(ct: np.ndarray, fn: TileFn, ct_channels: int = 3, *,
                  levels: tuple[float, float] | None = None, rois: Rois | None = None,
                  tiling: Tiling = DEFAULT_TILING, mask: np.ndarray | None = None,
                  target: tuple[float, float] = DEFAULT_TARGET, batch_size: int = 0,
                  size_multiple: int = 1, slab: np.ndarray | None = None) -> np.ndarray:
    """Raw CT slice (H, W) → stained RGB uint8 (H, W, 3) on the global tile grid.

    Tiles never exceed the slide (see :func:`hpcstain.tiles.plane_tiles`); sizes are
    rounded up to the generator's ``size_multiple``. A 2.5D generator (``ct_channels`` =
    its k input planes) takes ``slab``, the raw (k, H, W) CT planes about the slice, each
    normalised with the slice's levels.
    """
    ct = np.asarray(ct, np.float32)
    if slab is None:
        ct16, _ = normalised_ct(ct, target, levels, rois)
        image = _channels(ct16_to_signed(ct16), ct_channels)
    else:
        slab = np.asarray(slab, np.float32)
        if slab.ndim != 3 or slab.shape[0] != ct_channels or slab.shape[1:] != ct.shape:
            raise InputError(f"CT slab of shape {slab.shape}: the generator takes "
                             f"{ct_channels} planes of {ct.shape[0]}×{ct.shape[1]}")
        if levels is None:
            levels = ct_levels(ct, check_rois(rois if rois is not None else find_ct_rois(ct),
                                              "CT"))
        image = ct16_to_signed(normalise_ct(slab, levels[0], levels[1], target[0], target[1]))
    out = _stain(image, fn, tiling, batch_size, size_multiple)
    rgb = signed_to_rgb8(out, channel_axis=0)
    if mask is None:
        return rgb
    if np.asarray(mask).shape != rgb.shape[:2]:
        raise InputError(f"mask of shape {np.asarray(mask).shape} does not match the slide "
                         f"{rgb.shape[0]}×{rgb.shape[1]}")
    return apply_mask(rgb, np.asarray(mask, bool), NORMALISED_BACKGROUND)


def _stain(image: np.ndarray, fn: TileFn, tiling: Tiling, batch_size: int,
           size_multiple: int) -> np.ndarray:
    tile, step = plane_tiles(image.shape[-2:], tiling.tile, tiling.step, size_multiple,
                             max_tile=tiling.max_tile)
    return stain_image(image, fn, tile=tile, step=step, window=tiling.window,
                       batch_size=auto_batch(tile, "cpu", batch_size))


def histology_rois(rgb: np.ndarray) -> Rois:
    """ROIs from histology alone: slide background, and every stained tissue pixel as "bone".

    With no CT to pick the dense class, all tissue (neither slide background nor the black
    screw) stands in for bone, so ``f_min`` is the darkest tissue's 1st percentile.
    """
    rois = find_pair_rois(np.zeros(rgb.shape[:2], np.float32), rgb)
    return check_rois(Rois(rois.bone, rois.background, "auto-histology"), "histology")


def unstain_slide(rgb: np.ndarray, fn: TileFn, hist_channels: int = 3, *,
                  rois: Rois | None = None, tiling: Tiling = DEFAULT_TILING,
                  mask: np.ndarray | None = None, stretch_c: tuple[float, float] = (0.0, 0.0),
                  batch_size: int = 0, size_multiple: int = 1) -> np.ndarray:
    """Histology (H, W, 3) on the 0–255 scale → CT uint16 (H, W) on the 16-bit training scale."""
    rois = rois if rois is not None else histology_rois(rgb)
    signed, _ = normalise_histology(rgb, rois, *stretch_c)
    image = np.moveaxis(signed, -1, 0)[:hist_channels]
    out = _stain(image, fn, tiling, batch_size, size_multiple)
    ct16 = signed_to_ct16(out.mean(axis=0))
    if mask is None:
        return ct16
    return mask_outside(ct16[..., None], np.asarray(mask, bool), rois.background)[..., 0]


# --------------------------------------------------------------------------- files


def output_paths(inputs: Sequence[str], out: str | os.PathLike[str], reverse: bool = False
                 ) -> list[Path]:
    """Each input's output: ``out`` itself (one input, image suffix) or ``out/<stem>``."""
    out = Path(out)
    if not inputs:
        raise UsageError("no input slides given")
    if out.suffix.lower() in IMAGE_SUFFIXES:
        if len(inputs) != 1:
            raise UsageError(f"{out}: one output file for {len(inputs)} inputs; give a folder")
        return [out]
    suffix = ".tif" if reverse else ".png"
    paths = [out / (split_spec(s)[0].name.split(".")[0] + suffix) for s in inputs]
    seen: dict[Path, str] = {}
    for spec, path in zip(inputs, paths, strict=True):
        if path in seen:
            raise UsageError(f"{spec} and {seen[path]} would both be written to {path}")
        seen[path] = spec
    return paths


def _masks_for(inputs: Sequence[str], masks: str | Sequence[str] | None) -> list[str | None]:
    if masks is None:
        return [None] * len(inputs)
    masks = [masks] if isinstance(masks, str | os.PathLike) else list(masks)
    if len(masks) != len(inputs):
        raise UsageError(f"{len(masks)} mask(s) for {len(inputs)} input(s): give one per input")
    return [str(m) for m in masks]


def read_mask(spec: str, shape: tuple[int, ...]) -> np.ndarray:
    mask = as_mask(read_image(spec), f"mask {spec}")
    if mask.shape != shape[:2]:
        raise InputError(f"mask {spec}: shape {mask.shape[0]}×{mask.shape[1]} does not match "
                         f"the input {shape[0]}×{shape[1]}")
    return mask


def write_image(path: Path, image: np.ndarray, overwrite: bool = False) -> Path:
    """Write RGB uint8 or grey uint16 as PNG or TIFF (by suffix), atomically."""
    fmt = IMAGE_SUFFIXES.get(path.suffix.lower(), "png")
    with atomic_output(path, overwrite) as tmp:
        if fmt == "tif":
            import tifffile

            tifffile.imwrite(tmp, image, photometric="rgb" if image.ndim == 3 else None)
        else:
            from PIL import Image

            Image.fromarray(image).save(tmp, format="PNG")
    return path


def predict_image(spec: str, stainer: Stainer, tiling: Tiling, mask: str | None = None,
                  levels: tuple[float, float] | None = None, batch_size: int = 0,
                  cupping: Cupping | None = None) -> np.ndarray:
    """Read one slide and stain it (or unstain it, for a reverse stainer).

    A ``radial`` checkpoint's CT is cupping-corrected first with ``cupping`` (see
    :func:`slide_cuppings`); without one, with the checkpoint's stored fit for the
    slide's size, else with a fit on this slide (the set of one slide given).
    """
    data = read_image(spec)
    if stainer.reverse:
        rgb = as_rgb(data, f"histology {spec}")
        m = read_mask(mask, rgb.shape) if mask else None
        return unstain_slide(rgb, stainer.fn, stainer.in_channels, tiling=tiling, mask=m,
                             stretch_c=stainer.stretch_c, batch_size=batch_size,
                             size_multiple=stainer.conventions.size_multiple)
    slab = context_planes(data, stainer.context_slices, f"ct {spec}")
    ct = as_ct(data if slab is None else slab[len(slab) // 2], f"ct {spec}")
    if stainer.conventions.cupping == "radial":  # the checkpoint's CT preprocessing
        if cupping is None:
            (cupping,), _ = slide_fits(lambda _: ct, 1, stainer.conventions.stored_fits,
                                       names=[f"ct {spec}"])
        ct = apply_cupping(ct, cupping)
        if slab is not None:
            slab = np.stack([apply_cupping(p, cupping) for p in slab])
    m = read_mask(mask, ct.shape) if mask else None
    try:
        return predict_slide(ct, stainer.fn, stainer.in_channels, levels=levels, tiling=tiling,
                             mask=m, target=stainer.levels, batch_size=batch_size,
                             size_multiple=stainer.conventions.size_multiple, slab=slab)
    except InputError as exc:
        raise InputError(f"ct {spec}: {exc}") from None


def context_planes(data: np.ndarray, k: int, what: str) -> np.ndarray | None:
    """The centre ``k`` planes (float32) of a (K, H, W) CT stack for a 2.5D model; None for
    k = 1. A single slice (or an even stack) given to a k > 1 model is one InputError."""
    if k <= 1:
        return None
    a = np.asarray(data)
    if a.ndim != 3 or a.shape[0] % 2 == 0 or a.shape[0] < k or a.shape[-1] in (3, 4):
        raise InputError(f"{what}: this 2.5D model (context_slices={k}) needs the {k} CT "
                         f"planes about the slice: give a (K, H, W) stack with odd K >= {k} "
                         f"(multi-page TIFF, .npy, zarr), got shape {a.shape}")
    c = a.shape[0] // 2
    return a[c - k // 2:c + k // 2 + 1].astype(np.float32)


def slide_cuppings(inputs: Sequence[str], stainer: Stainer, choice: str = "checkpoint",
                   log: Callable[[str], None] | None = None) -> list[Cupping | None]:
    """Each CT input's cupping correction under a ``radial`` checkpoint (None for every
    input otherwise): ``choice`` as :func:`hpcstain.ct.cupping.slide_fits` (``checkpoint``: the
    training set's stored fit for slides of its size). A fallback is said in one ``log``
    line. Reads each CT once here (and again when it is stained)."""
    if stainer.reverse or stainer.conventions.cupping != "radial":
        check_fit_choice(choice)
        return [None] * len(inputs)
    k = stainer.context_slices

    def read_ct(i: int) -> np.ndarray:
        data, what = read_image(inputs[i]), f"ct {inputs[i]}"
        slab = context_planes(data, k, what)
        return as_ct(data if slab is None else slab[k // 2], what)

    fits, note = slide_fits(read_ct,
                            len(inputs), stainer.conventions.stored_fits, choice,
                            [f"ct {s}" for s in inputs])
    if note and log is not None:
        log(note)
    return list(fits)


def predict_files(inputs: Sequence[str], checkpoint: str | os.PathLike[str],
                  out: str | os.PathLike[str], *, masks: str | Sequence[str] | None = None,
                  tiling: Tiling = DEFAULT_TILING, device: str = "cpu", reverse: bool = False,
                  overwrite: bool = False, levels: tuple[float, float] | None = None,
                  batch_size: int = 0, cupping_fit: str = "checkpoint",
                  log: Callable[[str], None] | None = None) -> list[Path]:
    """Stain every input slide (TIFF/PNG/``.h5:/ds``/``.zarr:arr``); return the written paths.

    ``out`` is a file (one input; ``.png``/``.tif``) or a folder (``<stem>.png``, reverse
    ``<stem>.tif`` uint16 CT). Every output is checked before any work, and each is written
    whole or not at all. ``cupping_fit`` (``checkpoint``/``set``/``slide``) chooses the
    cupping correction of a ``radial`` checkpoint (:func:`slide_cuppings`).
    """
    check_tiling(tiling.tile, tiling.step, tiling.window)
    if reverse and levels is not None:
        raise UsageError("CT levels apply to CT input only, not to --reverse (histology input)")
    paths = output_paths(list(inputs), out, reverse)
    mask_specs = _masks_for(inputs, masks)
    for path in paths:
        check_output(path, overwrite)
    stainer = load_stainer(checkpoint, device, reverse)
    cuppings = slide_cuppings(list(inputs), stainer, cupping_fit, log)
    for spec, mask, path, cup in zip(inputs, mask_specs, paths, cuppings, strict=True):
        image = predict_image(spec, stainer, tiling, mask, levels, batch_size, cup)
        write_image(path, image, overwrite)
    return paths
