"""Regions of a volume or plane: boxes of half-open slices, and the few operations on them.

A region is a tuple of ``slice(start, stop)`` with explicit, in-bounds ends, one per
dimension (z, y, x for volumes; rows, cols for planes). The volume engine speaks of a
unit's *write region* (what it owns), its *read region* (write region + context) and the
*halo* a region is grown by; storage chunks are the cells of a regular grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product
from typing import TypeAlias

Region: TypeAlias = tuple[slice, ...]
AXES = ("z", "y", "x")                   # a volume's axes, in storage order
AXIS_INDEX = {"z": 0, "y": 1, "x": 2}


def grow(region: Region, halo: int, shape: tuple[int, ...]) -> Region:
    """``region`` grown by ``halo`` on every side, clipped to ``shape``."""
    return tuple(slice(max(0, s.start - halo), min(n, s.stop + halo))
                 for s, n in zip(region, shape, strict=True))


def relative(region: Region, to: Region) -> Region:
    """``region`` in the coordinates of the box ``to`` (which contains it)."""
    return tuple(slice(r.start - t.start, r.stop - t.start)
                 for r, t in zip(region, to, strict=True))


def intersects(a: Region, b: Region) -> bool:
    """Whether two regions share at least one voxel."""
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b, strict=True))


def chunks_touched(region: Region, chunk: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of every storage chunk of edge ``chunk`` that ``region`` touches."""
    ranges = [range(s.start // k, (s.stop - 1) // k + 1)
              for s, k in zip(region, chunk, strict=True)]
    return product(*ranges)


def grow_within(region: Region, by: int, limit: Region) -> Region:
    """``region`` grown by ``by`` voxels, clipped to the box ``limit``."""
    return tuple(slice(max(lim.start, r.start - by), min(lim.stop, r.stop + by))
                 for r, lim in zip(region, limit, strict=True))
