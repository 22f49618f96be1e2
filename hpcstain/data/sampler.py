"""Normalised whole slides in memory and the §2.7 random patch sampler over them.

:func:`load_slides` reads, validates and normalises every pair once (CT and histology to
[-1, 1], correspondence mask from the cache) and keeps each slide as one float32
``(4, H, W)`` array (CT, R, G, B) plus a uint8 mask, so a patch is a crop + one resample.

:class:`PairedPatchDataset` is a map-style dataset of ``len(slides) * patches_per_pair``
patches; index ``i`` reads slide ``i % len(slides)``. Every random choice of item ``i``
comes from ``np.random.default_rng([seed, epoch, i])``: the same run gives the same
patches whatever the number of loader workers, and with ``DistributedSampler`` each rank
draws different indices, hence different patches. Without augmentation (validation) the
patches do not depend on the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hpcstain.config import DataConfig
from hpcstain.data.augment import (
    Geometry,
    apply_geometry,
    draw_geometry,
    draw_jitter,
    jitter_ct,
    jitter_histology,
)
from hpcstain.data.manifest import Pair, read_pair
from hpcstain.data.masks import load_or_compute_mask
from hpcstain.data.normalise import (
    Rois,
    Stretch,
    apply_stretch,
    boxes_to_mask,
    check_rois,
    ct16_to_unit,
    ct_levels,
    find_pair_rois,
    histology_stretch,
    normalise_ct,
)
from hpcstain.errors import InputError

MASK_RETRIES = 10


@dataclass
class Slide:
    """One normalised pair in memory: ``image`` (4, H, W) = CT, R, G, B in [-1, 1]."""

    id: str
    material: str
    image: np.ndarray
    mask: np.ndarray  # (H, W) bool
    ct_means: tuple[float, float] = (0.0, 0.0)  # raw CT (bone, background) means
    stretch: Stretch | None = None
    roi_method: str = "manifest"

    @property
    def ct(self) -> np.ndarray:
        return self.image[0]

    @property
    def histology(self) -> np.ndarray:
        return self.image[1:4]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.image.shape[1]), int(self.image.shape[2]))


def pair_rois(pair: Pair, ct: np.ndarray, rgb: np.ndarray) -> Rois:
    """ROIs from the manifest's boxes; whichever is missing is found automatically."""
    given = {name: boxes_to_mask(boxes, ct.shape) for name, boxes in
             (("bone", pair.bone_roi), ("background", pair.background_roi)) if boxes}
    if len(given) == 2:
        rois = Rois(given["bone"], given["background"], "manifest")
    else:
        auto = find_pair_rois(ct, rgb)
        empty = np.zeros(ct.shape, dtype=bool)
        bone = given.get("bone", auto.bone & ~given.get("background", empty))
        background = given.get("background", auto.background & ~given.get("bone", empty))
        rois = Rois(bone, background, "manifest+auto" if given else auto.method)
    return check_rois(rois, "ROIs")


def load_slide(pair: Pair, cfg: DataConfig, cache_dir: str | Path | None = None,
               cupping: Any = None) -> Slide:
    """Read, normalise (§2.5) and mask (§2.8) one pair.

    Under ``data.cupping: radial`` the CT is cupping-corrected first with ``cupping`` (a
    :class:`~hpcstain.cupping.Cupping` fitted on the whole set, see :func:`load_slides`),
    or, without one, with a fit on this slide alone.
    """
    try:
        images = read_pair(pair)
        if cfg.cupping == "radial":  # the checkpoint records it (inference.Conventions)
            from hpcstain.cupping import apply_cupping, correct_slide

            ct = apply_cupping(images.ct, cupping) if cupping is not None else \
                correct_slide(images.ct, name=f"ct {pair.id}")
            images = replace(images, ct=ct)
        rois = pair_rois(pair, images.ct, images.histology)
        bone, background = ct_levels(images.ct, rois)
        ct16 = normalise_ct(images.ct, bone, background, cfg.ct_bone_level,
                            cfg.ct_background_level)
        stretch = histology_stretch(images.histology, rois, cfg.stretch_c, cfg.stretch_c_prime)
        mask = load_or_compute_mask(pair, images, rois, cache_dir)
    except InputError as exc:
        raise InputError(f"{pair.source or pair.id} (id {pair.id}): {exc}") from None
    image = np.empty((4, *images.ct.shape), dtype=np.float32)
    image[0] = ct16_to_unit(ct16)
    image[1:4] = np.moveaxis(apply_stretch(images.histology, stretch), -1, 0)
    return Slide(pair.id, pair.material, image, mask, (bone, background), stretch, rois.method)


def load_slides(pairs: list[Pair], cfg: DataConfig, cache_dir: str | Path | None = None
                ) -> list[Slide]:
    """Every pair normalised in memory; masks cached under ``cache_dir`` when given."""
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    fits = set_cupping(pairs) if cfg.cupping == "radial" else {}
    return [load_slide(p, cfg, cache_dir, fits.get(p.id)) for p in pairs]


