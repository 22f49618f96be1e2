"""Fourier ring correlation between two images (supplement S3; Nieuwenhuizen et al. 2013).

``FRC(q) = Re Σ_ring F1 F2* / sqrt(Σ_ring |F1|² Σ_ring |F2|²)`` over rings of one
frequency bin (1/N cycles per pixel, N the shorter patch edge) up to Nyquist. Each image is
made zero-mean and apodised with a Tukey window (α = 0.25) first, so the patch border does
not add a spurious cross to the spectrum. RGB inputs are averaged over channels.

The resolution is ``1 / q_c`` pixels, where ``q_c`` is the first crossing of the curve below
the threshold (linear interpolation between bins): the fixed ``1/7`` threshold (default,
as in Nieuwenhuizen et al.) or the ``half-bit`` threshold of van Heel & Schatz (2005),
which depends on the number of pixels in each ring. A curve that never drops below it is
reported at the Nyquist limit (2 px) with ``at_nyquist=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal.windows import tukey

from hpcstain.errors import InputError, UsageError

THRESHOLDS = ("1/7", "half-bit")


@dataclass(frozen=True)
class FRCResult:
    """FRC curve and the resolution it implies."""

    frequencies: np.ndarray  # cycles per pixel, one per ring (ring 0 = DC excluded)
    frc: np.ndarray
    threshold: np.ndarray
    resolution_px: float
    resolution_um: float | None
    at_nyquist: bool


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image.mean(axis=-1)
    if image.ndim != 2 or min(image.shape) < 8:
        raise InputError(f"FRC needs a 2D (H, W[, C]) image of at least 8×8, got {image.shape}")
    return image


def _apodise(image: np.ndarray, alpha: float = 0.25) -> np.ndarray:
    win = np.outer(tukey(image.shape[0], alpha), tukey(image.shape[1], alpha))
    return (image - image.mean()) * win


def ring_index(shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Ring number of every FFT sample and the number of rings up to Nyquist."""
    n = min(shape)
    qy = np.fft.fftfreq(shape[0])[:, None]
    qx = np.fft.fftfreq(shape[1])[None, :]
    rings = np.rint(np.sqrt(qy**2 + qx**2) * n).astype(np.int64)
    return rings, n // 2


def frc_threshold(kind: str, ring_sizes: np.ndarray) -> np.ndarray:
    """Threshold curve: constant 1/7, or the half-bit curve for rings of ``ring_sizes`` pixels."""
    if kind == "1/7":
        return np.full(len(ring_sizes), 1 / 7)
    if kind == "half-bit":
        root = np.sqrt(np.maximum(ring_sizes, 1))
        return (0.2071 + 1.9102 / root) / (1.2071 + 0.9102 / root)
    raise UsageError(f"unknown FRC threshold {kind!r}; choose one of {', '.join(THRESHOLDS)}")


def frc(a: np.ndarray, b: np.ndarray, threshold: str = "1/7",
        pixel_size_um: float | None = None) -> FRCResult:
    """FRC curve of two same-shape images and the resolution at ``threshold``."""
    x, y = _grey(a), _grey(b)
    if x.shape != y.shape:
        raise InputError(f"FRC needs images of one shape, got {x.shape} and {y.shape}")
    fx, fy = np.fft.fft2(_apodise(x)), np.fft.fft2(_apodise(y))
    rings, n_rings = ring_index(x.shape)
    keep = rings <= n_rings
    r = rings[keep]
    cross = np.bincount(r, (fx * np.conj(fy)).real[keep], n_rings + 1)
    p1 = np.bincount(r, (np.abs(fx) ** 2)[keep], n_rings + 1)
    p2 = np.bincount(r, (np.abs(fy) ** 2)[keep], n_rings + 1)
    sizes = np.bincount(r, minlength=n_rings + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(p1 * p2 > 0, cross / np.sqrt(p1 * p2), 0.0)[1:]
    freqs = np.arange(1, n_rings + 1) / min(x.shape)
    thr = frc_threshold(threshold, sizes[1:])
    resolution, at_nyquist = _crossing(freqs, curve, thr)
    return FRCResult(freqs, curve, thr, resolution,
                     None if pixel_size_um is None else resolution * pixel_size_um, at_nyquist)


def _crossing(freqs: np.ndarray, curve: np.ndarray, thr: np.ndarray) -> tuple[float, bool]:
    """Resolution (px) at the first drop of ``curve`` below ``thr``; Nyquist when none."""
    below = np.nonzero(curve < thr)[0]
    if len(below) == 0:
        return 2.0, True
    i = int(below[0])
    if i == 0:
        return float(1 / freqs[0]), False
    d0, d1 = curve[i - 1] - thr[i - 1], curve[i] - thr[i]
    q = freqs[i - 1] + (freqs[i] - freqs[i - 1]) * d0 / (d0 - d1)
    return float(1 / q), False
