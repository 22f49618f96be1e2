"""Inside or outside the sample: the rule on raw CT, one home for fuse, distill and score.

Outside is resin, air and what is detached from the sample: a voxel is *inside* when the
(2·:data:`OUTSIDE_HALO` + 1)³ mean of its raw CT lies above the embedding medium by at least
:data:`OUTSIDE_FRACTION` of the bone–background gap (:func:`outside_threshold`,
:func:`outside_mask`), and it stays inside only within :data:`OUTSIDE_KEEP` voxels of a full
(2·:data:`OUTSIDE_ERODE` + 1)³ cube of inside (:func:`thick_inside`): the thin wall of the
sample tube, denser than the resin, is outside too (:func:`outside_of_sample`). Every answer
is the whole volume's, whatever box it is computed in (mirrored at the volume border like
the Gaussian). Fusion paints outside voxels with the slide background (§2.8).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpcstain.geometry import Region, grow_within, relative
from hpcstain.scratch import Workspace, scratch

OUTSIDE_HALO = 2          # voxels: the CT is averaged over (2·2 + 1)³ before the test
OUTSIDE_FRACTION = 0.08   # of the bone–background gap above the background level
OUTSIDE_ERODE = 3         # voxels: inside needs a whole (2·3 + 1)³ cube of inside nearby …
OUTSIDE_KEEP = 8          # … within this many voxels (thin detached walls: tube → outside)
OUTSIDE_REACH = OUTSIDE_HALO + OUTSIDE_ERODE + OUTSIDE_KEEP  # CT voxels read around a chunk
OUTSIDE_TEST = "box5-erode3-keep8"  # the rule's name, stored in the image's settings


def outside_threshold(levels: tuple[float, float]) -> float:
    """Raw CT below which a (smoothed) voxel is outside the sample, from (bone, background)."""
    bone, background = levels
    return background + OUTSIDE_FRACTION * (bone - background)


def outside_sample(ct: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    """Voxels of (smoothed) raw CT at or below the embedding medium: resin, air."""
    return ct < outside_threshold(levels)


def mirror_pad(data: np.ndarray, pad: list[tuple[int, int]], work: Workspace | None = None
               ) -> np.ndarray:
    """``np.pad(data, pad, mode="symmetric")`` as float32, in one allocation (the edge
    voxel repeated, then its neighbours: scipy's "reflect")."""
    if any(max(a, b) > n for (a, b), n in zip(pad, data.shape, strict=True)):
        return np.pad(np.asarray(data, np.float32), pad, mode="symmetric")
    out = scratch(work, "padded", tuple(n + a + b for (a, b), n in
                                         zip(pad, data.shape, strict=True)), np.float32)
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


def _uniform_answer(raw: np.ndarray, inner: Region, levels: tuple[float, float]
                    ) -> np.ndarray | None:
    """All-inside / all-outside for ``inner`` when every CT voxel read is above / below the
    outside threshold (any box mean is then too), else None: the test must run."""
    threshold = outside_threshold(levels)
    shape = tuple(s.stop - s.start for s in inner)
    if raw.size and float(raw.min()) >= threshold:
        return np.zeros(shape, bool)
    if raw.size and float(raw.max()) < threshold:
        return np.ones(shape, bool)
    return None


def outside_mask(raw: np.ndarray, inner: Region, grown: Region, levels: tuple[float, float],
                 halo: int = OUTSIDE_HALO, work: Workspace | None = None) -> np.ndarray:
    """Outside-the-sample voxels of ``inner`` from raw CT read over ``grown`` (⊇ inner).

    The test of :func:`outside_sample` on the (2·halo + 1)³ mean of the CT, with the block
    mirrored where ``grown`` meets the volume border. The box sums are fixed-order sums of
    float32 neighbours (exact for integer CT up to 16 bits), so a voxel's answer does not
    depend on the box it is computed in; boxes entirely above (or below) the threshold are
    answered from their minimum (maximum) alone.
    """
    uniform = _uniform_answer(raw, inner, levels)
    if uniform is not None:
        return uniform
    pad = [(halo - (i.start - g.start), halo - (g.stop - i.stop))
           for i, g in zip(inner, grown, strict=True)]
    if any(a or b for a, b in pad):
        data = mirror_pad(raw, pad, work)
    else:
        data = scratch(work, "padded", raw.shape, np.float32)
        data[...] = raw
    width = 2 * halo + 1
    for axis in range(3):
        n = data.shape[axis] - 2 * halo
        cut = [slice(None)] * 3
        cut[axis] = slice(0, n)
        acc = scratch(work, f"box{axis}", data[tuple(cut)].shape, np.float32)
        acc[...] = data[tuple(cut)]
        for k in range(1, width):
            cut[axis] = slice(k, k + n)
            acc += data[tuple(cut)]
        data = acc
    return data < np.float32(outside_threshold(levels) * width ** 3)


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


def inside_sample(raw: np.ndarray, box: Region, grown: Region, levels: tuple[float, float],
                  tile: int = 64, work: Workspace | None = None) -> np.ndarray:
    """Inside voxels of ``box`` by the box-mean test (the complement of
    :func:`outside_mask`), from raw CT read over ``grown`` = ``box`` + :data:`OUTSIDE_HALO`
    (clipped at the volume border), ``tile``³ voxels at a time (cache-sized float arrays;
    a voxel's answer does not depend on its tile)."""
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
                out[relative(t, box)] = ~outside_mask(raw[relative(tg, grown)], t, tg,
                                                      levels, work=work)
    return out


def outside_from_inside(inside: np.ndarray, inner: Region, mid: Region) -> np.ndarray:
    """Outside voxels of ``inner`` from the box-mean ``inside`` mask over ``mid`` =
    ``inner`` + ``OUTSIDE_ERODE + OUTSIDE_KEEP`` voxels (clipped at the volume border):
    inside only within :data:`OUTSIDE_KEEP` voxels of a full (2·:data:`OUTSIDE_ERODE` +
    1)³ cube of inside (:func:`thick_inside`; the mask mirrored at the volume border)."""
    core = relative(inner, mid)
    if inside.all():
        return np.zeros(inside[core].shape, bool)
    if not inside[core].any():
        return np.ones(inside[core].shape, bool)
    reach = OUTSIDE_ERODE + OUTSIDE_KEEP
    pad = [(reach - (i.start - m.start), reach - (m.stop - i.stop))
           for i, m in zip(inner, mid, strict=True)]
    padded = np.pad(inside, pad, mode="symmetric") if any(a or b for a, b in pad) else inside
    return ~(inside[core] & thick_inside(padded, OUTSIDE_ERODE, OUTSIDE_KEEP))


def outside_of_sample(raw: np.ndarray, inner: Region, grown: Region, levels: tuple[float, float],
                   work: Workspace | None = None) -> np.ndarray:
    """Outside-the-sample voxels of ``inner`` from raw CT read over ``grown`` =
    ``inner`` + :data:`OUTSIDE_REACH` voxels (clipped at the volume border).

    Inside is the box-mean test of :func:`outside_mask`, kept only within
    :data:`OUTSIDE_KEEP` voxels of a (2·:data:`OUTSIDE_ERODE` + 1)³ cube of inside
    (:func:`thick_inside`): thin structures detached from the sample (the wall of the
    sample tube, denser than the resin) are outside too. The inside mask is mirrored
    (symmetric) at the volume border, as the CT is for the box mean, so a voxel's answer
    is the whole volume's, whatever box it is computed in. (Fusion computes the two steps
    apart: :func:`inside_sample` once per task, :func:`outside_from_inside` per chunk.)
    """
    uniform = _uniform_answer(raw, inner, levels)
    if uniform is not None:
        return uniform
    mid = grow_within(inner, OUTSIDE_ERODE + OUTSIDE_KEEP, grown)
    return outside_from_inside(inside_sample(raw, mid, grown, levels, work=work), inner, mid)