def set_cupping(pairs: list[Pair]) -> dict[str, Any]:
    """One cupping fit per group of equally sized CT slides (axial sections of one
    acquisition share the scanner's cupping; one slide alone holds too few voxels for a
    stable fit): pair id → :class:`~hpcstain.cupping.Cupping`."""
    from hpcstain.cupping import MAX_FIT_VOXELS, fit_cupping

    shapes: dict[str, tuple[int, ...]] = {}
    for p in pairs:
        try:
            shapes[p.id] = tuple(read_pair(p).ct.shape)
        except InputError as exc:
            raise InputError(f"{p.source or p.id} (id {p.id}): {exc}") from None
    out: dict[str, Any] = {}
    for shape in sorted(set(shapes.values())):
        ids = [p for p in pairs if shapes[p.id] == shape]
        step = max(1, int(np.ceil(np.sqrt(len(ids) * shape[0] * shape[1] / MAX_FIT_VOXELS))))
        stack = np.stack([read_pair(p).ct[::step, ::step] for p in ids])
        fit = fit_cupping(stack, np.arange(0, shape[0], step), np.arange(0, shape[1], step),
                          plane=(shape[0], shape[1]),
                          name=f"{len(ids)} CT slides of {shape[0]}×{shape[1]}")
        out.update({p.id: fit for p in ids})
    return out


class PairedPatchDataset(Dataset):
    """Random, augmented, aligned CT/histology/mask patches from in-memory slides.

    Items: ``{"ct": (ct_channels, P, P), "histology": (3, P, P)`` float32 in [-1, 1],
    ``"mask": (1, P, P)`` float32 in {0, 1}, ``"pair": int`` (index into ``slides``)}.
    """

    def __init__(self, slides: list[Slide], cfg: DataConfig, ct_channels: int = 3,
                 seed: int = 0, augment: bool = True, mask_retries: int = MASK_RETRIES
                 ) -> None:
        if not slides:
            raise InputError("no slides to sample patches from")
        if ct_channels < 1:
            raise InputError(f"ct_channels must be ≥ 1, got {ct_channels}")
        p = cfg.patch_size
        small = [f"{s.id} ({s.shape[0]}×{s.shape[1]})" for s in slides if min(s.shape) < p]
        if small:
            raise InputError(f"slides smaller than the {p}×{p} patch size: {', '.join(small)}")
        if not 0 < cfg.rescale_min <= cfg.rescale_max:
            raise InputError(f"data.rescale_min/max: need 0 < min ≤ max, got "
                             f"{cfg.rescale_min}, {cfg.rescale_max}")
        self.slides = slides
        self.cfg = cfg
        self.ct_channels = ct_channels
        self.seed = int(seed)
        self.augment = augment
        self.mask_retries = mask_retries
        self.epoch = 0
        self._images = [torch.from_numpy(s.image) for s in slides]
        self._masks = [torch.from_numpy(s.mask.astype(np.uint8)) for s in slides]

    def __len__(self) -> int:
        return len(self.slides) * self.cfg.patches_per_pair

    def set_epoch(self, epoch: int) -> None:
        """New augmentations each epoch (call before iterating, like DistributedSampler)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if self.augment else 0, index])

    def _geometry(self, rng: np.random.Generator, k: int) -> Geometry:
        """Draw crops until the mask covers ``min_mask_coverage`` (bounded; best kept)."""
        cfg, shape = self.cfg, self.slides[k].shape
        scale = (cfg.rescale_min, cfg.rescale_max) if self.augment else (1.0, 1.0)
        flips = cfg.flips and self.augment
        rot90 = cfg.rot90 and self.augment
        best, best_cov = None, -1.0
        for _ in range(self.mask_retries + 1):
            g = draw_geometry(rng, shape, cfg.patch_size, scale, flips, rot90)
            if cfg.min_mask_coverage <= 0:
                return g
            region = self._masks[k][g.y0:g.y0 + g.size, g.x0:g.x0 + g.size]
            cov = float(region.sum()) / region.numel()
            if cov >= cfg.min_mask_coverage:
                return g
            if cov > best_cov:
                best, best_cov = g, cov
        assert best is not None
        return best

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = index % len(self.slides)
        rng = self.rng(index)
        g = self._geometry(rng, k)
        image, mask = apply_geometry(self._images[k], self._masks[k], g, self.cfg.patch_size)
        ct, hist = image[0:1], image[1:4]
        if self.augment and (self.cfg.brightness_jitter > 0 or self.cfg.contrast_jitter > 0):
            j = draw_jitter(rng, self.cfg.brightness_jitter, self.cfg.contrast_jitter)
            ct = jitter_ct(ct, j.ct_brightness, j.ct_contrast)
            hist = jitter_histology(hist, j.hist_brightness, j.hist_contrast)
        if self.cfg.invert_ct:
            ct = -ct
        return {"ct": ct.expand(self.ct_channels, -1, -1).contiguous(),
                "histology": hist.contiguous(), "mask": mask, "pair": k}

