"""Fuse the per-axis predictions of a run into one RGBA OME-Zarr volume.

Methods (all per voxel, over the staining axes of the run):

* ``mean``: the average of the axes' RGB.
* ``median``: the per-channel median (the middle value for three axes).
* ``consistency``: a stripe-aware weighted mean. Slice-wise staining makes each axis's
  output jump from one slice to the next along *its own* staining axis (the stripes of
  §3.3). For axis ``a`` the slice-to-slice inconsistency at a voxel is the deviation of
  its RGB from the average of its two neighbours along ``a`` (a second difference),
  averaged over RGB and over a (2r+1)² window in the slice plane (stripes are offsets
  shared by a whole slice, single noisy voxels are not). Each axis is weighted by
  ``1 / (eps + inconsistency)²``: where one axis jumps between slices and the others are
  smooth along theirs, the smooth ones dominate.

Alpha is the mean of the fused RGB (as the paper's RGBA rendering). Every result is
rounded to uint8. Outside the sample (most of the 5³ CT voxels below the background
level + 13 % of the bone–background gap: resin, air; inside voxels farther than 8 voxels
from a full 7³ cube of inside: thin detached walls, the sample tube; less what the sample
encloses: :func:`hpcstain.ct.outside.outside_of_sample`) the generator was never trained
(§2.8 masks train it inside the sample only) and invents colour; those voxels get the
normalised slide background (250, 250, 250) instead (``fill_outside``; the paper's §2.8
rule for 2D).
``single_axis`` copies one axis through unchanged (the paper's slice-wise volume).

**Confidence** (on by default with two or more axes; ``confidence=False`` /
``--no-confidence`` skips it): the per-voxel disagreement of the axes,

    d = sqrt( mean over axes a and channels c of (P_a,c - F_c)² )

where ``P_a`` is axis ``a``'s RGB and ``F`` the fused RGB written to the image (both uint8),
rounded to uint8 in the same 0–255 colour units (0: every axis gave exactly the fused
colour; never above 255). It is written as a one-channel image ``disagreement`` nested in
the fused image (``fused.ome.zarr/disagreement``: its own NGFF ``multiscales``, the same
levels, chunks, scale and translation as the RGBA), 0 outside the sample where the
background is painted. It is computed in the same block task from the same reads.

Fusion is a block task over the storage chunks of the output: a chunk is fused once every
axis's work units (slabs) covering it are done; ``consistency`` also needs the voxels
around it (its halo of ``r`` voxels), so its result does not depend on the chunking. Each
chunk writes only its own level-0 storage chunk, then its completion record, so chunks
fuse in parallel: a group of chunks is a block task (:mod:`hpcstain.volume.tasks`) that
any runner runs (this process, ``workers`` local processes, or the executors' dask and
MPI runners: :func:`hpcstain.executors.run_fuse`). A task
fuses a *group* of chunks (:func:`fuse_groups`: aligned blocks of 2×2×2 chunks or more,
bounded by ``FUSE_GROUP_VOXELS``): it reads the CT for the outside test once over the
group's box, and writes the level-1 storage chunks whose level-0 chunks all lie in the
group from memory; the other level-1 chunks and the higher levels are built afterwards
from the level below, once per touched storage chunk. A marker
(``done/<image>/.pyramid-pending``) left by an interrupted pass makes the next one rebuild
the whole pyramid. Re-running fuses only chunks without a record.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from scipy import ndimage

from hpcstain.ct.outside import (
    OUTSIDE_OPEN,
    OUTSIDE_REACH,
    OUTSIDE_TEST,
    inside_sample,
    outside_from_inside,
    outside_threshold,
)
from hpcstain.ct.prepare import corrected_read
from hpcstain.data.normalise import NORMALISED_BACKGROUND
from hpcstain.errors import InputError, UsageError
from hpcstain.geometry import AXIS_INDEX, Region, chunks_touched, grow, relative
from hpcstain.metrics.stripes import stripe_index
from hpcstain.scratch import Workspace, scratch
from hpcstain.volume import omezarr, rundir
from hpcstain.volume.io import open_volume
from hpcstain.volume.plan import Plan, input_at, load_plan
from hpcstain.volume.repair import damaged_axis_error
from hpcstain.volume.rundir import axis_store, done_names, record_path, write_record
from hpcstain.volume.tasks import Runner, TaskPass, run_processes

Method = Literal["mean", "median", "consistency"]
METHODS = ("mean", "median", "consistency")

CONSISTENCY_RADIUS = 2
CONSISTENCY_EPS = 1.0
DISAGREEMENT = "disagreement"  # the confidence image, nested in the fused image
FUSE_GROUP_VOXELS = 1 << 25    # CT voxels one fuse task reads at once (64 MB of uint16)
# settings added after images were first written, with the value those images have
SETTING_DEFAULTS: dict[str, Any] = {"confidence": False}
IO_QUEUE = 4              # writes a fuse task lets wait before it fuses on
FUSE_SLAB = 8             # z-slices fused at once (halo-free methods: cache-sized arrays)


# --------------------------------------------------------------------------- pure core


def fuse_mean(preds: np.ndarray) -> np.ndarray:
    """(A, Z, Y, X, 3) uint8 → (Z, Y, X, 3) uint8: average over axes A (rounded half to even)."""
    total = preds[0].astype(np.uint16)
    for p in preds[1:]:
        total += p
    return mean_table(len(preds))[total]


mean_table = omezarr.rounded_mean_table


def rounded_mean_into(total: np.ndarray, n: int, out: np.ndarray) -> np.ndarray:
    """``mean_table(n)[total]`` written to ``out`` (uint8); ``total`` (uint16 sums of
    ``n`` uint8 values) is used as scratch. For n = 3 (s/3 never ends in .5)
    ``(s + 1) // 3``: integer division by a constant runs several times faster than the
    table lookup, with the same values."""
    if n != 3:
        return np.take(mean_table(n), total, out=out)
    np.add(total, 1, out=total)
    np.floor_divide(total, np.uint16(3), out=total)
    np.copyto(out, total, casting="unsafe")
    return out


def fuse_median(preds: np.ndarray) -> np.ndarray:
    """(A, Z, Y, X, 3) uint8 → (Z, Y, X, 3) uint8: per-channel median over axes A."""
    return np.rint(np.median(preds.astype(np.float32), axis=0)).astype(np.uint8)


def slice_inconsistency(pred: np.ndarray, axis: int, radius: int = CONSISTENCY_RADIUS
                        ) -> np.ndarray:
    """How much ``pred`` (Z, Y, X, 3) jumps between slices along ``axis``, per voxel.

    |P(v) - (P(v-e) + P(v+e)) / 2| averaged over RGB, then averaged over a (2r+1)² window
    in the plane of the slice. Borders use the nearest voxel (callers pass a padded block
    and keep its interior). Each output voxel is a fixed-order sum of its neighbours, so
    the value does not depend on where the block starts.
    """
    p = pred.astype(np.float32).mean(axis=-1)
    padded = np.pad(p, [(1, 1) if d == axis else (0, 0) for d in range(3)], mode="edge")
    lo = [slice(None)] * 3
    mid = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], mid[axis], hi[axis] = slice(0, -2), slice(1, -1), slice(2, None)
    dev = np.abs(padded[tuple(mid)] - np.float32(0.5) * (padded[tuple(lo)] + padded[tuple(hi)]))
    box = np.full(2 * radius + 1, 1.0 / (2 * radius + 1), np.float32)
    for d in range(3):
        if d != axis:
            dev = ndimage.correlate1d(dev, box, axis=d, mode="nearest")
    return dev


def fuse_consistency(preds: np.ndarray, axes: tuple[int, ...], radius: int = CONSISTENCY_RADIUS,
                     eps: float = CONSISTENCY_EPS) -> np.ndarray:
    """Stripe-aware fusion: weight each axis by 1/(eps + its slice inconsistency)²."""
    weights = np.stack([1.0 / (eps + slice_inconsistency(p, a, radius)) ** 2
                        for p, a in zip(preds, axes, strict=True)])
    num = (weights[..., None] * preds.astype(np.float32)).sum(axis=0)
    return np.rint(num / weights.sum(axis=0)[..., None]).astype(np.uint8)


def with_alpha(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) uint8 → (…, 4) uint8 with alpha = mean of RGB (§2.11), rounded."""
    total = rgb[..., 0].astype(np.uint16)
    total += rgb[..., 1]
    total += rgb[..., 2]
    alpha = mean_table(3)[total]
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def rgba_planes(rgb: np.ndarray, out: np.ndarray | None = None,
                work: Workspace | None = None) -> np.ndarray:
    """(Z, Y, X, 3) uint8 → (4, Z, Y, X) uint8 RGBA, channel first (the image's layout);
    the same values as :func:`with_alpha`. ``out``: where to write it."""
    if out is None:
        out = np.empty((4, *rgb.shape[:-1]), np.uint8)
    for c in range(3):
        out[c] = rgb[..., c]
    total = scratch(work, "alpha-sum", rgb.shape[:-1], np.uint16)
    np.add(out[0], out[1], out=total, dtype=np.uint16)
    total += out[2]
    rounded_mean_into(total, 3, out[3])
    return out


