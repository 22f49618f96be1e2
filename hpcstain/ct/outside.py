"""Inside or outside the sample: the rule on raw CT, one home for fuse, distill and score.

Outside is resin, air and what is detached from the sample. Three steps
(:func:`outside_of_sample`), each a fixed neighbourhood of the voxel:

1. **vote** (:func:`vote_inside`): a voxel is *inside* when at least :data:`OUTSIDE_VOTES`
   of the (2·:data:`OUTSIDE_HALO` + 1)³ = 125 raw CT voxels around it lie at or above the
   embedding medium + :data:`OUTSIDE_FRACTION` of the bone–background gap
   (:func:`outside_threshold`): the median of the box, not its mean, is tested, so the
   edge sits where the voxels change class whatever the tissue's contrast (a mean smears
   bright bone outward and faint tissue inward), and the noise of a low flux or a streak
   is outvoted;
2. **thickness** (:func:`thick_inside`): an inside voxel stays inside only within
   :data:`OUTSIDE_KEEP` voxels of a full (2·:data:`OUTSIDE_ERODE` + 1)³ cube of inside:
   the thin wall of the sample tube, denser than the resin, is outside too;
3. **fill** (:func:`enclosed`): an outside voxel with inside (after step 2) within
   :data:`OUTSIDE_FILL` voxels along :data:`OUTSIDE_FILL_SIDES` of the 6 axis directions is
   inside: the tissue darkened by a metal's starvation streaks, enclosed by the sample.

Every answer is the whole volume's, whatever box it is computed in (the CT and the inside
mask are mirrored at the volume border like the Gaussian): a fuse task reads the CT over
its box + :data:`OUTSIDE_REACH`. Fusion paints outside voxels with the slide background
(§2.8). :func:`outside_mask` is the box-mean test of the rule before the vote
(``box5-erode3-keep8``), kept for comparisons (benchmarks/outside_tube.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpcstain.geometry import Region, grow_within, relative
from hpcstain.scratch import Workspace, scratch

OUTSIDE_HALO = 2          # voxels: the vote counts the raw CT over (2·2 + 1)³ = 125 voxels …
OUTSIDE_FRACTION = 0.13   # … at or above background + 13 % of the bone–background gap …
OUTSIDE_VOTES = 63        # … and needs 63 of them (a majority: the median) for inside
OUTSIDE_ERODE = 3         # voxels: inside needs a whole (2·3 + 1)³ cube of inside nearby …
OUTSIDE_KEEP = 8          # … within this many voxels (thin detached walls: tube → outside)
OUTSIDE_FILL = 12         # voxels: outside enclosed by inside this close …
OUTSIDE_FILL_SIDES = 5    # … along 5 of the 6 axis directions is inside
OUTSIDE_OPEN = OUTSIDE_ERODE + OUTSIDE_KEEP + OUTSIDE_FILL  # inside mask read around a region
OUTSIDE_REACH = OUTSIDE_HALO + OUTSIDE_OPEN  # CT voxels read around a chunk
OUTSIDE_TEST = "vote5-63at13-erode3-keep8-fill12of5"  # the rule's name, in the image's settings
BOX_FRACTION = 0.08       # the box-mean test before the vote (outside_mask): background + 8 %


def outside_threshold(levels: tuple[float, float], fraction: float = OUTSIDE_FRACTION
                      ) -> float:
    """Raw CT at or above which a voxel votes *inside*, from (bone, background): background
    + ``fraction`` of the gap. Every box read at or above it is all inside, every box read
    below it all outside (fuse's shortcut)."""
    bone, background = levels
    return background + fraction * (bone - background)


def outside_sample(ct: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    """Voxels of raw CT below the vote's threshold (:func:`outside_threshold`): resin, air."""
    return ct < outside_threshold(levels)


def mirror_pad(data: np.ndarray, pad: list[tuple[int, int]], work: Workspace | None = None,
               dtype: Any = np.float32) -> np.ndarray:
    """``np.pad(data, pad, mode="symmetric")`` as ``dtype``, in one allocation (the edge
    voxel repeated, then its neighbours: scipy's "reflect")."""
    if any(max(a, b) > n for (a, b), n in zip(pad, data.shape, strict=True)):
        return np.pad(np.asarray(data, dtype), pad, mode="symmetric")
    out = scratch(work, "padded", tuple(n + a + b for (a, b), n in
                                         zip(pad, data.shape, strict=True)), dtype)
    out[tuple(slice(a, a + n) for (a, _), n in zip(pad, data.shape, strict=True))] = data
    for axis, (a, b) in enumerate(pad):
        n = out.shape[axis]
        cut = [slice(None)] * out.ndim

        def at(sl: slice, cut: list[slice] = cut, axis: int = axis) -> tuple[slice, ...]:
            cut[axis] = sl
            return tuple(cut)

        if a:
            out[at(slice(0, a))] = out[at(slice(2 * a - 1, a - 1, -1))]
        if b:
            stop = n - 2 * b - 1
            out[at(slice(n - b, n))] = out[at(slice(n - b - 1, stop if stop >= 0 else None, -1))]
    return out


def _uniform_answer(raw: np.ndarray, inner: Region, threshold: float) -> np.ndarray | None:
    """All-inside / all-outside for ``inner`` when every CT voxel read is at or above /
    below ``threshold`` (every box is then too), else None: the test must run."""
    shape = tuple(s.stop - s.start for s in inner)
    if raw.size and float(raw.min()) >= threshold:
        return np.zeros(shape, bool)
    if raw.size and float(raw.max()) < threshold:
        return np.ones(shape, bool)
    return None


def _box_pad(inner: Region, grown: Region, halo: int) -> list[tuple[int, int]]:
    """Voxels to mirror on each side where ``grown`` (``inner`` + ``halo``, clipped at the
    volume border) falls short."""
    return [(halo - (i.start - g.start), halo - (g.stop - i.stop))
            for i, g in zip(inner, grown, strict=True)]


def _box_sums(data: np.ndarray, width: int, work: Workspace | None, dtype: Any) -> np.ndarray:
    """Sums of ``data`` over every ``width``³ box that fits (separable, fixed order)."""
    for axis in range(3):
        n = data.shape[axis] - width + 1
        cut = [slice(None)] * 3
        cut[axis] = slice(0, n)
        acc = scratch(work, f"box{axis}", data[tuple(cut)].shape, dtype)
        acc[...] = data[tuple(cut)]
        for k in range(1, width):
            cut[axis] = slice(k, k + n)
            acc += data[tuple(cut)]
        data = acc
    return data


def _at_or_above(raw: np.ndarray, threshold: float, out: np.ndarray) -> None:
    """``out[...] = raw >= threshold``, exactly (as in float64) and in ``raw``'s own dtype:
    integer CT against the next whole value, float32 against the nearest float32 at or
    above the threshold (no float64 copy of the block)."""
    kind = raw.dtype.kind
    if kind in "ui":
        info = np.iinfo(raw.dtype)
        t = math.ceil(threshold)
        if t > info.max or t <= info.min:
            out[...] = t <= info.min
            return
        np.greater_equal(raw, raw.dtype.type(t), out=out)
    elif raw.dtype == np.float32:
        t32 = np.float32(threshold)
        if float(t32) < threshold:
            t32 = np.nextafter(t32, np.float32(np.inf))
        np.greater_equal(raw, t32, out=out)
    else:
        np.greater_equal(np.asarray(raw, np.float64), threshold, out=out)


def vote_inside(raw: np.ndarray, inner: Region, grown: Region, levels: tuple[float, float],
                halo: int = OUTSIDE_HALO, votes: int = OUTSIDE_VOTES,
                work: Workspace | None = None) -> np.ndarray:
    """Step 1, inside voxels of ``inner`` from raw CT read over ``grown`` = ``inner`` +
    ``halo`` (clipped at the volume border, where the CT is mirrored): at least ``votes``
    of the (2·halo + 1)³ voxels around the voxel are at or above :func:`outside_threshold`.

    Integer counts (uint8), so a voxel's answer does not depend on the box it is computed
    in; boxes read entirely above (below) the threshold are all inside (outside).
    """
    threshold = outside_threshold(levels)
    uniform = _uniform_answer(raw, inner, threshold)
    if uniform is not None:
        return ~uniform
    width = 2 * halo + 1
    if width ** 3 > 255:
        raise ValueError(f"vote halo {halo}: {width ** 3} voxels do not fit a uint8 count")
    above = scratch(work, "above", raw.shape, np.uint8)
    _at_or_above(raw, threshold, above.view(bool))
    pad = _box_pad(inner, grown, halo)
    if any(a or b for a, b in pad):
        above = mirror_pad(above, pad, work, np.uint8)
    return _box_sums(above, width, work, np.uint8) >= votes


def outside_mask(raw: np.ndarray, inner: Region, grown: Region, levels: tuple[float, float],
                 halo: int = OUTSIDE_HALO, work: Workspace | None = None) -> np.ndarray:
    """The rule before the vote (``box5``, step 1 of ``box5-erode3-keep8``): outside voxels
    of ``inner`` whose (2·halo + 1)³ mean raw CT, read over ``grown`` (⊇ inner, mirrored at
    the volume border), lies below background + :data:`BOX_FRACTION` of the gap.

    The box sums are fixed-order sums of float32 neighbours (exact for integer CT up to 16
    bits), so a voxel's answer does not depend on the box it is computed in; boxes
    entirely above (or below) the threshold are answered from their minimum (maximum)
    alone. Kept for comparison (benchmarks/outside_tube.py); fuse uses
    :func:`outside_of_sample`.
    """
    threshold = outside_threshold(levels, BOX_FRACTION)
    uniform = _uniform_answer(raw, inner, threshold)
    if uniform is not None:
        return uniform
    pad = _box_pad(inner, grown, halo)
    if any(a or b for a, b in pad):
        data = mirror_pad(raw, pad, work)
    else:
        data = scratch(work, "padded", raw.shape, np.float32)
        data[...] = raw
    width = 2 * halo + 1
    return _box_sums(data, width, work, np.float32) < np.float32(threshold * width ** 3)


def _run(flat: np.ndarray, step: int, width: int, op: Any) -> np.ndarray:
    """``op`` (``np.logical_and``/``or``: idempotent) over ``flat[i + k·step]``, k < width,
    for every ``i`` where that fits ((width - 1)·step shorter): by doubling, then one
    overlapping step (about log2(width) + 1 passes over contiguous memory)."""
    have, acc = 1, flat
    while 2 * have <= width:
        acc = op(acc[:-have * step], acc[have * step:])
        have *= 2
    if have < width:
        m = flat.size - (width - 1) * step
        acc = op(acc[:m], acc[(width - have) * step:(width - have) * step + m])
    return acc


def _runs(mask: np.ndarray, axis: int, width: int, op: Any) -> np.ndarray:
    """:func:`_run` along ``axis`` of a C-contiguous 3D ``mask``, as an array of its shape:
    index ``j`` along ``axis`` holds the run over ``j .. j + width - 1`` (valid where that
    fits; the rest is garbage, never read)."""
    step = int(np.prod(mask.shape[axis + 1:]))
    acc = _run(np.ascontiguousarray(mask).reshape(-1), step, width, op)
    out = np.zeros(mask.size, bool)
    out[:acc.size] = acc
    return out.reshape(mask.shape)


def thick_inside(inside: np.ndarray, erode: int = OUTSIDE_ERODE, keep: int = OUTSIDE_KEEP
                 ) -> np.ndarray:
    """Voxels within ``keep`` (chessboard distance) of a full (2·erode + 1)³ cube of
    ``inside``: an erosion then a larger dilation, both by cubes, on ``inside`` given
    ``erode + keep`` voxels beyond the wanted box on every side (valid positions only, so
    the answer is the box's own and not its edge's).

    ANDed with ``inside``, it drops inside structures thinner than ``2·erode + 1`` voxels
    that lie more than ``keep - erode`` voxels from a thicker one (the sample tube's
    wall), and keeps every voxel of a thick structure (``keep >= erode`` restores what the
    erosion took from its rim and corners). Each pass runs along the flattened array (a
    step of one plane, row or voxel): positions whose cube wraps around a row or plane
    are garbage and fall in the margin cut off at the end.
    """
    shape = inside.shape
    flat = np.ascontiguousarray(inside).reshape(-1)
    steps = (shape[1] * shape[2], shape[2], 1)
    for step in steps:
        flat = _run(flat, step, 2 * erode + 1, np.logical_and)
    for step in steps:
        flat = _run(flat, step, 2 * keep + 1, np.logical_or)
    out = np.zeros(inside.size, bool)
    out[:flat.size] = flat
    r = erode + keep
    return out.reshape(shape)[tuple(slice(0, n - 2 * r) for n in shape)]


def enclosed(inside: np.ndarray, reach: int = OUTSIDE_FILL, sides: int = OUTSIDE_FILL_SIDES
             ) -> np.ndarray:
    """Step 3 on ``inside`` given ``reach`` voxels beyond the wanted box on every side:
    voxels of the box with an ``inside`` voxel within 1..``reach`` voxels along at least
    ``sides`` of the 6 axis directions (inside voxels themselves included)."""
    core = tuple(slice(reach, n - reach) for n in inside.shape)
    hits = np.zeros(tuple(n - 2 * reach for n in inside.shape), np.uint8)
    for axis in range(3):
        runs = _runs(inside, axis, reach, np.logical_or)  # j: any of j .. j + reach - 1
        for start in (reach + 1, 0):                       # + side: j + 1 …; - side: j - reach …
            cut = list(core)
            n = inside.shape[axis] - 2 * reach
            cut[axis] = slice(start, start + n)
            hits += runs[tuple(cut)]
    return (hits >= sides) | inside[core]


def inside_sample(raw: np.ndarray, box: Region, grown: Region, levels: tuple[float, float],
                  tile: int = 96, work: Workspace | None = None) -> np.ndarray:
    """Inside voxels of ``box`` by the vote (:func:`vote_inside`, step 1), from raw CT read
    over ``grown`` = ``box`` + :data:`OUTSIDE_HALO` (clipped at the volume border),
    ``tile``³ voxels at a time (cache-sized arrays; a voxel's answer does not depend on
    its tile)."""
    out = np.empty(tuple(s.stop - s.start for s in box), bool)
    starts = [range(s.start, s.stop, tile) for s in box]
    for z0 in starts[0]:
        for y0 in starts[1]:
            for x0 in starts[2]:
                t = tuple(slice(o, min(o + tile, s.stop))
                          for o, s in zip((z0, y0, x0), box, strict=True))
                tg = tuple(slice(max(g.start, s.start - OUTSIDE_HALO),
                                 min(g.stop, s.stop + OUTSIDE_HALO))
                           for s, g in zip(t, grown, strict=True))
                out[relative(t, box)] = vote_inside(raw[relative(tg, grown)], t, tg,
                                                    levels, work=work)
    return out


def outside_from_inside(inside: np.ndarray, inner: Region, mid: Region) -> np.ndarray:
    """Outside voxels of ``inner`` from the vote's ``inside`` mask over ``mid`` = ``inner``
    + :data:`OUTSIDE_OPEN` voxels (clipped at the volume border, where the mask is
    mirrored): the thickness test (:func:`thick_inside`, step 2), then the fill
    (:func:`enclosed`, step 3)."""
    core = relative(inner, mid)
    if inside.all():
        return np.zeros(inside[core].shape, bool)
    if not inside.any():
        return np.ones(inside[core].shape, bool)
    pad = _box_pad(inner, mid, OUTSIDE_OPEN)
    padded = np.pad(inside, pad, mode="symmetric") if any(a or b for a, b in pad) else inside
    r = OUTSIDE_ERODE + OUTSIDE_KEEP
    kept = padded[tuple(slice(r, n - r) for n in padded.shape)]  # inner + OUTSIDE_FILL
    kept = kept & thick_inside(padded, OUTSIDE_ERODE, OUTSIDE_KEEP)
    return ~enclosed(kept, OUTSIDE_FILL, OUTSIDE_FILL_SIDES)


def outside_of_sample(raw: np.ndarray, inner: Region, grown: Region, levels: tuple[float, float],
                      work: Workspace | None = None) -> np.ndarray:
    """Outside-the-sample voxels of ``inner`` from raw CT read over ``grown`` =
    ``inner`` + :data:`OUTSIDE_REACH` voxels (clipped at the volume border).

    The vote (:func:`vote_inside`), the thickness test (:func:`thick_inside`: thin
    structures detached from the sample, the wall of the sample tube, are outside) and the
    fill (:func:`enclosed`: outside enclosed by inside is inside). The CT and the inside
    mask are mirrored (symmetric) at the volume border, so a voxel's answer is the whole
    volume's, whatever box it is computed in. (Fusion computes the steps apart:
    :func:`inside_sample` once per task, :func:`outside_from_inside` per chunk.)
    """
    uniform = _uniform_answer(raw, inner, outside_threshold(levels))
    if uniform is not None:
        return uniform
    mid = grow_within(inner, OUTSIDE_OPEN, grown)
    return outside_from_inside(inside_sample(raw, mid, grown, levels, work=work), inner, mid)
