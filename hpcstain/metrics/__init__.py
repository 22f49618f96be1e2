"""Image-quality metrics (§2.10, S3) and tiling/stripe artefact indices."""

from hpcstain.metrics.frc import FRCResult, frc
from hpcstain.metrics.lpips import LPIPS, LpipsUnavailable, load_lpips, lpips_batch, try_load_lpips
from hpcstain.metrics.patches import PatchScore, apply_mask, evaluate_patches, medians, patch_grid
from hpcstain.metrics.seams import seam_index
from hpcstain.metrics.similarity import psnr, psnr_batch, ssim, ssim_batch
from hpcstain.metrics.stripes import stripe_index, stripe_indices

__all__ = [
    "LPIPS", "FRCResult", "LpipsUnavailable", "PatchScore", "apply_mask", "evaluate_patches",
    "frc", "load_lpips", "lpips_batch", "medians", "patch_grid", "psnr", "psnr_batch",
    "seam_index", "ssim", "ssim_batch", "stripe_index", "stripe_indices", "try_load_lpips",
]
