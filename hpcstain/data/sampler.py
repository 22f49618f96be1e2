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

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from hpcstain.config import DataConfig
from hpcstain.ct.cupping import apply_cupping, fit_cupping, fit_slides
from hpcstain.ct.signed import ct16_to_signed, normalise_ct
from hpcstain.data.augment import (
    Geometry,
    apply_geometry,
    draw_geometry,
    draw_jitter,
    draw_scan,
    jitter_ct,
    jitter_histology,
    scan_ct,
)
from hpcstain.data.manifest import Pair, read_ct_slab, read_pair
from hpcstain.data.masks import load_or_compute_mask
from hpcstain.data.normalise import (
    Rois,
    Stretch,
    apply_stretch,
    boxes_to_mask,
    check_rois,
    ct_levels,
    find_pair_rois,
    histology_stretch,
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
    cupping: Any = None  # the hpcstain.ct.cupping.Cupping the CT was corrected with, if any
    context: np.ndarray | None = None  # (K, H, W) CT planes about the slice (2.5D input)

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
               cupping: Any = None, images: Any = None) -> Slide:
    """Read, normalise (§2.5) and mask (§2.8) one pair.

    Under ``data.cupping: radial`` the CT is cupping-corrected first with ``cupping`` (a
    :class:`~hpcstain.ct.cupping.Cupping` fitted on the whole set, see :func:`load_slides`),
    or, without one, with a fit on this slide alone. ``images``: the pair already read
    (:func:`~hpcstain.data.manifest.read_pair`), so it is not read again.
    """
    try:
        images = read_pair(pair) if images is None else images
        if cfg.cupping == "radial":  # the checkpoint records it (inference.Conventions)

            if cupping is None:  # a fit of this slide alone, recorded like a given one
                cupping = fit_cupping(images.ct, name=f"ct {pair.id}")
            images = replace(images, ct=apply_cupping(images.ct, cupping))
        rois = pair_rois(pair, images.ct, images.histology)
        bone, background = ct_levels(images.ct, rois)
        ct16 = normalise_ct(images.ct, bone, background, cfg.ct_bone_level,
                            cfg.ct_background_level)
        stretch = histology_stretch(images.histology, rois, cfg.stretch_c, cfg.stretch_c_prime)
        mask = load_or_compute_mask(pair, images, rois, cache_dir)
    except InputError as exc:
        raise InputError(f"{pair.source or pair.id} (id {pair.id}): {exc}") from None
    image = np.empty((4, *images.ct.shape), dtype=np.float32)
    image[0] = ct16_to_signed(ct16)
    image[1:4] = np.moveaxis(apply_stretch(images.histology, stretch), -1, 0)
    return Slide(pair.id, pair.material, image, mask, (bone, background), stretch,
                 rois.method, cupping if cfg.cupping == "radial" else None)


def load_slides(pairs: list[Pair], cfg: DataConfig, cache_dir: str | Path | None = None,
                cupping_fits: dict[tuple[int, int], Any] | None = None) -> list[Slide]:
    """Every pair normalised in memory; masks cached under ``cache_dir`` when given.

    Under ``data.cupping: radial`` each pair is read once: one fit per group of equally
    sized slides (:func:`~hpcstain.ct.cupping.fit_slides`), except for slide sizes that
    ``cupping_fits`` (shape → fit; e.g. the training set's, for validation) already has.
    Each slide records the fit it was corrected with (``Slide.cupping``).
    """
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    if cfg.cupping != "radial":
        return [load_slide(p, cfg, cache_dir) for p in pairs]
    images = [_read(p) for p in pairs]
    fits = _set_fits([im.ct for im in images], cupping_fits or {})
    slides = []
    for i, p in enumerate(pairs):
        im, images[i] = images[i], None   # keep only the slides still to be normalised
        slides.append(load_slide(p, cfg, cache_dir, fits[tuple(im.ct.shape)], im))
    return slides


def _read(pair: Pair) -> Any:
    try:
        return read_pair(pair)
    except InputError as exc:
        raise InputError(f"{pair.source or pair.id} (id {pair.id}): {exc}") from None


def _set_fits(cts: list[np.ndarray], known: dict[tuple[int, int], Any]
              ) -> dict[tuple[int, int], Any]:
    todo = [ct for ct in cts if tuple(ct.shape) not in known]
    return {**fit_slides(todo), **known}


def training_fits(slides: list[Slide]) -> dict[tuple[int, int], Any]:
    """Slide shape → the cupping fit its slides were corrected with (empty without)."""
    return {s.shape: s.cupping for s in slides if s.cupping is not None}


