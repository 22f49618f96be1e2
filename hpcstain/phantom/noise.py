"""Deterministic procedural noise evaluated at arbitrary points.

Every random quantity of the phantom is a pure function of (seed, integer lattice cell),
so any set of sample points (an axis-aligned voxel slab or an oblique histology plane)
sees the same infinite sample, and a slab computed alone equals the same slab computed as
part of the whole volume.

Coordinates are ``(z, y, x)`` tuples of float arrays in voxel units that broadcast
against each other. When each coordinate varies along its own axis only (a regular grid)
the lattice noise is a product of three small interpolation matrices (fast); otherwise
it is evaluated point by point with ``scipy.ndimage.map_coordinates``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_PRIMES = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F),
           np.uint64(0x165667B19E3779F9))
# Standard deviation of the cubic B-spline average of uniform [-1, 1] lattice values
# (measured once over 10^6 points); dividing by it gives unit-variance noise.
_BSPLINE_STD = 0.1921


def hash_cells(seed: int, iz: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Hash integer lattice cells (broadcast) and a seed to uint64 (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        h = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _PRIMES[0] + np.uint64(0x632BE59BD9B4E019)
        for coord, prime in zip((iz, iy, ix), _PRIMES, strict=True):
            h = h ^ (np.asarray(coord).astype(np.int64).view(np.uint64) * prime)
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return h


def uniform_cells(seed: int, iz: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) value per lattice cell, float32."""
    h = hash_cells(seed, iz, iy, ix)
    return ((h >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)


def is_grid(coords: Coords) -> bool:
    """True when the coordinates are 1D profiles along their own axes (a regular slab)."""
    z, y, x = coords
    return (z.ndim == 3 and y.ndim == 3 and x.ndim == 3
            and z.shape[1:] == (1, 1) and y.shape[0] == y.shape[2] == 1
            and x.shape[:2] == (1, 1))


def _bspline_taps(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Cubic B-spline taps along one axis: (index (n, 4), weight (n, 4)), block lo, size."""
    i0 = np.floor(t).astype(np.int64)
    f = (t - i0).astype(np.float32)
    w = np.stack([(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6,
                  (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6], axis=1)
    lo = int(i0.min()) - 1
    idx = i0[:, None] - 1 + np.arange(4)[None, :] - lo
    return idx, w.astype(np.float32), lo, int(i0.max()) + 3 - lo


def _interp_axis(vals: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """4-tap weighted sum along ``axis`` in a fixed order, so every output element is
    bit-identical whatever block of the lattice it was computed from."""
    shape = [1, 1, 1]
    shape[axis] = -1
    out = None
    for k in range(4):
        term = np.take(vals, idx[:, k], axis=axis) * w[:, k].reshape(shape)
        out = term if out is None else out + term
    assert out is not None
    return out


@dataclass(frozen=True)
class Lattice:
    """Value noise: uniform lattice values every ``spacing`` voxels, cubic B-spline blended.

    ``__call__`` returns zero-mean, unit-variance float32 noise at the given points.
    """

    seed: int
    spacing: float

    def _values(self, lo: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
        iz, iy, ix = (np.arange(a, a + n).reshape([-1 if d == k else 1 for d in range(3)])
                      for k, (a, n) in enumerate(zip(lo, shape, strict=True)))
        return uniform_cells(self.seed, iz, iy, ix) * np.float32(2.0) - np.float32(1.0)

    def __call__(self, coords: Coords) -> np.ndarray:
        scale = np.float32(1.0 / self.spacing)
        if is_grid(coords):
            taps = [_bspline_taps(c.ravel() * scale) for c in coords]
            vals = self._values((taps[0][2], taps[1][2], taps[2][2]),
                                (taps[0][3], taps[1][3], taps[2][3]))
            out = vals
            for axis in (2, 1, 0):
                out = _interp_axis(out, taps[axis][0], taps[axis][1], axis)
        else:
            t = [np.broadcast_to(c, np.broadcast_shapes(*(c.shape for c in coords)))
                 .astype(np.float32) * scale for c in coords]
            lo = [int(np.floor(a.min())) - 2 for a in t]
            hi = [int(np.floor(a.max())) + 3 for a in t]
            vals = self._values((lo[0], lo[1], lo[2]),
                                (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]))
            pts = [a - np.float32(o) for a, o in zip(t, lo, strict=True)]
            out = ndimage.map_coordinates(vals, pts, order=3, prefilter=False, mode="nearest",
                                          output=np.float32)
        return (out * np.float32(1.0 / _BSPLINE_STD)).astype(np.float32, copy=False)


def fbm(lattices: tuple[Lattice, ...], coords: Coords) -> np.ndarray:
    """Sum of octaves, each half the amplitude of the previous; unit variance overall."""
    total = None
    norm = 0.0
    for k, lat in enumerate(lattices):
        amp = np.float32(0.5**k)
        term = lat(coords) * amp
        total = term if total is None else total + term
        norm += float(amp) ** 2
    assert total is not None
    return total * np.float32(1.0 / np.sqrt(norm))


def cell_index(c: np.ndarray, size: float) -> np.ndarray:
    """Integer cell of a coordinate on a grid of ``size``-voxel cells."""
    return np.floor(c * np.float32(1.0 / size)).astype(np.int64)


def cell_uniforms(seed: int, cells: tuple[np.ndarray, ...], n: int) -> list[np.ndarray]:
    """``n`` independent uniforms per cell; hashed on the bounding block, then gathered.

    ``cells`` are broadcastable integer index arrays (2 or 3 of them); hashing only the
    block of distinct cells and gathering keeps the per-point cost to one fancy index.
    """
    shape = np.broadcast_shapes(*(c.shape for c in cells))
    lo = [int(c.min()) for c in cells]
    ext = [int(c.max()) - a + 1 for c, a in zip(cells, lo, strict=True)]
    axes = [np.arange(a, a + e).reshape([-1 if d == k else 1 for d in range(len(cells))])
            for k, (a, e) in enumerate(zip(lo, ext, strict=True))]
    idx = tuple(c - a for c, a in zip(cells, lo, strict=True))
    while len(axes) < 3:
        axes.append(np.zeros([1] * len(cells), dtype=np.int64))
    out = []
    for k in range(n):
        block = uniform_cells(seed * 131 + k, *axes)
        out.append(np.broadcast_to(block[idx], shape))
    return out
