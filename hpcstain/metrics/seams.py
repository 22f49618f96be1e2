"""Seam index: how much a tiled output jumps across the lines where grid tiles start or end.

``seam_index = mean squared first difference across tile-boundary lines / the same over all
other lines`` (rows and columns pooled, channels averaged). About 1 means the boundary lines
look like any other line (no seams); tiling artefacts push it above 1 (jumps), or below 1
where tile edges are flattened (e.g. reflect-padded nets averaged with a uniform window).

On one image the index also carries the content that happens to sit on the boundary lines
(few lines on small images). Given ``reference`` — the same scene without tiling, e.g. one
untiled pass of a fully convolutional net — the index is divided by the reference's index
on the same lines, which leaves only what tiling added.
"""

from __future__ import annotations

import numpy as np

from hpcstain.errors import InputError
from hpcstain.tiles import tile_boundaries


def _diff_energy(image: np.ndarray, axis: int) -> np.ndarray:
    """Mean squared difference between each pair of neighbouring lines along ``axis``."""
    d = np.diff(image, axis=axis) ** 2
    other = tuple(a for a in range(d.ndim) if a != axis)
    return d.mean(axis=other)


def seam_index(image: np.ndarray, tile: int, step: int,
               reference: np.ndarray | None = None) -> float:
    """Boundary-line over interior-line gradient energy of an (H, W[, C]) image (≈1: no seams).

    With ``reference`` (same shape) the result is relative to the reference's own index.
    """
    if reference is not None:
        if np.shape(reference) != np.shape(image):
            raise InputError(f"seam reference of shape {np.shape(reference)} does not match "
                             f"image {np.shape(image)}")
        return _index(image, tile, step) / _index(reference, tile, step)
    return _index(image, tile, step)


def seam_badness(index: float) -> float:
    """Distance of a seam index from 1 on a log scale (0: no seam; jumps and flat lines > 0)."""
    return abs(float(np.log(index)))


def _index(image: np.ndarray, tile: int, step: int) -> float:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3):
        raise InputError(f"seam index needs an (H, W[, C]) image, got shape {image.shape}")
    on, off = [], []
    for axis in (0, 1):
        energy = _diff_energy(image, axis)  # energy[i]: between lines i and i + 1
        seam = np.zeros(len(energy), dtype=bool)
        seam[tile_boundaries(image.shape[axis], tile, step) - 1] = True
        on.append(energy[seam])
        off.append(energy[~seam])
    boundary, interior = np.concatenate(on), np.concatenate(off)
    if boundary.size == 0 or interior.size == 0:
        return 1.0
    b, i = boundary.mean(), interior.mean()
    if i == 0:
        return 1.0 if b == 0 else float("inf")
    return float(b / i)