def with_context(slides: list[Slide], pairs: list[Pair], cfg: DataConfig, planes: int
                 ) -> list[Slide]:
    """Slides with their ``planes`` (odd) CT planes about the slice (``Slide.context``,
    (k, H, W) in [-1, 1]) for a 2.5D model; ``planes`` 1 returns ``slides`` unchanged.

    Every plane is normalised exactly like the slice: the slide's cupping fit (under
    ``data.cupping: radial``) and its §2.5 levels (measured on the slice's ROIs).
    """
    if planes <= 1:
        return slides
    by_id = {p.id: p for p in pairs}
    out = []
    for s in slides:
        pair = by_id[s.id]
        try:
            slab = read_ct_slab(pair, planes, s.shape)
        except InputError as exc:
            raise InputError(f"{pair.source or pair.id} (id {pair.id}): {exc}") from None
        if getattr(s, "cupping", None) is not None:
            slab = np.stack([apply_cupping(p, s.cupping) for p in slab])
        bone, background = s.ct_means
        ct16 = normalise_ct(slab, bone, background, cfg.ct_bone_level, cfg.ct_background_level)
        out.append(replace(s, context=ct16_to_signed(ct16).astype(np.float32, copy=False)))
    return out


def jitter_slab(slab: torch.Tensor, centre: torch.Tensor, brightness: float,
                contrast: float) -> torch.Tensor:
    """:func:`~hpcstain.data.augment.jitter_ct` of the centre slice applied to every plane
    (one mapping, from the centre's mean): the centre plane comes out bit for bit as the
    jittered slice."""
    m = ((centre + 1.0) * 0.5).mean()
    u = (slab + 1.0) * 0.5
    u = (u - m) * contrast + m * brightness
    return (u * 2.0 - 1.0).clamp_(-1.0, 1.0)


class PairedPatchDataset(Dataset):
    """Random, augmented, aligned CT/histology/mask patches from in-memory slides.

    With ``context_slices`` k > 1 items also hold ``"ct_context": (k, P, P)``, the slide's
    CT planes (:func:`with_context`) cropped, resampled, flipped, rotated and jittered
    exactly like the slice (and inverted with ``data.invert_ct``).

    Items: ``{"ct": (ct_channels, P, P), "histology": (3, P, P)`` float32 in [-1, 1],
    ``"mask": (1, P, P)`` float32 in {0, 1}, ``"pair": int`` (index into ``slides``)}.
    """

    def __init__(self, slides: list[Slide], cfg: DataConfig, ct_channels: int = 3,
                 seed: int = 0, augment: bool = True, mask_retries: int = MASK_RETRIES,
                 context_slices: int = 1) -> None:
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
        self.context_slices = int(context_slices)
        if self.context_slices > 1:
            k = self.context_slices
            bad = [s.id for s in slides if s.context is None or s.context.shape[0] < k]
            if bad:
                raise InputError(f"context_slices={k}: slides without {k} CT planes "
                                 f"(see with_context): {', '.join(bad)}")
            self._images = [torch.cat([im, torch.from_numpy(_centre_planes(s.context, k))])
                            for im, s in zip(self._images, slides, strict=True)]

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
        slab = image[4:] if self.context_slices > 1 else None
        if self.augment and (self.cfg.brightness_jitter > 0 or self.cfg.contrast_jitter > 0):
            j = draw_jitter(rng, self.cfg.brightness_jitter, self.cfg.contrast_jitter)
            if slab is not None:
                slab = jitter_slab(slab, ct, j.ct_brightness, j.ct_contrast)
            ct = jitter_ct(ct, j.ct_brightness, j.ct_contrast)
            hist = jitter_histology(hist, j.hist_brightness, j.hist_contrast)
        if self.augment and self.cfg.scan_augment > 0 and rng.random() < self.cfg.scan_augment:
            ct, slab = self._scanned(rng, ct, slab)
        if self.cfg.invert_ct:
            ct = -ct
            slab = -slab if slab is not None else None
        item = {"ct": ct.expand(self.ct_channels, -1, -1).contiguous(),
                "histology": hist.contiguous(), "mask": mask, "pair": k}
        if slab is not None:
            item["ct_context"] = slab.contiguous()
        return item


    def _scanned(self, rng: np.random.Generator, ct: torch.Tensor, slab: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`~hpcstain.data.augment.scan_ct` of the slice and its context planes: one
        draw; the slice stays the slab's centre plane, bit for bit."""
        d = draw_scan(rng, self.cfg.patch_size)
        bone, background = (float(ct16_to_signed(np.float32(v))) for v in
                            (self.cfg.ct_bone_level, self.cfg.ct_background_level))
        if slab is None:
            return scan_ct(ct, d, bone, background), None
        slab = scan_ct(slab, d, bone, background)
        c = slab.shape[0] // 2
        return slab[c:c + 1].clone(), slab


def _centre_planes(planes: np.ndarray, k: int) -> np.ndarray:
    c = planes.shape[0] // 2
    return np.ascontiguousarray(planes[c - k // 2:c + k // 2 + 1], np.float32)


class EpochSampler(Sampler[int]):
    """DistributedSampler whose epoch can be resumed part-way (skips consumed indices)."""

    def __init__(self, dataset: Any, world: int, rank: int, seed: int) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip:])

    def __len__(self) -> int:
        return len(self.inner) - self.skip
