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
rounded to uint8. Outside the sample (CT averaged over 5³ voxels below the background
level + 8 % of the bone–background gap: resin, air) the generator was never trained (§2.8
masks train it inside the sample only) and invents colour; those voxels get the normalised
slide background (250, 250, 250) instead (``fill_outside``; the paper's §2.8 rule for 2D).
``single_axis`` copies one axis through unchanged (the paper's slice-wise volume).

Fusion is a block task over the storage chunks of the output: a chunk is fused once every
axis's work units (slabs) covering it are done; ``consistency`` also needs the voxels
around it (its halo of ``r`` voxels), so its result does not depend on the chunking. Each
chunk writes only its own level-0 storage chunk, then its completion record, so chunks
fuse in parallel (``workers > 1``: a dask LocalCluster, or a given dask client); the
pyramid levels are built after level 0, once per touched storage chunk. Re-running fuses
only chunks without a record.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from hpcstain.errors import InputError, UsageError
from hpcstain.geometry import Region, grow
from hpcstain.metrics.stripes import stripe_index
from hpcstain.volume import omezarr
from hpcstain.volume.plan import (
    AXIS_INDEX,
    Plan,
    axis_store,
    done_names,
    load_plan,
    record_path,
    write_record,
)

Method = Literal["mean", "median", "consistency"]
METHODS = ("mean", "median", "consistency")

CONSISTENCY_RADIUS = 2
CONSISTENCY_EPS = 1.0
OUTSIDE_HALO = 2          # voxels: the CT is averaged over (2·2 + 1)³ before the test
OUTSIDE_FRACTION = 0.08   # of the bone–background gap above the background level


# --------------------------------------------------------------------------- pure core


def fuse_mean(preds: np.ndarray) -> np.ndarray:
    """(A, Z, Y, X, 3) uint8 → (Z, Y, X, 3) uint8: average over axes A (rounded half to even)."""
    total = preds[0].astype(np.uint16)
    for p in preds[1:]:
        total += p
    return omezarr.rounded_mean(total, len(preds))


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
    alpha = omezarr.rounded_mean(total, 3)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


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


def outside_sample(ct: np.ndarray, levels: tuple[float, float]) -> np.ndarray:
    """Voxels of (smoothed) raw CT at or below the embedding medium: resin, air."""
    bone, background = levels
    return ct < background + OUTSIDE_FRACTION * (bone - background)


def fill_background(rgba: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """RGBA with ``outside`` voxels set to the normalised slide background."""
    from hpcstain.predict import NORMALISED_BACKGROUND

    colour = np.rint(np.asarray(NORMALISED_BACKGROUND)).astype(np.uint8)
    fill = np.array([*colour, with_alpha(colour[None])[0, 3]], np.uint8)
    return np.where(outside[..., None], fill, rgba)


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
            from hpcstain.volume.repair import damaged_axis_error

            raise damaged_axis_error(run_dir, axis, arr, grown, exc) from None
        if halo:
            block = np.pad(block, [*edge, (0, 0)], mode="edge")
        blocks.append(block)
    inner = tuple(slice(halo, halo + s.stop - s.start) for s in region)
    return np.stack(blocks), inner  # type: ignore[return-value]


@dataclass
class FuseTask:
    """The block task of fusion: fuse storage chunks into level 0, then their records.

    Picklable (executors ship it); the plan and opened arrays are cached per process and
    dropped when pickled. Calling it with a list of chunk indices fuses them in order.
    """

    run_dir: str
    image: str
    task: str
    axes: tuple[str, ...]
    method: str
    fill_outside: bool = True
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def _opened(self) -> dict[str, Any]:
        import zarr

        if not self._cache:
            run = Path(self.run_dir)
            self._cache.update(
                plan=load_plan(run), level0=omezarr.open_image(self.image)["0"],
                arrays={a: zarr.open_array(str(axis_store(run, a)), mode="r")
                        for a in self.axes})
        return self._cache

    def rgba(self, index: int) -> np.ndarray:
        """The fused RGBA (Z, Y, X, 4) of one storage chunk."""
        c = self._opened()
        region = c["plan"].write_region(index)
        halo = method_halo(self.method, len(self.axes))
        block, inner = read_axis_block(Path(self.run_dir), c["plan"], self.axes, region, halo,
                                       c["arrays"])
        rgb = fuse_block(block, tuple(AXIS_INDEX[a] for a in self.axes), self.method)
        rgba = with_alpha(rgb[inner])
        if self.fill_outside:
            rgba = fill_background(rgba, self.outside(region))
        return rgba

    def outside(self, region: Region) -> np.ndarray:
        """The outside-the-sample voxels of ``region`` (from the run's input CT)."""
        from hpcstain.volume.io import open_volume
        from hpcstain.volume.stain import smooth

        c = self._opened()
        plan = c["plan"]
        if "source" not in c:
            c["source"] = open_volume(plan.input, plan.nan_policy, plan.nan_value, scan=False)
        grown = grow(region, OUTSIDE_HALO, plan.shape)
        ct = smooth(c["source"].read(grown), region, grown, OUTSIDE_HALO, 0.0, box=True)
        return outside_sample(ct, (plan.bone_level, plan.background_level))

    def __call__(self, indices: list[int]) -> list[str]:
        c = self._opened()
        plan, names = c["plan"], []
        for index in indices:
            region = plan.write_region(index)
            c["level0"][(slice(None), *region)] = np.moveaxis(self.rgba(index), -1, 0)
            name = plan.chunk_name(index)
            write_record(self.run_dir, self.task, name, {
                "chunk": name, "method": self.method if len(self.axes) > 1 else "single-axis",
                "time": time.time()})
            names.append(name)
        return names


def _settings(plan: Plan, method: str, axes: tuple[str, ...],
              voxel_size_um: tuple[float, float, float], n_levels: int, ngff: str
              ) -> dict[str, Any]:
    return {"method": method if len(axes) > 1 else "single-axis", "axes": list(axes),
            "voxel_size_um": list(voxel_size_um), "levels": n_levels, "ngff": ngff,
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


def fuse_run(run_dir: str | os.PathLike[str], method: Method = "mean",
             single_axis: str | None = None, voxel_size_um: tuple[float, float, float] | None
             = None, levels: int | None = None, out: str | None = None,
             overwrite: bool = False, progress: bool = False, workers: int = 1,
             client: Any = None, ngff: str = "0.4", fill_outside: bool = True
             ) -> FuseReport:
    """Fuse every chunk complete on all axes (and not fused yet) into an OME-Zarr image.

    ``out`` defaults to ``fused.ome.zarr`` (or ``slicewise-{axis}.ome.zarr`` with
    ``single_axis``) inside ``run_dir``. Settings are stored in the image; re-running with
    different settings is refused unless ``overwrite`` (which starts the image afresh).
    Chunks are fused in this process, or in parallel on a dask ``client`` or a
    LocalCluster of ``workers`` processes; the pyramid is built afterwards. ``ngff`` picks
    the output format: NGFF 0.4 (zarr v2) or 0.5 (zarr v3, one shard per storage chunk).
    ``fill_outside`` paints voxels outside the sample (from the input CT) with the
    normalised background colour.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    plan = load_plan(run_dir)
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
        if plan.voxel_size_um is not None:
            voxel_size_um = plan.voxel_size_um
        else:
            voxel_size_um = (1.0, 1.0, 1.0)
            notes.append("voxel size unknown (no input metadata, no --voxel-size): using 1 µm")
    n_levels = levels or omezarr.default_levels(plan.shape)
    name = out or ("fused.ome.zarr" if single_axis is None else f"slicewise-{single_axis}.ome.zarr")
    image = run_dir / name
    task = name.removesuffix(".zarr").removesuffix(".ome")
    settings = _settings(plan, method, axes, tuple(voxel_size_um), n_levels, ngff)  # type: ignore[arg-type]
    settings["fill_outside"] = fill_outside
    _prepare_image(run_dir, plan, image, task, settings, overwrite, name)
    report = FuseReport(output=image, notes=notes)
    todo = ready_chunks(run_dir, plan, axes, task, method, report)
    fuse = FuseTask(str(run_dir), str(image), task, axes, method, fill_outside)
    if todo and (workers > 1 or client is not None):
        report.fused = _fuse_on_dask(fuse, todo, workers, client, progress)
    else:
        report.fused = [n for i in _progress(todo, progress, "fuse") for n in fuse([i])]
    if todo:
        omezarr.build_pyramid(omezarr.open_image(image), [plan.write_region(i) for i in todo])
    report.seconds = time.perf_counter() - t0
    return report


def _fuse_on_dask(fuse: FuseTask, todo: list[int], workers: int, client: Any,
                  progress: bool, per_task: int = 8) -> list[str]:
    """Fuse ``todo`` on dask, ``per_task`` chunks per task (amortises opening the arrays)."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if client is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        own = Client(cluster)
    try:
        c = client or own
        groups = [todo[k:k + per_task] for k in range(0, len(todo), per_task)]
        futures = [c.submit(fuse, g, pure=False) for g in groups]
        done = as_completed(futures)
        return sorted(n for f in _progress(done, progress, "fuse") for n in f.result())
    finally:
        if cluster is not None:
            own.close()
            cluster.close()


def _prepare_image(run_dir: Path, plan: Plan, image: Path, task: str, settings: dict[str, Any],
                   overwrite: bool, name: str) -> None:
    """Create the OME-Zarr image, or check that the existing one has the same settings."""
    if image.exists() and not overwrite:
        try:
            old = omezarr.open_image(image, mode="r").attrs.get("hpcstain", {})
        except Exception as exc:
            raise InputError(f"{image}: unreadable fused image ({exc}); pass overwrite") from None
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise UsageError(f"{image}: was fused with different settings ({detail}); "
                             "pass --overwrite to start it afresh or --out for a new image")
        return
    if overwrite:
        shutil.rmtree(run_dir / "done" / task, ignore_errors=True)
    omezarr.create_image(image, plan.shape, plan.chunk, settings["levels"],
                         tuple(settings["voxel_size_um"]), {"hpcstain": settings},
                         name=name.removesuffix(".zarr").removesuffix(".ome"),
                         overwrite=overwrite, version=settings["ngff"])
    (run_dir / "done" / task).mkdir(parents=True, exist_ok=True)


def _progress(items: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="chunk")


__all__ = ["METHODS", "FuseReport", "fuse_block", "fuse_consistency", "fuse_mean",
           "fuse_median", "fuse_run", "record_path", "slice_inconsistency", "stripe_index",
           "with_alpha"]
