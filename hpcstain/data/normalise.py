"""§2.5 normalisation of a pair from its bone and background ROIs: the ROIs, the CT's raw
levels from them (:func:`ct_levels`; the CT → [-1, 1] map itself is
:func:`hpcstain.ct.signed.ct_to_signed`), and the histology's white balance and stretch.

Histology (0–255 RGB): white balance with per-channel gains ``mean(µ) / µ_c`` from the
mean background colour µ (so µR = µG = µB), then one contrast stretch for all channels
between ``f_min = max(min_c P1_c(bone) - c, 10)`` and
``f_max = min(max_c P99_c(background) + c', 255)``: ``u = (v - f_min) / (f_max - f_min)``
→ ``2u - 1`` clipped to [-1, 1]. One map on every channel keeps the hue: colour
differences keep their direction, and RGB ratios measured from the black point f_min are
unchanged. :func:`signed_to_rgb8` maps network outputs back to uint8 in that stretched space.

ROIs come from the manifest (boxes) or :func:`find_pair_rois` (see docs/data.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hpcstain.ct.levels import RawLevels, estimate_ct_levels, level_masks, require_confident
from hpcstain.errors import InputError

F_MIN_FLOOR = 10.0
F_MAX_CEIL = 255.0
MIN_ROI_PIXELS = 16
# §2.8 fills pixels outside the correspondence mask with the mean background. The model is
# never trained outside the mask, so its own background is arbitrary; the §2.5 stretch puts
# the 99th percentile of the slide background at 255, which leaves its mean at ~250, neutral.
NORMALISED_BACKGROUND = (250.0, 250.0, 250.0)
SCREW_TRANSMISSION = 0.35   # histology: opaque implant passes < 35 % of the background light


# --------------------------------------------------------------------------- ROIs


@dataclass
class Rois:
    """Boolean bone and background ROI masks of one pair (same shape as the CT)."""

    bone: np.ndarray
    background: np.ndarray
    method: str = "manifest"


def boxes_to_mask(boxes: tuple[tuple[int, int, int, int], ...], shape: tuple[int, ...]
                  ) -> np.ndarray:
    """Union of half-open boxes ``(y0, y1, x0, x1)`` as a bool mask of ``shape``."""
    m = np.zeros(shape[:2], dtype=bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def trim_outliers(values: np.ndarray, region: np.ndarray, k: float = 3.0) -> np.ndarray:
    """``region`` minus pixels whose value is more than k robust sigmas from its median."""
    v = values[region]
    if v.size == 0:
        return region
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    if mad == 0.0:
        return region & (values == med)
    return region & (np.abs(values - med) <= k * mad)


def bright_mode(values: np.ndarray, bins: int = 128, min_fraction: float = 0.02) -> float:
    """Centre of the brightest histogram peak holding at least ``min_fraction`` of values."""
    lo, hi = np.percentile(values, [0.1, 99.9])
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(values, bins=bins, range=(float(lo), float(hi)))
    smooth = ndimage.gaussian_filter1d(hist.astype(np.float64), 1.0)
    padded = np.concatenate([[-1.0], smooth, [-1.0]])
    peaks = np.flatnonzero((padded[1:-1] >= padded[:-2]) & (padded[1:-1] >= padded[2:]))
    mass = np.array([hist[max(i - 3, 0):i + 4].sum() for i in peaks]) / max(values.size, 1)
    good = peaks[mass >= min_fraction]
    i = int(good.max()) if good.size else int(np.argmax(smooth))
    return float(0.5 * (edges[i] + edges[i + 1]))


def slide_background(rgb: np.ndarray) -> np.ndarray:
    """Slide background of a histology image: pixels near the brightest common colour."""
    light = rgb.mean(axis=-1)
    level = bright_mode(light[::2, ::2].ravel())
    width = max(float(np.ptp(light)) / 64.0, 2.0)
    near = np.abs(light - level) <= width
    colour = np.median(rgb[near], axis=0)
    dist = np.linalg.norm(rgb - colour, axis=-1)
    spread = 1.4826 * float(np.median(dist[near]))
    return dist <= max(4.0 * spread, 15.0)


def find_pair_rois(ct: np.ndarray, rgb: np.ndarray) -> Rois:
    """Bone and background ROIs of a co-registered pair, using both modalities.

    Background: the slide's near-white surroundings in histology, with CT outliers (tube
    wall, air outside it when a minority) trimmed. Bone: stained tissue (neither slide
    background nor the black, opaque screw) whose CT is in the dense Otsu class, trimmed of
    CT outliers (screw rims, wall). Both ROIs keep a margin of 2–3 px from class edges.
    """
    bg_h = ndimage.binary_opening(slide_background(rgb), iterations=1)
    bg_colour = np.median(rgb[bg_h], axis=0) if bg_h.any() else rgb.reshape(-1, 3).max(0)
    screw_h = rgb.max(axis=-1) < SCREW_TRANSMISSION * float(bg_colour.max())
    tissue = ~ndimage.binary_dilation(bg_h, iterations=2)
    tissue &= ~ndimage.binary_dilation(screw_h, iterations=3)
    bone = np.zeros_like(tissue)
    if tissue.sum() >= MIN_ROI_PIXELS:
        from skimage.filters import threshold_otsu

        vals = ct[tissue]
        t = threshold_otsu(vals) if vals.min() < vals.max() else vals.min() - 1
        bone = trim_outliers(ct, tissue & (ct > t))
    background = trim_outliers(ct, ndimage.binary_erosion(bg_h, iterations=2))
    return Rois(bone=bone, background=background, method="auto-pair")


def find_ct_rois(ct: np.ndarray) -> Rois:
    """Bone and background ROIs from CT alone (no histology, e.g. at inference).

    The levels come from the one CT-only estimator, :func:`hpcstain.ct.levels.estimate_ct_levels`
    (histogram classes; a metal screw, a homogeneous implant, the tube wall and cupping are
    handled; docs/volume.md "CT levels"). Each ROI holds the voxels of its class within a
    band centred on the estimated level, so ``ct_levels(ct, rois)`` gives the estimate. An
    ambiguous estimate is an InputError naming the levels to pass instead.
    """
    est = require_confident(estimate_ct_levels(np.asarray(ct), "CT"))
    bone, background = level_masks(ct, est)
    return Rois(bone=bone, background=background, method="auto-ct")


def check_rois(rois: Rois, what: str) -> Rois:
    for name in ("bone", "background"):
        n = int(getattr(rois, name).sum())
        if n < MIN_ROI_PIXELS:
            raise InputError(f"{what}: {name} ROI has {n} pixel(s) ({rois.method}); give "
                             f"{name}_roi as y0:y1,x0:x1 in the manifest")
    if (rois.bone & rois.background).any():
        raise InputError(f"{what}: bone and background ROIs overlap")
    return rois


# --------------------------------------------------------------------------- CT


def ct_levels(ct: np.ndarray, rois: Rois) -> RawLevels:
    """(mean over bone ROI, mean over background ROI) of the raw CT."""
    return RawLevels(float(ct[rois.bone].mean(dtype=np.float64)),
                     float(ct[rois.background].mean(dtype=np.float64)))


# --------------------------------------------------------------------------- histology


@dataclass(frozen=True)
class Stretch:
    """White-balance gains and the shared contrast-stretch bounds of one slide."""

    gains: tuple[float, float, float]
    f_min: float
    f_max: float


def histology_stretch(rgb: np.ndarray, rois: Rois, c: float = 0.0, c_prime: float = 0.0
                      ) -> Stretch:
    """§2.5 constants of one slide from its bone and background ROIs (0–255 RGB)."""
    mu = rgb[rois.background].mean(axis=0, dtype=np.float64)
    if (mu <= 0).any():
        raise InputError(f"histology background mean {mu.round(2).tolist()} has a zero "
                         "channel: cannot white-balance")
    gains = mu.mean() / mu
    bone = rgb[rois.bone] * gains
    background = rgb[rois.background] * gains
    f_min = max(float(np.percentile(bone, 1, axis=0).min()) - c, F_MIN_FLOOR)
    f_max = min(float(np.percentile(background, 99, axis=0).max()) + c_prime, F_MAX_CEIL)
    if f_max - f_min < 1.0:
        raise InputError(f"histology stretch bounds f_min={f_min:.1f} ≥ f_max={f_max:.1f}: "
                         "bone is not darker than the background")
    return Stretch((float(gains[0]), float(gains[1]), float(gains[2])), f_min, f_max)


def apply_stretch(rgb: np.ndarray, s: Stretch) -> np.ndarray:
    """0–255 RGB (H, W, 3) → white-balanced, stretched float32 in [-1, 1]."""
    gains = np.asarray(s.gains, dtype=np.float32)
    scale = np.float32(2.0 / (s.f_max - s.f_min))
    u = (rgb.astype(np.float32) * gains - np.float32(s.f_min)) * scale - np.float32(1.0)
    return np.clip(u, -1.0, 1.0)


def normalise_histology(rgb: np.ndarray, rois: Rois, c: float = 0.0, c_prime: float = 0.0
                        ) -> tuple[np.ndarray, Stretch]:
    """Raw 0–255 RGB + ROIs → (normalised float32 (H, W, 3) in [-1, 1], its constants)."""
    s = histology_stretch(rgb, rois, c, c_prime)
    return apply_stretch(rgb, s), s


def rgb8_to_signed(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB → [-1, 1] float32 (no normalisation), e.g. for reference images."""
    return rgb.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def signed_to_rgb8(signed: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    """Network output in [-1, 1] → uint8 RGB (H, W, 3), channels moved last."""
    u = np.moveaxis(np.asarray(signed, dtype=np.float32), channel_axis, -1)
    return np.rint((np.clip(u, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
