"""The §2.10 patch protocol and the §2.8 masking convention.

Whole-slide output and reference (H, W, 3) uint8 are cut into 256×256 patches on a
non-overlapping grid from (0, 0); the partial patches at the bottom/right border are left
out. Patches with less than 50 % correspondence-mask coverage are excluded; the others get
SSIM, PSNR and, when asked, LPIPS and FRC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from hpcstain.errors import InputError
from hpcstain.metrics.frc import frc
from hpcstain.metrics.lpips import LPIPS, lpips_batch
from hpcstain.metrics.similarity import psnr_batch, ssim_batch

PATCH = 256
MIN_COVERAGE = 0.5


@dataclass(frozen=True)
class PatchScore:
    """Metrics of one kept patch; ``row``/``col`` are its top-left pixel."""

    row: int
    col: int
    coverage: float
    ssim: float
    psnr: float
    lpips: float | None = None
    frc_px: float | None = None
    frc_um: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def patch_grid(shape: tuple[int, int], patch: int = PATCH) -> list[tuple[slice, slice]]:
    """Whole patches of a non-overlapping grid from (0, 0), row-major."""
    return [(slice(r, r + patch), slice(c, c + patch))
            for r in range(0, shape[0] - patch + 1, patch)
            for c in range(0, shape[1] - patch + 1, patch)]


def mask_coverage(mask: np.ndarray, patches: Sequence[tuple[slice, slice]]) -> np.ndarray:
    """Fraction of each patch inside the (H, W) correspondence mask."""
    m = np.asarray(mask, dtype=bool)
    return np.array([m[p].mean() for p in patches], dtype=np.float64)


def apply_mask(rgb: np.ndarray, mask: np.ndarray, background_rgb: Sequence[float]) -> np.ndarray:
    """§2.8: pixels outside ``mask`` set to the mean background colour (dtype kept)."""
    rgb = np.asarray(rgb)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise InputError(f"mask of shape {mask.shape} does not match image {rgb.shape}")
    bg = np.asarray(background_rgb, dtype=np.float64)
    if bg.shape != rgb.shape[2:]:
        raise InputError(f"background colour {tuple(bg)} does not match image {rgb.shape}")
    if np.issubdtype(rgb.dtype, np.integer):
        info = np.iinfo(rgb.dtype)
        bg = np.clip(np.rint(bg), info.min, info.max)
    out = rgb.copy()
    out[~mask] = bg.astype(rgb.dtype)
    return out


def _check_pair(output: np.ndarray, reference: np.ndarray, mask: np.ndarray | None) -> None:
    if output.shape != reference.shape or output.ndim != 3 or output.shape[-1] != 3:
        raise InputError(f"need RGB output and reference of one shape (H, W, 3), got "
                         f"{output.shape} and {reference.shape}")
    if mask is not None and np.shape(mask) != output.shape[:2]:
        raise InputError(f"mask of shape {np.shape(mask)} does not match image {output.shape}")


def evaluate_patches(output: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                     *, patch: int = PATCH, min_coverage: float = MIN_COVERAGE,
                     background_rgb: Sequence[float] | None = None, lpips: LPIPS | None = None,
                     with_frc: bool = False, frc_threshold: str = "1/7",
                     pixel_size_um: float | None = None) -> list[PatchScore]:
    """Per-patch scores of ``output`` against ``reference`` for patches kept by the mask.

    With ``background_rgb`` both images are masked first (§2.8); without a mask every whole
    patch is kept with coverage 1.
    """
    output, reference = np.asarray(output), np.asarray(reference)
    _check_pair(output, reference, mask)
    patches = patch_grid(output.shape[:2], patch)
    if mask is None:
        coverage = np.ones(len(patches))
    else:
        coverage = mask_coverage(mask, patches)
        if background_rgb is not None:
            output = apply_mask(output, mask, background_rgb)
            reference = apply_mask(reference, mask, background_rgb)
    kept = [i for i in range(len(patches)) if coverage[i] >= min_coverage]
    if not kept:
        return []
    out = np.stack([output[patches[i]] for i in kept])
    ref = np.stack([reference[patches[i]] for i in kept])
    ssims, psnrs = ssim_batch(out, ref), psnr_batch(out, ref)
    lp = lpips_batch(lpips, out, ref) if lpips is not None else [None] * len(kept)
    scores = []
    for j, i in enumerate(kept):
        res = frc(out[j], ref[j], frc_threshold, pixel_size_um) if with_frc else None
        scores.append(PatchScore(
            row=patches[i][0].start, col=patches[i][1].start, coverage=float(coverage[i]),
            ssim=float(ssims[j]), psnr=float(psnrs[j]),
            lpips=None if lp[j] is None else float(lp[j]),
            frc_px=None if res is None else res.resolution_px,
            frc_um=None if res is None else res.resolution_um))
    return scores


def medians(scores: Sequence[PatchScore]) -> dict[str, float | int | None]:
    """Median of every metric over patches (None where not computed), plus the patch count."""
    out: dict[str, float | int | None] = {"patches": len(scores)}
    for name in ("ssim", "psnr", "lpips", "frc_px", "frc_um"):
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        out[name] = float(np.median(values)) if values else None
    return out
