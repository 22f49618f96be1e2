"""Stripe index of a stained volume: slice-to-slice inconsistency along a staining axis.

Slice-wise staining along an axis leaves stripes in the planes that contain that axis
(§3.3: XZ/YZ stripes for z-wise staining). ``stripe_index(volume, axis)`` is the mean
squared first difference along ``axis`` over the mean squared first difference along the
two other axes (the in-plane directions of those planes). A smooth, isotropic volume scores
about 1; per-slice offsets push it above 1.
"""

from __future__ import annotations

import numpy as np

from hpcstain.errors import InputError

AXES = ("z", "y", "x")


def _volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim not in (3, 4) or min(volume.shape[:3]) < 2:
        raise InputError(f"stripe index needs a (Z, Y, X[, C]) volume with at least 2 voxels "
                         f"per axis, got shape {volume.shape}")
    return volume


def diff_energy(volume: np.ndarray, axis: int) -> float:
    """Mean squared first difference of a (Z, Y, X[, C]) volume along spatial ``axis``."""
    return float((np.diff(_volume(volume), axis=axis) ** 2).mean())


def slice_profile(volume: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean squared difference between each slice and the next along ``axis`` (length n-1)."""
    d = np.diff(_volume(volume), axis=axis) ** 2
    return d.mean(axis=tuple(a for a in range(d.ndim) if a != axis))


def stripe_index(volume: np.ndarray, axis: int = 0) -> float:
    """Energy of the first difference along ``axis`` over that along the two other axes."""
    volume = _volume(volume)
    along = diff_energy(volume, axis)
    across = np.mean([diff_energy(volume, a) for a in range(3) if a != axis])
    if across == 0:
        return 1.0 if along == 0 else float("inf")
    return float(along / across)


def stripe_indices(volume: np.ndarray) -> dict[str, float]:
    """Stripe index along each of z, y, x."""
    volume = _volume(volume)
    return {name: stripe_index(volume, a) for a, name in enumerate(AXES)}
