"""Staining one work unit (a slab of whole slices along one axis) on the global tile grid.

One unit (daisy's vocabulary: it owns its *write region* and reads a *read region*):

1. read the CT over the unit's read region plus the Gaussian *halo*; pad by reflection only
   where that box meets the true volume border, so the 3D Gaussian (σ = 1 voxel, §2.11)
   gives exactly the whole-volume values;
2. map the CT to [-1, 1] with the plan's raw levels and the checkpoint's target levels
   (§2.5, :mod:`hpcstain.ct.prepare`);
3. stain every slice of the slab perpendicular to the unit's axis with the tile engine on
   the global grid of that slice plane (tiles clamped to the plane), a few slices at a
   time, accumulating only the write region;
4. write RGB uint8 into ``RUN_DIR/axis-{a}.zarr`` (whole storage chunks: one writer per
   chunk), fsync them, and only then write the completion record
   ``RUN_DIR/done/axis-{a}/<unit>.json`` (with the generator pixels it cost).

A voxel's value therefore never depends on the decomposition; re-running skips units
whose record exists. Workers load the run's pinned generator (``RUN_DIR/generator.pt``),
checked against the hash in the plan, never the original checkpoint file.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcstain.atomic import atomic_output
from hpcstain.checkpoint import file_sha256
from hpcstain.ct.prepare import prepare_context
from hpcstain.errors import InputError, UsageError
from hpcstain.geometry import AXIS_INDEX, Region, chunks_touched
from hpcstain.inference import load_pinned, pin_generator
from hpcstain.tiles import auto_batch, stain_region, to_uint8_into
from hpcstain.volume import rundir
from hpcstain.volume.io import VolumeSource, open_volume
from hpcstain.volume.plan import (
    Plan,
    Unit,
    input_at,
    input_from_run,
    load_plan,
    plan_differences,
    save_plan,
)
from hpcstain.volume.rundir import (
    axis_store,
    done_names,
    generator_path,
    is_done,
    plan_path,
    write_record,
)

StainFn = Callable[[torch.Tensor], torch.Tensor]
GROUP_BYTES = 256 << 20  # working memory of one group of slices in the tile engine


# --------------------------------------------------------------------------- pure core


def stain_slab(ct: np.ndarray, ct_box: Region, write: Region, axis: str, plan: Plan,
               fn: StainFn, batch_size: int = 0, counter: list[int] | None = None,
               device: str = "cpu") -> np.ndarray:
    """RGB uint8 (Z, Y, X, 3) of ``write`` stained slice by slice along ``axis``.

    ``ct`` is the normalised CT over ``ct_box`` (the unit's read region: ``write`` along the
    axis, ``write`` + tile context in the plane). Slices go through the tile engine a group
    at a time so that working memory stays near ``GROUP_BYTES``. ``batch_size`` 0 picks the
    tiles per generator call from the device (:func:`hpcstain.tiles.auto_batch`).
    """
    a = AXIS_INDEX[axis]
    dims = [d for d in range(3) if d != a]
    planes = np.moveaxis(ct, a, 0)
    origin = (ct_box[dims[0]].start, ct_box[dims[1]].start)
    region2d = (write[dims[0]], write[dims[1]])
    tile, step = plan.plane_tiling(axis)
    batch_size = auto_batch(tile, device, batch_size)
    in_channels = plan.in_channels
    k, h = plan.context_slices, plan.context_halo  # 2.5D: ``ct`` has h more slices each side
    n_out = planes.shape[0] - 2 * h

    def grey_fn(batch: torch.Tensor) -> torch.Tensor:
        if k > 1:  # the k planes about each slice are the channels already
            return fn(batch)
        return fn(batch.expand(-1, in_channels, -1, -1) if in_channels != 1 else batch)

    per_slice = planes[0].size * 4 * (2 + in_channels) + \
        (region2d[0].stop - region2d[0].start) * (region2d[1].stop - region2d[1].start) * 36
    group = max(1, GROUP_BYTES // max(per_slice, 1))
    # the RGB in the output array's (Z, Y, X, 3) layout, filled through a slice-first view
    shape = [s.stop - s.start for s in write]
    shape[a] = n_out
    stored = np.empty((*shape, 3), np.uint8)
    out = np.moveaxis(stored, a, 0)
    for g0 in range(0, n_out, group):
        sub = planes[g0:g0 + group + 2 * h]

        def read(ctx: tuple[slice, slice], sub: np.ndarray = sub) -> np.ndarray:
            rows = slice(ctx[0].start - origin[0], ctx[0].stop - origin[0])
            cols = slice(ctx[1].start - origin[1], ctx[1].stop - origin[1])
            if k == 1:
                return sub[:, None, rows, cols]
            win = sub[:, rows, cols]  # slice i of the group: planes i .. i+k-1 (centre i+h)
            return np.stack([win[d:d + win.shape[0] - 2 * h] for d in range(k)], axis=1)

        rgb = stain_region(read, plan.plane(axis), region2d, grey_fn, tile=tile, step=step,
                           window=plan.window, batch_size=batch_size, counter=counter)
        to_uint8_into(out[g0:g0 + group], rgb)  # once per group, in place
    return stored


# --------------------------------------------------------------------------- run dir


def init_run(run_dir: str | os.PathLike[str], plan: Plan, overwrite: bool = False) -> Path:
    """Create (or re-open) ``run_dir`` for ``plan``: pinned generator, plan.json, arrays.

    A new run copies the checkpoint's generator and CT conventions into
    ``RUN_DIR/generator.pt`` and records its hash in the plan: every worker, now or after a
    requeue, loads exactly those weights whatever happens to the original file. Re-opening
    with the same plan resumes with the pinned generator; a different plan is refused
    naming the differing keys, unless ``overwrite`` (which deletes the run's outputs first).
    """
    run_dir = Path(run_dir)
    if plan_path(run_dir).is_file():
        old = load_plan(run_dir)
        diff = plan_differences(old, plan)
        if diff and not overwrite:
            old_d, new_d = old.to_dict(), plan.to_dict()
            detail = "; ".join(f"{k}: {_lookup(old_d, k)!r} -> {_lookup(new_d, k)!r}"
                               for k in diff[:6])
            raise UsageError(f"{run_dir}: holds a run with a different plan ({detail}); use "
                             "another RUN_DIR or pass --overwrite to discard it")
        if overwrite:
            clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not plan_path(run_dir).is_file():
        if plan.checkpoint:
            with atomic_output(generator_path(run_dir), overwrite=True) as tmp:
                sha = pin_generator(plan.checkpoint, tmp)
            plan = replace(plan, generator_sha256=sha)
        plan = replace(plan, input_from_run=input_from_run(plan, run_dir))  # [runs are places]
        save_plan(run_dir, plan)
    for axis in plan.axes:
        create_axis_store(axis_store(run_dir, axis), plan)
    return run_dir


def checkpoint_changed(run_dir: str | os.PathLike[str]) -> str | None:
    """A note when the run's source checkpoint no longer matches what was pinned, else None."""
    plan = load_plan(run_dir)
    if not plan.checkpoint or not plan.checkpoint_sha256:
        return None
    path = Path(plan.checkpoint)
    if path.is_file() and file_sha256(path) == plan.checkpoint_sha256:
        return None
    return (f"{plan.checkpoint} changed since this run was planned; the run continues with "
            f"its pinned generator {generator_path(run_dir)} (use a new RUN_DIR to stain "
            "with the new weights)")


def _lookup(d: dict[str, Any], key: str) -> Any:
    head, _, rest = key.partition(".")
    return d.get("config", {}).get(rest) if head == "config" and rest else d.get(key)


def clear_run(run_dir: Path) -> None:
    """Remove a run's outputs (plan, records, per-axis and fused arrays)."""
    for path in [*run_dir.glob("axis-*.zarr"), *run_dir.glob("*.ome.zarr"), run_dir / "done",
                 run_dir / "running", run_dir / "failed"]:
        shutil.rmtree(path, ignore_errors=True)
    plan_path(run_dir).unlink(missing_ok=True)
    generator_path(run_dir).unlink(missing_ok=True)


def create_axis_store(path: Path, plan: Plan) -> None:
    """An empty RGB uint8 (Z, Y, X, 3) zarr array chunked like the plan (if absent)."""
    import zarr

    if path.exists():
        return
    with atomic_output(path) as tmp:
        zarr.create_array(str(tmp), shape=(*plan.shape, 3), chunks=(*plan.chunk, 3),
                          dtype="uint8", fill_value=0,
                          attributes={"axes": ["z", "y", "x", "c"], "hpcstain": "axis"})


def write_axis_region(path: Path, plan: Plan, region: Region, rgb: np.ndarray) -> None:
    """Write whole storage chunks of RGB into a per-axis array and fsync their files.

    One chunk per zarr call (zarr then encodes the caller's block as it is, without first
    copying it into a new chunk buffer), and every chunk is stored, also one equal to the
    fill value (zarr's test for an empty chunk cost as much CPU as compressing it; a black
    chunk reads back the same either way)."""
    import zarr

    arr = zarr.open_array(str(path), mode="r+").with_config({"write_empty_chunks": True})
    for coords in chunks_touched(region, plan.chunk):
        box = tuple(slice(max(r.start, c * k), min(r.stop, (c + 1) * k))
                    for r, c, k in zip(region, coords, plan.chunk, strict=True))
        arr[(*box, slice(None))] = rgb[tuple(slice(b.start - r.start, b.stop - r.start)
                                             for b, r in zip(box, region, strict=True))]
        chunk_file = path / arr.metadata.encode_chunk_key((*coords, 0))
        with open(chunk_file, "rb") as fh:
            os.fsync(fh.fileno())


def check_source(source: VolumeSource, plan: Plan) -> None:
    if tuple(source.shape) != tuple(plan.shape):
        raise InputError(f"{source.spec}: shape {source.shape} differs from the plan's "
                         f"{plan.shape}; the input changed since the run was planned")


# --------------------------------------------------------------------------- units


@dataclass
class UnitResult:
    index: int
    name: str
    axis: str
    seconds: float
    generator_pixels: int = 0
    voxels: int = 0


@dataclass
class LoadedUnit:
    """A unit's normalised, smoothed CT over its read region, ready for the generator."""

    index: int
    unit: Unit
    box: Region
    write: Region
    ct: np.ndarray | None  # None: already done


def load_unit(run_dir: str | os.PathLike[str], index: int, plan: Plan,
              source: VolumeSource | None = None) -> LoadedUnit:
    """The I/O and preprocessing half of a unit: read + halo, Gaussian, normalise.

    A failure here (the input gone, a damaged chunk) leaves the unit's failed marker, as a
    failure while computing does, so ``hpcstain status`` reports it.
    """
    unit = plan.unit(index)
    write = plan.unit_write_region(unit)
    if is_done(run_dir, unit.task, unit.name):
        return LoadedUnit(index, unit, write, write, None)
    try:
        if source is None:
            source = open_volume(input_at(plan, run_dir), plan.nan_policy, plan.nan_value,  # type: ignore[arg-type]
                                 scan=False)
        check_source(source, plan)
        box = plan.unit_read_region(unit)
        ct = prepare_context(source, box, unit.axis, plan.ct_recipe)
    except Exception as exc:
        rundir.mark_failed(run_dir, unit.task, unit.name, exc)
        raise
    return LoadedUnit(index, unit, box, write, ct)


def compute_unit(run_dir: str | os.PathLike[str], loaded: LoadedUnit, fn: StainFn,
                 plan: Plan, batch_size: int = 0, device: str = "cpu",
                 released: Callable[[], None] | None = None) -> UnitResult:
    """The generator half: stain the slab, write it, then its completion record.
    ``released`` is called once the unit's CT is freed, before its RGB is written (an
    executor starts reading the next unit there when both would not fit in memory)."""
    t0 = time.perf_counter()
    assert loaded.ct is not None
    unit, counter = loaded.unit, [0]
    with rundir.marked(run_dir, unit.task, unit.name, failing=Exception):
        rgb = stain_slab(loaded.ct, loaded.box, loaded.write, unit.axis, plan, fn, batch_size,
                         counter, device)
        loaded.ct = None  # the CT is spent: free it while the RGB is written (bounded RSS)
        if released is not None:
            released()
        write_axis_region(axis_store(run_dir, unit.axis), plan, loaded.write, rgb)
        voxels = int(np.prod([s.stop - s.start for s in loaded.write]))
        seconds = time.perf_counter() - t0
        write_record(run_dir, unit.task, unit.name, {
            "unit": unit.name, "index": loaded.index, "axis": unit.axis,
            "write_region": [[s.start, s.stop] for s in loaded.write],
            "generator_pixels": counter[0], "voxels": voxels, "seconds": round(seconds, 3),
            "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
            **{k: v for k, v in rundir.worker_identity().items() if k == "slurm"}})
    return UnitResult(loaded.index, unit.name, unit.axis, seconds, counter[0], voxels)


def stain_unit(run_dir: str | os.PathLike[str], index: int, fn: StainFn,
               batch_size: int = 0, plan: Plan | None = None,
               source: VolumeSource | None = None,
               loaded: LoadedUnit | None = None, device: str = "cpu",
               released: Callable[[], None] | None = None) -> UnitResult:
    """Stain work unit ``index`` unless its completion record exists.

    ``loaded`` is the unit's prepared CT when an executor read it ahead of time;
    ``released``: see :func:`compute_unit`.
    """
    plan = plan or load_plan(run_dir)
    loaded = loaded if loaded is not None else load_unit(run_dir, index, plan, source)
    if loaded.ct is None:
        return UnitResult(index, loaded.unit.name, loaded.unit.axis, 0.0)
    return compute_unit(run_dir, loaded, fn, plan, batch_size, device, released)


def unit_bytes(plan: Plan, index: int) -> tuple[int, int]:
    """Memory of unit ``index`` (estimates from its regions, bytes): (held while it is
    stained: its prepared CT, its RGB and the tile engine's group; peak while it is read
    and prepared: the raw block beside its padded float32 copy)."""
    unit = plan.unit(index)
    read = [s.stop - s.start for s in plan.unit_read_region(unit)]
    read[AXIS_INDEX[unit.axis]] += 2 * plan.context_halo
    padded = int(np.prod([n + 2 * plan.halo for n in read]))
    write = int(np.prod([s.stop - s.start for s in plan.unit_write_region(unit)]))
    return int(np.prod(read)) * 4 + write * 3 + GROUP_BYTES, padded * (2 + 4)


def pending_units(run_dir: str | os.PathLike[str], plan: Plan | None = None) -> list[int]:
    """Indices of the units without a completion record."""
    plan = plan or load_plan(run_dir)
    done = {a: done_names(run_dir, f"axis-{a}") for a in plan.axes}
    return [i for i, u in enumerate(plan.units) if u.name not in done[u.axis]]


# --------------------------------------------------------------------------- models

_STAINERS: dict[tuple[str, str], StainFn] = {}


@dataclass(frozen=True)
class PinnedStainer:
    """Picklable recipe for a run's staining function (executors ship it to workers).

    Calling it loads ``RUN_DIR/generator.pt`` after checking its hash against the plan
    (and applies the plan's autocast and memory format). Within a process the function is
    built once per generator *content* (the hash), so a worker staining many units loads
    the weights once and a changed file is never reused.
    """

    run_dir: str
    device: str = "cpu"

    def __call__(self) -> StainFn:
        plan = load_plan(self.run_dir)
        key = (plan.generator_sha256,
               f"{self.device}/{plan.autocast}/{plan.memory_format}")
        if not plan.generator_sha256 or key not in _STAINERS:
            stainer = load_pinned(generator_path(self.run_dir), plan.generator_sha256,
                                  self.device, plan.autocast, plan.memory_format)
            if not plan.generator_sha256:
                return stainer.fn
            _STAINERS[key] = stainer.fn
        return _STAINERS[key]


def resolve_fn(fn: StainFn | None, make_fn: Callable[[], StainFn] | None, plan: Plan,
               run_dir: str | os.PathLike[str], device: str = "cpu") -> StainFn:
    """``fn`` as given, else built by ``make_fn``, else the run's pinned generator."""
    if fn is not None:
        return fn
    if make_fn is not None:
        return make_fn()
    if not plan.checkpoint:
        raise UsageError("no staining function: the plan names no checkpoint")
    return PinnedStainer(str(run_dir), device)()


def generator_cost(run_dir: str | os.PathLike[str], plan: Plan | None = None
                   ) -> dict[str, float]:
    """Generator input pixels per output voxel·axis, per axis and overall, from the records."""
    import json

    plan = plan or load_plan(run_dir)
    out: dict[str, float] = {}
    total_px = total_vox = 0
    for axis in plan.axes:
        px = vox = 0
        folder = Path(run_dir) / "done" / f"axis-{axis}"
        for rec in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            info = json.loads(rec.read_text())
            px += int(info.get("generator_pixels", 0))
            vox += int(info.get("voxels", 0))
        if vox:
            out[axis] = px / vox
        total_px, total_vox = total_px + px, total_vox + vox
    if total_vox:
        out["all"] = total_px / total_vox
    return out