def disagreement(preds: np.ndarray, fused: np.ndarray, out: np.ndarray | None = None,
                 work: Workspace | None = None) -> np.ndarray:
    """Per-voxel disagreement of the axes (A, Z, Y, X, 3) with the fused RGB (Z, Y, X, 3).

    ``sqrt(mean over axes and RGB of (P - F)²)`` in uint8 colour units, rounded (0 where
    every axis equals the fused colour; at most 255). Integer squares, one float32 division
    and square root per voxel: the value does not depend on the block it is computed in.
    ``out``: a (Z, Y, X) uint8 array to write it to.
    """
    d = scratch(work, "diff16", fused.shape, np.int16)
    sq = [scratch(work, f"sq{k}", fused.shape, np.int16) for k in range(min(2, len(preds)))]
    per_channel = scratch(work, "sse3", fused.shape, np.uint32)
    for k, p in enumerate(preds):  # contiguous passes; the strided sum over channels once
        np.subtract(p, fused, out=d, dtype=np.int16)
        # |d| <= 255: d² <= 65025 wraps in int16, exact as uint16
        np.multiply(d, d, out=sq[k] if k < len(sq) else d)
        if k == 1:
            np.add(sq[0].view(np.uint16), sq[1].view(np.uint16), out=per_channel,
                   dtype=np.uint32)
        elif k > 1:
            np.add(per_channel, d.view(np.uint16), out=per_channel)
    if len(preds) == 1:
        per_channel[...] = sq[0].view(np.uint16)
    sse = scratch(work, "sse", fused.shape[:-1], np.uint32)
    np.add(per_channel[..., 0], per_channel[..., 1], out=sse)
    for c in range(2, fused.shape[-1]):
        sse += per_channel[..., c]
    ms = scratch(work, "ms", sse.shape, np.float32)
    np.divide(sse, np.float32(fused.shape[-1] * len(preds)), out=ms, dtype=np.float32)
    np.sqrt(ms, out=ms)
    np.rint(ms, out=ms)
    if out is None:
        return ms.astype(np.uint8)
    np.copyto(out, ms, casting="unsafe")
    return out


