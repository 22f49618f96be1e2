"""SSIM and PSNR with scikit-image semantics, vectorised over stacks of patches (§2.10).

SSIM: 7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (×49/48), mean of the
SSIM map over the valid region (3-pixel border cropped), then the mean over channels, as
``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255)``.
PSNR: ``10 log10(L² / MSE)`` with L = ``data_range`` (255 for 8-bit RGB); inf when equal.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from hpcstain.errors import InputError

K1, K2, WIN_SIZE = 0.01, 0.03, 7
GROUP = 32  # patches per filtering pass (bounds peak memory)


def _as_nhwc(a: np.ndarray, b: np.ndarray, batched: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 (N, H, W, C) after checking they match."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise InputError(f"cannot compare images of shapes {a.shape} and {b.shape}")
    base = 3 if batched else 2
    if a.ndim not in (base, base + 1):
        kind = "(N, H, W[, C])" if batched else "(H, W[, C])"
        raise InputError(f"need images shaped {kind}, got {a.shape}")
    if a.ndim == base:
        a, b = a[..., None], b[..., None]
    if not batched:
        a, b = a[None], b[None]
    return a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, win: int) -> np.ndarray:
    """Full SSIM map (N, H, W, C) of two float64 stacks (scikit-image's formula, no crop)."""
    size = (1, win, win, 1)
    ux, uy = uniform_filter(x, size), uniform_filter(y, size)
    uxx, uyy = uniform_filter(x * x, size), uniform_filter(y * y, size)
    uxy = uniform_filter(x * y, size)
    cov_norm = win * win / (win * win - 1)
    vx, vy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def _ssim_group(x: np.ndarray, y: np.ndarray, data_range: float, win: int) -> np.ndarray:
    s = ssim_map(x, y, data_range, win)
    pad = (win - 1) // 2
    valid = s[:, pad:s.shape[1] - pad, pad:s.shape[2] - pad, :]
    return valid.mean(axis=(1, 2)).mean(axis=1)


def ssim_batch(a: np.ndarray, b: np.ndarray, data_range: float = 255.0,
               win_size: int = WIN_SIZE) -> np.ndarray:
    """SSIM of each pair in two (N, H, W[, C]) stacks → (N,) float64."""
    x, y = _as_nhwc(a, b, batched=True)
    if min(x.shape[1:3]) < win_size:
        raise InputError(f"SSIM needs patches of at least {win_size}×{win_size}, got "
                         f"{x.shape[1]}×{x.shape[2]}")
    return np.concatenate([_ssim_group(x[i:i + GROUP], y[i:i + GROUP], data_range, win_size)
                           for i in range(0, len(x), GROUP)] or [np.zeros(0)])


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM of two (H, W[, C]) images (channels last), as scikit-image computes it."""
    x, y = _as_nhwc(a, b, batched=False)
    return float(ssim_batch(x, y, data_range)[0])


def psnr_batch(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """PSNR in dB of each pair in two (N, H, W[, C]) stacks → (N,); inf where identical."""
    x, y = _as_nhwc(a, b, batched=True)
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB of two (H, W[, C]) images; inf when they are equal."""
    x, y = _as_nhwc(a, b, batched=False)
    return float(psnr_batch(x, y, data_range)[0])