def fuse_block(preds: np.ndarray, axes: tuple[int, ...], method: str) -> np.ndarray:
    """Fuse stacked per-axis predictions (A, Z, Y, X, 3) → RGB with ``method``."""
    if len(axes) == 1:
        return preds[0]
    if method == "mean":
        return fuse_mean(preds)
    if method == "median":
        return fuse_median(preds)
    if method == "consistency":
        return fuse_consistency(preds, axes)
    raise UsageError(f"unknown fuse method {method!r} (choose from {', '.join(METHODS)})")


@functools.cache
def background_rgba() -> tuple[int, int, int, int]:
    """The normalised slide background as RGBA (alpha = mean of RGB, as everywhere)."""
    colour = np.rint(np.asarray(NORMALISED_BACKGROUND)).astype(np.uint8)
    return tuple(int(v) for v in with_alpha(colour[None])[0])  # type: ignore[return-value]


def paint_outside(rgba: np.ndarray, conf: np.ndarray | None, outside: np.ndarray) -> None:
    """In place: ``outside`` voxels of channel-first ``rgba`` get the slide background, of
    ``conf`` 0 (bitwise select: no branch per voxel)."""
    on = outside.view(np.uint8) * np.uint8(255)
    off = ~on
    for plane, value in zip(rgba, background_rgba(), strict=True):
        plane &= off
        plane |= on & np.uint8(value)
    if conf is not None:
        conf &= off


def method_halo(method: str, n_axes: int) -> int:
    """Voxels of neighbouring data a method needs around a chunk."""
    return max(1, CONSISTENCY_RADIUS) if method == "consistency" and n_axes > 1 else 0


# --------------------------------------------------------------------------- driver


@dataclass
class FuseReport:
    """What a fuse pass did and what is still missing."""

    output: Path
    fused: list[str] = field(default_factory=list)
    already: int = 0
    waiting: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.waiting

    def summary(self) -> str:
        n_total = len(self.fused) + self.already + len(self.waiting) + len(self.missing)
        lines = [f"{self.output}: fused {len(self.fused)} new chunk(s), {self.already} "
                 f"already fused, {n_total} in the plan ({self.seconds:.1f} s)"]
        if self.waiting:
            lines.append(f"  waiting on neighbours: {len(self.waiting)} chunk(s)")
        if self.missing:
            shown = ", ".join(f"{c} ({'/'.join(a)})" for c, a in list(self.missing.items())[:8])
            more = "" if len(self.missing) <= 8 else f" … and {len(self.missing) - 8} more"
            lines.append(f"  missing axes: {len(self.missing)} chunk(s): {shown}{more}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def read_axis_block(run_dir: Path, plan: Plan, axes: tuple[str, ...], region: Region,
                    halo: int, arrays: dict[str, Any] | None = None) -> tuple[np.ndarray, Region]:
    """Per-axis predictions over ``region`` + ``halo`` (edge-padded at the volume border).

    ``arrays`` holds already opened per-axis arrays (else they are opened here). Returns the
    stacked (A, …, 3) block and the slices of ``region`` inside it.
    """
    import zarr

    grown = grow(region, halo, plan.shape)
    pad = [(s.start - g.start, g.stop - s.stop) for s, g in zip(region, grown, strict=True)]
    edge = [(halo - a, halo - b) for a, b in pad]
    blocks = []
    for axis in axes:
        arr = (arrays or {}).get(axis) or zarr.open_array(str(axis_store(run_dir, axis)),
                                                          mode="r")
        try:
            block = np.asarray(arr[grown])
        except Exception as exc:  # damaged storage chunk: one line + the command to redo it
            raise damaged_axis_error(run_dir, axis, arr, grown, exc) from None
        if halo:
            block = np.pad(block, [*edge, (0, 0)], mode="edge")
        blocks.append(block)
    inner = tuple(slice(halo, halo + s.stop - s.start) for s in region)
    return np.stack(blocks), inner  # type: ignore[return-value]


@dataclass
class FuseTask:
    """The block task of fusion: fuse a group of storage chunks, then their records.

    Picklable (executors ship it); the plan and opened arrays are cached per process and
    dropped when pickled. Calling it with a list of chunk indices (a group of
    :func:`fuse_groups`) reads the CT for the outside test once over the group's box,
    fuses the chunks into level 0 (RGBA and, with ``confidence``, the disagreement),
    writes the level-1 storage chunks whose level-0 chunks are all in the group, and each
    chunk's completion record once its level-0 data is written (:meth:`__call__`).
    """

    run_dir: str
    image: str
    task: str
    axes: tuple[str, ...]
    method: str
    fill_outside: bool = True
    confidence: bool = False
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def _opened(self) -> dict[str, Any]:
        import zarr

        if not self._cache:
            run = Path(self.run_dir)
            root = omezarr.open_image(self.image)
            images = [root, *([root[DISAGREEMENT]] if self.confidence else [])]
            self._cache.update(
                plan=load_plan(run),
                pyramid=[[img[k] for k in ("0", "1") if k in img] for img in images],
                arrays={a: zarr.open_array(str(axis_store(run, a)), mode="r")
                        for a in self.axes})
        return self._cache

    def read_ct(self, box: Region) -> tuple[np.ndarray, Region]:
        """The run's input CT over ``box`` + the outside test's halo (one read), and that
        grown box."""
        c = self._opened()
        plan = c["plan"]
        if "source" not in c:
            c["source"] = open_volume(input_at(plan, self.run_dir), plan.nan_policy,
                                      plan.nan_value, scan=False)
        # the outside test sees the CT the generator saw (docs/cupping.md), in whole grey values
        return corrected_read(c["source"], box, OUTSIDE_REACH, plan.ct_recipe.cupping,
                              rounded=True)

    def inside(self, box: Region, ct: tuple[np.ndarray, Region],
               work: Workspace | None = None) -> tuple[np.ndarray, Region]:
        """The vote's inside mask (:func:`inside_sample`) over ``box`` + ``OUTSIDE_OPEN``,
        from CT ``ct`` read by :meth:`read_ct` over ``box``; and that grown box."""
        plan = self._opened()["plan"]
        raw, grown = ct
        levels = (plan.bone_level, plan.background_level)
        inner = grow(box, OUTSIDE_OPEN, plan.shape)
        shape = tuple(s.stop - s.start for s in inner)
        threshold = outside_threshold(levels)
        if float(raw.min()) >= threshold:  # all inside (or all outside): no box sums
            return np.ones(shape, bool), inner
        if float(raw.max()) < threshold:
            return np.zeros(shape, bool), inner
        return inside_sample(raw, inner, grown, levels, work=work), inner

    def outside(self, region: Region, inside: tuple[np.ndarray, Region]) -> np.ndarray:
        """Outside-the-sample voxels of ``region`` (:func:`outside_from_inside`) from the mask
        :meth:`inside` computed over a box holding ``region``."""
        plan = self._opened()["plan"]
        mask, box = inside
        mid = grow(region, OUTSIDE_OPEN, plan.shape)
        return outside_from_inside(mask[relative(mid, box)], region, mid)

    def fuse_chunk(self, block: np.ndarray, halo: int, outside: np.ndarray | None,
                   work: Workspace | None = None, outputs: Any = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        """Channel-first RGBA (4, Z, Y, X) and disagreement (1, Z, Y, X) (None without
        ``confidence``) of one chunk from its axis ``block`` (+ ``halo``); ``outside``
        voxels painted. ``work``: scratch arrays; ``outputs(name, shape)``: the arrays to
        return (else new ones)."""
        shape = tuple(n - 2 * halo for n in block.shape[1:4])
        if self.method == "mean" and len(self.axes) > 1:  # fuse_mean, in scratch memory
            total = scratch(work, "sum", block.shape[1:], np.uint16)
            np.add(block[0], block[1], out=total, dtype=np.uint16)
            for p in block[2:]:
                total += p
            rgb = scratch(work, "rgb", block.shape[1:], np.uint8)
            rounded_mean_into(total, len(block), rgb)
        else:
            rgb = fuse_block(block, tuple(AXIS_INDEX[a] for a in self.axes), self.method)
        if halo:
            inner = (slice(None), *(slice(halo, n - halo) for n in block.shape[1:4]))
            block, rgb = block[inner], rgb[inner[1:]]
        new = outputs or (lambda name, shape: np.empty(shape, np.uint8))
        rgba = rgba_planes(rgb, new("rgba", (4, *shape)), work)
        conf = None
        if self.confidence and len(self.axes) > 1:
            conf = new("conf", (1, *shape))
            disagreement(block, rgb, conf[0], work)
        if outside is not None and outside.any():
            paint_outside(rgba, conf, outside)
        return rgba, conf

    def __call__(self, indices: list[int]) -> list[str]:
        """Fuse chunks ``indices`` (a group); returns their names once recorded.

        The CT is read once for the whole group. I/O goes by *blocks*: the 2×2×2 chunks
        under a level-1 storage chunk whose chunks are all in the group (read with one call
        per axis array, written with one call per level array, then that level-1 chunk
        from memory), and single chunks for the rest. Chunks are fused one by one inside a
        block (small, cache-friendly arrays). Reads of the next block and writes of the
        last ones run in two threads (zarr's codecs, file I/O and fsync release the GIL)
        while this one is fused. A chunk's record follows once its level-0 data is
        written (its level-1 chunk may come later: the pending-pyramid marker covers a
        crash in between).
        """
        if not indices:
            return []
        plan = self._opened()["plan"]
        # running / failed markers under the group's first chunk (what `status` reads)
        with rundir.marked(self.run_dir, self.task, plan.chunk_name(indices[0])):
            return self._fuse_group(indices)

    def _fuse_group(self, indices: list[int]) -> list[str]:
        c = self._opened()
        plan, pyramid = c["plan"], c["pyramid"]
        run = Path(self.run_dir)
        regions = {i: plan.write_region(i) for i in indices}
        halo = method_halo(self.method, len(self.axes))
        blocks = io_blocks(plan, pyramid, indices, regions)
        info = {"method": self.method if len(self.axes) > 1 else "single-axis"}
        work = c.setdefault("work", Workspace())
        outputs = c.setdefault("outputs", OutputRings())

        def read(box: Region) -> np.ndarray:
            return read_axis_block(run, plan, self.axes, box, halo, c["arrays"])[0]

        def record(index: int) -> None:
            name = plan.chunk_name(index)
            write_record(self.run_dir, self.task, name, {"chunk": name, **info,
                                                         "time": time.time()})

        with ThreadPoolExecutor(max_workers=2) as io:
            box = bounding_box(list(regions.values()))
            ct_read = io.submit(self.read_ct, box) if self.fill_outside else None
            ahead = io.submit(read, blocks[0][0])
            writes: deque[Future[None]] = deque()
            unrecorded: deque[tuple[list[int], list[Future[None]]]] = deque()
            records: list[Future[None]] = []

            def put(array: Any, region: Region, data: np.ndarray) -> Future[None]:
                writes.append(io.submit(_write, array, region, data))
                while len(writes) > IO_QUEUE:
                    writes.popleft().result()
                return writes[-1]

            def flush(wait: bool = False) -> None:
                while unrecorded and (wait or all(f.done() for f in unrecorded[0][1])):
                    chunks, futures = unrecorded.popleft()
                    for f in futures:
                        f.result()  # a failed write raises here: no record for it
                    records.extend(io.submit(record, i) for i in chunks)

            ct = None if ct_read is None else ct_read.result()
            # the vote once over the group (+ OUTSIDE_OPEN), then the CT goes
            inside = None if ct is None else self.inside(box, ct, work)
            del ct
            for n, (box, children, dst) in enumerate(blocks):
                preds = ahead.result()
                if n + 1 < len(blocks):
                    ahead = io.submit(read, blocks[n + 1][0])
                shape = tuple(s.stop - s.start for s in box)
                outs = [outputs.get(j, (lv[0].shape[0], *shape)) for j, lv in enumerate(pyramid)]
                # halo-free: the outside test once over the block (a voxel's answer does not
                # depend on the box it is computed in)
                whole = None if inside is None or halo else self.outside(box, inside)
                for part, rel in fuse_parts(box, [regions[i] for i in children], halo):
                    block = preds[(slice(None), *(slice(r.start, r.stop + 2 * halo)
                                                  for r in rel))]
                    views = {"rgba": outs[0][(slice(None), *rel)],
                             "conf": outs[-1][(slice(None), *rel)]}
                    outside = (whole[rel] if whole is not None else
                               None if inside is None else self.outside(part, inside))
                    self.fuse_chunk(block, halo, outside, work,
                                    lambda name, _, views=views: views[name])
                del preds
                futures = [put(lv[0], box, data) for lv, data in zip(pyramid, outs, strict=True)]
                outputs.writing(outs, futures)
                unrecorded.append((children, futures))
                if dst is not None:  # the level-1 storage chunk above this block
                    for lv, data in zip(pyramid, outs, strict=True):
                        put(lv[1], dst, omezarr.downsample2(data))
                flush()
            while writes:
                writes.popleft().result()
            flush(wait=True)
            for f in records:
                f.result()
        return [plan.chunk_name(i) for i in indices]



def fuse_parts(box: Region, chunks: list[Region], halo: int, depth: int = FUSE_SLAB
               ) -> list[tuple[Region, Region]]:
    """The pieces an I/O block ``box`` is fused in, as (region, region relative to ``box``).

    Without a halo every voxel is fused on its own, so the block goes in slabs of ``depth``
    z-slices across its whole y-x extent (contiguous, cache-sized arrays); with one
    (``consistency``) chunk by chunk, each with its halo.
    """
    if halo:
        return [(r, relative(r, box)) for r in chunks]
    parts = []
    for z in range(box[0].start, box[0].stop, depth):
        part = (slice(z, min(z + depth, box[0].stop)), *box[1:])
        parts.append((part, relative(part, box)))
    return parts


def io_blocks(plan: Plan, pyramid: list[Any], indices: list[int], regions: dict[int, Region]
              ) -> list[tuple[Region, list[int], Region | None]]:
    """The I/O blocks of a fuse task: (box, its chunks, the level-1 storage chunk written
    from it or None): the 2×2×2 chunks under a level-1 chunk whose chunks are all in the
    task, then single chunks for the rest."""
    parents = level1_parents(plan, pyramid[0][1], indices) if len(pyramid[0]) > 1 else []
    blocks: list[tuple[Region, list[int], Region | None]] = [
        (src, children, dst) for dst, src, children in parents]
    covered = {i for _, children, _ in blocks for i in children}
    return blocks + [(regions[i], [i], None) for i in indices if i not in covered]


class OutputRings:
    """Output arrays in rings of two per level and shape: one is filled while the other is
    written (a buffer is handed out again only once its level-0 write finished)."""

    def __init__(self) -> None:
        self._rings: dict[tuple[int, tuple[int, ...]], list[np.ndarray]] = {}
        self._busy: dict[int, Future[None]] = {}  # id(output array) → its level-0 write

    def get(self, level: int, shape: tuple[int, ...]) -> np.ndarray:
        ring = self._rings.setdefault((level, shape), [])
        if len(ring) < 2:
            ring.append(np.empty(shape, np.uint8))
        else:
            ring.append(ring.pop(0))
            pending = self._busy.pop(id(ring[-1]), None)
            if pending is not None:
                pending.result()
        return ring[-1]

    def writing(self, arrays: list[np.ndarray], futures: list[Future[None]]) -> None:
        self._busy.update((id(a), f) for a, f in zip(arrays, futures, strict=True))


def _write(array: Any, region: Region, data: np.ndarray) -> None:
    """``array[:, region] = data``. zarr tests every chunk it writes for being all fill
    value (to skip storing it) with a full ``np.array_equal`` against a broadcast fill
    array: a third of the cost of a write here. On zarr v2 arrays with fill value 0, when
    no storage chunk of ``region`` is all 0 (one ``any`` each), the write goes through a
    handle that skips that test: the same chunks are stored, with the same bytes."""
    if _no_empty_chunk(array, region, data):
        array = array.with_config({"write_empty_chunks": True})
    array[(slice(None), *region)] = data


def _no_empty_chunk(array: Any, region: Region, data: np.ndarray) -> bool:
    if (array.metadata.zarr_format != 2 or array.fill_value != 0
            or not hasattr(array, "with_config")):
        return False
    chunk = tuple(array.chunks[1:])
    for coords in chunks_touched(region, chunk):
        box = tuple(slice(max(i * c, r.start), min((i + 1) * c, r.stop))
                    for i, c, r in zip(coords, chunk, region, strict=True))
        if not data[(slice(None), *relative(box, region))].any():
            return False
    return True


def bounding_box(regions: list[Region]) -> Region:
    """The smallest box holding every region."""
    return tuple(slice(min(r[d].start for r in regions), max(r[d].stop for r in regions))
                 for d in range(len(regions[0])))


def level1_parents(plan: Plan, level1: Any, indices: list[int]
                   ) -> list[tuple[Region, Region, list[int]]]:
    """Level-1 storage chunks (of array ``level1``) whose level-0 voxels all come from
    chunks ``indices``: (level-1 region, level-0 region below it, the chunks covering it).
    """
    if not indices:
        return []
    block, shape1 = omezarr.write_block(level1), tuple(level1.shape[1:])
    group = set(indices)
    touched: set[tuple[int, ...]] = set()
    for i in indices:
        half = tuple(slice(s.start // 2, (s.stop + 1) // 2) for s in plan.write_region(i))
        touched.update(chunks_touched(half, block))
    out = []
    for coords in sorted(touched):
        dst = tuple(slice(i * c, min(n, (i + 1) * c))
                    for i, c, n in zip(coords, block, shape1, strict=True))
        src = tuple(slice(2 * d.start, min(n, 2 * d.stop))
                    for d, n in zip(dst, plan.shape, strict=True))
        children = [plan.chunk_index(cc) for cc in chunks_touched(src, plan.chunk)]  # type: ignore[arg-type]
        if group.issuperset(children):
            out.append((dst, src, children))
    return out


def fuse_groups(plan: Plan, todo: list[int], min_groups: int = 1,
                budget: int = FUSE_GROUP_VOXELS) -> list[list[int]]:
    """``todo`` cut into the chunk groups of fuse tasks, in order.

    A group is an aligned block of chunks, 2 chunks deep along z and an even number (or
    all) along y and x, as large as ``budget`` CT voxels (with the outside test's halo)
    allows, and small enough to give ``min_groups`` groups (parallel runs); blocks of
    2×2×2 chunks hold whole level-1 storage chunks. Chunks larger than the budget fuse
    one per group.
    """
    grid = plan.grid
    margin = 2 * OUTSIDE_REACH

    def voxels(b: list[int]) -> int:
        return math.prod(min(k * c, n) + margin
                         for k, c, n in zip(b, plan.chunk, plan.shape, strict=True))

    def count(b: list[int]) -> int:
        return math.prod(-(-g // k) for g, k in zip(grid, b, strict=True))

    block = [2, grid[1] + grid[1] % 2, grid[2] + grid[2] % 2]
    while (voxels(block) > budget or count(block) < min_groups) and max(block[1:]) > 2:
        d = 1 if block[1] * plan.chunk[1] >= block[2] * plan.chunk[2] else 2
        d = d if block[d] > 2 else 3 - d
        block[d] = -(-block[d] // 4) * 2  # halve, staying even
    if voxels(block) > budget:
        block = [1, 1, 1]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in todo:
        key = tuple(c // b for c, b in zip(plan.chunk_coords(i), block, strict=True))
        groups.setdefault(key, []).append(i)
    return [groups[k] for k in sorted(groups)]


def _settings(plan: Plan, method: str, axes: tuple[str, ...],
              voxel_size_um: tuple[float, float, float] | None, n_levels: int, ngff: str
              ) -> dict[str, Any]:
    return {"method": method if len(axes) > 1 else "single-axis", "axes": list(axes),
            "voxel_size_um": list(voxel_size_um) if voxel_size_um else None,
            "levels": n_levels, "ngff": ngff,
            "plan_generator_sha256": plan.generator_sha256 or plan.checkpoint_sha256}


def ready_chunks(run_dir: Path, plan: Plan, axes: tuple[str, ...], task: str, method: str,
                 report: FuseReport) -> list[int]:
    """Chunks whose axes' units (over the chunk + fusion halo) are all done, not yet fused."""
    done = {a: done_names(run_dir, f"axis-{a}") for a in axes}
    fused = done_names(run_dir, task)
    halo = method_halo(method, len(axes))
    todo = []
    for i in range(plan.n_chunks):
        name = plan.chunk_name(i)
        if name in fused:
            report.already += 1
            continue
        region = plan.write_region(i)
        missing = [a for a in axes if not set(plan.units_covering(a, region)) <= done[a]]
        if missing:
            report.missing[name] = missing
            continue
        grown = grow(region, halo, plan.shape)
        if halo and any(not set(plan.units_covering(a, grown)) <= done[a] for a in axes):
            report.waiting.append(name)
        else:
            todo.append(i)
    return todo


def image_name(run_dir: Path, out: str | None, single_axis: str | None) -> str:
    """The fused image's name inside the run (``--out`` checked: a name, not a path)."""
    if out is not None and (not out or Path(out).name != out or out in (".", "..")):
        # [issue 24] a path would put the image's records where `status` never looks
        raise UsageError(f"--out {out!r}: the name of an image inside {run_dir} (e.g. "
                         "fused-05.ome.zarr), not a path")
    if out is not None and not out.endswith(".zarr"):
        out += ".ome.zarr"
    return out or ("fused.ome.zarr" if single_axis is None
                   else f"slicewise-{single_axis}.ome.zarr")


def fuse_run(run_dir: str | os.PathLike[str], method: Method | None = None,
             single_axis: str | None = None, voxel_size_um: tuple[float, float, float] | None
             = None, pyramid_levels: int | None = None, out: str | None = None,
             overwrite: bool = False, **kwargs: Any) -> FuseReport:
    """Fuse a run (see :func:`_fuse_run`). [issue 24] With ``overwrite`` the existing image
    (and its chunk records) is set aside first and restored if this pass fails for any
    reason (a missing input, a damaged axis chunk, Ctrl-C): an overwrite replaces a good
    image only with a finished pass, never with zeros. ``method`` None: the plan's
    ``fuse_method`` (the checkpoint's ``data.fuse_method``; mean for older runs)."""
    run = Path(run_dir)
    name = image_name(run, out, single_axis)
    task = name.removesuffix(".zarr").removesuffix(".ome")
    image, records = run / name, run / "done" / task
    aside = (run / f".{name}.previous", run / "done" / f".{task}.previous")
    kwargs.update(method=method, single_axis=single_axis, voxel_size_um=voxel_size_um,
                  pyramid_levels=pyramid_levels, out=out, overwrite=overwrite)
    if not (overwrite and image.exists()):
        return _fuse_run(run, **kwargs)
    if aside[0].exists():
        raise InputError(f"{aside[0]}: an earlier `fuse --overwrite` of {name} was cut off; "
                         f"its previous image is kept there — move it back to {image} (and "
                         f"{aside[1]} to {records}) or delete both, then fuse again")
    image.rename(aside[0])
    if records.exists():
        records.rename(aside[1])
    try:
        report = _fuse_run(run, **kwargs)
    except BaseException:
        for new, old in zip((image, records), aside, strict=True):
            shutil.rmtree(new, ignore_errors=True)
            if old.exists():
                old.rename(new)
        raise
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)
    return report


def _fuse_run(run_dir: str | os.PathLike[str], method: Method | None = None,
              single_axis: str | None = None, voxel_size_um: tuple[float, float, float] | None
              = None, pyramid_levels: int | None = None, out: str | None = None,
              overwrite: bool = False, progress: bool = False, workers: int = 1,
              runner: Runner | None = None, ngff: str = "0.4", fill_outside: bool = True,
              confidence: bool = True) -> FuseReport:
    """Fuse every chunk complete on all axes (and not fused yet) into an OME-Zarr image.

    ``out`` defaults to ``fused.ome.zarr`` (or ``slicewise-{axis}.ome.zarr`` with
    ``single_axis``) inside ``run_dir``. Settings are stored in the image; re-running with
    different settings is refused unless ``overwrite`` (which starts the image afresh).
    Chunk groups are block tasks (:mod:`hpcstain.volume.tasks`) run by ``runner`` (from
    :func:`hpcstain.executors.pass_runner`: local processes, dask, MPI), by default in this
    process, or on ``workers`` local processes; ``workers`` also sets how many groups the
    chunks are cut into. The pyramid is built afterwards, here. ``ngff`` picks
    the output format: NGFF 0.4 (zarr v2) or 0.5 (zarr v3, one shard per storage chunk).
    ``fill_outside`` paints voxels outside the sample (from the input CT) with the
    normalised background colour. ``confidence`` (with two or more axes) also writes the
    axes' per-voxel disagreement, ``<image>/disagreement`` (module docstring).
    """
    start = start_fuse(run_dir, method, single_axis, voxel_size_um, pyramid_levels, out, overwrite,
                       workers, ngff, fill_outside, confidence)
    if runner is None:
        runner = functools.partial(run_processes, workers=workers)
    return start.finish(runner(start.task_pass(), progress) if start.groups else [])


@dataclass
class FuseStart:
    """A fuse pass set up (:func:`start_fuse`): the image exists with its settings, the
    chunks to fuse are cut into groups (the jobs of :meth:`task_pass`); :meth:`finish`
    builds the pyramid once the groups are fused."""

    run_dir: Path
    plan: Plan
    image: Path
    task: str
    confidence: bool
    fuse: FuseTask
    todo: list[int]
    groups: list[list[int]]
    rebuild: bool
    report: FuseReport
    t0: float

    def task_pass(self) -> TaskPass:
        """The chunk groups as a block-task pass (jobs: lists of chunk indices)."""
        return TaskPass(self.fuse, self.groups, label="fuse", unit="chunk",
                        weights=[len(g) for g in self.groups],
                        keys=[f"fuse-{self.task}-{self.plan.chunk_name(g[0])}"
                              for g in self.groups])

    def finish(self, fused: list[str]) -> FuseReport:
        """Build the pyramid over the chunks fused (and over an earlier pass's, when that
        pass stopped before its pyramid); the report."""
        plan, run_dir, task = self.plan, self.run_dir, self.task
        self.report.fused = fused
        pending = rundir.pyramid_pending(run_dir, task)
        if self.todo or self.rebuild:
            root = omezarr.open_image(self.image)
            images = [root, *([root[DISAGREEMENT]] if self.confidence else [])]
            recorded = done_names(run_dir, task) if self.rebuild else set()
            chunks = self.todo if not self.rebuild else [
                i for i in range(plan.n_chunks) if plan.chunk_name(i) in recorded]
            skip: dict[int, set[tuple[int, ...]]] = {}
            if "1" in root:  # level-1 chunks the tasks wrote from memory
                block1 = omezarr.write_block(root["1"])
                skip[1] = {tuple(d.start // b for d, b in zip(dst, block1, strict=True))
                           for g in self.groups for dst, _, _ in level1_parents(plan, root["1"], g)}
            for img in images:
                omezarr.build_pyramid(img, [plan.write_region(i) for i in chunks], skip=skip)
            pending.unlink(missing_ok=True)
        self.report.seconds = time.perf_counter() - self.t0
        return self.report


def start_fuse(run_dir: str | os.PathLike[str], method: Method | None = None,
               single_axis: str | None = None, voxel_size_um: tuple[float, float, float]
               | None = None, pyramid_levels: int | None = None, out: str | None = None,
               overwrite: bool = False, workers: int = 1, ngff: str = "0.4",
               fill_outside: bool = True, confidence: bool = True, after_stain: bool = False
               ) -> FuseStart:
    """Set a fuse pass up (arguments as :func:`_fuse_run`): check the settings, create or
    reopen the image, and pick the chunks to fuse: those complete on all axes, or with
    ``after_stain`` every chunk not fused yet (a task graph fuses each once the stain units
    it reads are done: :func:`chunk_needs`)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    plan = load_plan(run_dir)
    if method is None:  # the checkpoint's recipe (data.fuse_method), recorded in the plan
        method = cast(Method, plan.fuse_method)
    if method not in METHODS:
        raise UsageError(f"unknown fuse method {method!r} (choose from {', '.join(METHODS)})")
    if single_axis is not None:
        if single_axis not in plan.axes:
            raise UsageError(f"{run_dir}: axis {single_axis!r} was not stained (plan axes: "
                             f"{','.join(plan.axes)})")
        axes: tuple[str, ...] = (single_axis,)
    else:
        axes = plan.axes
    notes = []
    if voxel_size_um is None:
        voxel_size_um = plan.voxel_size_um
    if voxel_size_um is None:  # NGFF: scale 1 per voxel and no unit (docs/volume.md)
        notes.append("voxel size unknown (no input metadata, no --voxel-size): scale 1 per "
                     "voxel, no unit")
    n_levels = pyramid_levels or omezarr.default_levels(plan.shape)
    name = image_name(run_dir, out, single_axis)
    image = run_dir / name
    task = name.removesuffix(".zarr").removesuffix(".ome")
    settings = _settings(plan, method, axes, voxel_size_um, n_levels, ngff)
    settings["fill_outside"] = fill_outside
    settings["outside_test"] = OUTSIDE_TEST if fill_outside else "none"
    settings["confidence"] = bool(confidence and len(axes) > 1)
    if fill_outside:  # [issue 24] the input CT must open before an image is (re)started:
        open_volume(input_at(plan, run_dir), plan.nan_policy, plan.nan_value, scan=False)
    _prepare_image(run_dir, plan, image, task, settings, overwrite, name)
    report = FuseReport(output=image, notes=notes)
    if after_stain:
        fused = done_names(run_dir, task)
        todo = [i for i in range(plan.n_chunks) if plan.chunk_name(i) not in fused]
        report.already = plan.n_chunks - len(todo)
    else:
        todo = ready_chunks(run_dir, plan, axes, task, method, report)
    fuse = FuseTask(str(run_dir), str(image), task, axes, method, fill_outside,
                    settings["confidence"])
    pending = rundir.pyramid_pending(run_dir, task)
    rebuild = pending.is_file()  # an earlier pass stopped before its pyramid was built
    groups = fuse_groups(plan, todo, min_groups=4 * workers if workers > 1 else 1)
    if todo:
        pending.touch()
    return FuseStart(run_dir, plan, image, task, settings["confidence"], fuse, todo, groups,
                     rebuild, report, t0)


def chunk_needs(plan: Plan, chunks: list[int], axes: tuple[str, ...], method: str
                ) -> dict[str, set[str]]:
    """The stain units (names per axis) that fusing ``chunks`` reads: every unit whose write
    region meets a chunk grown by the method's halo."""
    halo = method_halo(method, len(axes))
    needs: dict[str, set[str]] = {a: set() for a in axes}
    for i in chunks:
        grown = grow(plan.write_region(i), halo, plan.shape)
        for a in axes:
            needs[a].update(plan.units_covering(a, grown))
    return needs


def _prepare_image(run_dir: Path, plan: Plan, image: Path, task: str, settings: dict[str, Any],
                   overwrite: bool, name: str) -> None:
    """Create the OME-Zarr image, or check that the existing one has the same settings."""
    if image.exists() and not overwrite:
        try:
            old = omezarr.open_image(image, mode="r").attrs.get("hpcstain", {})
        except Exception as exc:
            raise InputError(f"{image}: unreadable fused image ({exc}); pass overwrite") from None
        old = {**SETTING_DEFAULTS, **old}  # images fused before a setting existed
        # before the opening (thin detached walls kept): the box-mean test alone
        old.setdefault("outside_test", "box5" if old.get("fill_outside", True) else "none")
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise UsageError(f"{image}: was fused with different settings ({detail}); "
                             "pass --overwrite to start it afresh or --out for a new image")
        return
    if overwrite:
        shutil.rmtree(run_dir / "done" / task, ignore_errors=True)
    omezarr.create_image(image, plan.shape, plan.chunk, settings["levels"],
                         tuple(settings["voxel_size_um"] or ()) or None, {"hpcstain": settings},
                         name=name.removesuffix(".zarr").removesuffix(".ome"),
                         overwrite=overwrite, version=settings["ngff"],
                         scalars=(DISAGREEMENT,) if settings.get("confidence") else ())
    (run_dir / "done" / task).mkdir(parents=True, exist_ok=True)


__all__ = ["METHODS", "FuseReport", "FuseStart", "chunk_needs", "fuse_block",
           "fuse_consistency", "fuse_mean", "fuse_median", "fuse_run", "record_path",
           "slice_inconsistency", "start_fuse", "stripe_index", "with_alpha"]
