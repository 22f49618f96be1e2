"""Per-chunk, per-axis staining of a volume on the global tile grid.

One chunk, one axis (daisy's vocabulary: the chunk owns its *write region* and reads a
*read region* with context):

1. read the CT over the union of the axes' read regions plus the Gaussian *halo*; pad by
   reflection only where that box meets the true volume border, so the 3D Gaussian
   (σ = 1 voxel, §2.11) gives exactly the whole-volume values;
2. map the CT to [-1, 1] with the plan's bone/background levels (§2.5);
3. for every slice through the chunk perpendicular to the axis, stain the write region's
   rectangle with the tile engine on the global grid of that slice plane (tile positions
   fixed in volume coordinates), batching tiles of all slices together;
4. write RGB uint8 into ``RUN_DIR/axis-{a}.zarr`` (the chunk is exactly one storage
   chunk), fsync it, and only then write the completion record
   ``RUN_DIR/done/axis-{a}/c-i-j-k.json``.

A voxel's value therefore never depends on the chunking; re-running skips chunks whose
record exists. The staining function ``fn`` maps a float tensor batch (N, C, t, t) in
[-1, 1] to (N, 3, t, t) in [-1, 1].
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from hpcstain.atomic import atomic_output
from hpcstain.errors import InputError, UsageError
from hpcstain.volume.io import VolumeSource, ct_to_unit, open_volume
from hpcstain.volume.plan import (
    AXIS_INDEX,
    Plan,
    axis_context,
    axis_store,
    done_names,
    is_done,
    load_plan,
    plan_differences,
    plan_path,
    save_plan,
    write_record,
)

Region = tuple[slice, slice, slice]
StainFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- pure core


def union_region(regions: list[Region]) -> Region:
    """Bounding box of several regions."""
    return tuple(slice(min(r[d].start for r in regions), max(r[d].stop for r in regions))  # type: ignore[return-value]
                 for d in range(3))


def relative(region: Region, to: Region) -> Region:
    """``region`` in the coordinates of the box ``to`` (which contains it)."""
    return tuple(slice(r.start - t.start, r.stop - t.start)  # type: ignore[return-value]
                 for r, t in zip(region, to, strict=True))


def grow(region: Region, halo: int, shape: tuple[int, ...]) -> Region:
    """``region`` grown by ``halo`` on every side, clipped to the volume."""
    return tuple(slice(max(0, s.start - halo), min(n, s.stop + halo))  # type: ignore[return-value]
                 for s, n in zip(region, shape, strict=True))


def smooth(raw: np.ndarray, inner: Region, grown: Region, halo: int, sigma: float
           ) -> np.ndarray:
    """3D Gaussian of the ``inner`` box, from ``raw`` read over ``grown`` (⊇ inner).

    Where ``grown`` stops short of ``inner`` ± halo, the volume border was hit: the block
    is reflected there (scipy's "reflect" = numpy's "symmetric"), exactly what a
    whole-volume filter does at its border. Elsewhere the real neighbours are used.
    """
    data = np.asarray(raw, np.float32)
    if sigma <= 0:
        return data[relative(inner, grown)]
    pad = [(halo - (i.start - g.start), halo - (g.stop - i.stop))
           for i, g in zip(inner, grown, strict=True)]
    data = np.pad(data, pad, mode="symmetric")
    out = ndimage.gaussian_filter(data, sigma, mode="reflect", radius=halo)
    crop = tuple(slice(halo, halo + i.stop - i.start) for i in inner)
    return out[crop]


def whole_volume_smooth(volume: np.ndarray, sigma: float, halo: int) -> np.ndarray:
    """The reference: the Gaussian over a whole in-memory volume."""
    data = np.asarray(volume, np.float32)
    return ndimage.gaussian_filter(data, sigma, mode="reflect", radius=halo) if sigma > 0 \
        else data


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[-1, 1] float → uint8 (round half to even, clipped)."""
    return np.clip(np.rint((np.asarray(rgb, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def stain_planes(planes: np.ndarray, origin: tuple[int, int], image_shape: tuple[int, int],
                 region: tuple[slice, slice], fn: StainFn, tile: int, step: int, window: str,
                 batch_size: int, in_channels: int) -> np.ndarray:
    """Stain ``region`` of a stack of 2D slices on the slice plane's global tile grid.

    ``planes`` (n, h, w) holds normalised CT of the slices over the region's tile context,
    whose top-left corner is ``origin`` in the plane of shape ``image_shape``. Returns
    (n, rh, rw, 3) float32 in [-1, 1].
    """
    from hpcstain.tiles import stain_region

    def read(ctx: tuple[slice, slice]) -> np.ndarray:
        rows = slice(ctx[0].start - origin[0], ctx[0].stop - origin[0])
        cols = slice(ctx[1].start - origin[1], ctx[1].stop - origin[1])
        return planes[:, None, rows, cols]

    def grey_fn(batch: torch.Tensor) -> torch.Tensor:
        return fn(batch.expand(-1, in_channels, -1, -1) if in_channels != 1 else batch)

    out = stain_region(read, image_shape, region, grey_fn, tile=tile, step=step,
                       window=window, batch_size=batch_size)
    return np.moveaxis(np.asarray(out, np.float32), 1, -1)


def stain_block(ct: np.ndarray, ct_box: Region, write: Region, axis: str,
                shape: tuple[int, int, int], fn: StainFn, plan: Plan, batch_size: int
                ) -> np.ndarray:
    """RGB uint8 (Z, Y, X, 3) of the ``write`` region stained slice-wise along ``axis``.

    ``ct`` is the normalised CT over ``ct_box`` (which holds the axis's read region).
    """
    a = AXIS_INDEX[axis]
    plane_dims = [d for d in range(3) if d != a]
    read = axis_context(write, axis, shape, plan.tile, plan.step)
    box = list(relative(read, ct_box))
    box[a] = slice(write[a].start - ct_box[a].start, write[a].stop - ct_box[a].start)
    planes = np.moveaxis(ct[tuple(box)], a, 0)
    origin = (read[plane_dims[0]].start, read[plane_dims[1]].start)
    image_shape = (shape[plane_dims[0]], shape[plane_dims[1]])
    region2d = (write[plane_dims[0]], write[plane_dims[1]])
    rgb = stain_planes(planes, origin, image_shape, region2d, fn, plan.tile, plan.step,
                       plan.window, batch_size, plan.in_channels)
    return np.moveaxis(to_uint8(rgb), 0, a)


# --------------------------------------------------------------------------- run dir


def init_run(run_dir: str | os.PathLike[str], plan: Plan, overwrite: bool = False) -> Path:
    """Create (or re-open) ``run_dir`` for ``plan``: plan.json + empty per-axis arrays.

    Re-opening with the same plan resumes; a different plan is refused naming the
    differing keys, unless ``overwrite`` (which deletes the run's outputs first).
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
        save_plan(run_dir, plan)
    for axis in plan.axes:
        create_axis_store(axis_store(run_dir, axis), plan)
    return run_dir


def _lookup(d: dict[str, Any], key: str) -> Any:
    head, _, rest = key.partition(".")
    return d.get("config", {}).get(rest) if head == "config" and rest else d.get(key)


def clear_run(run_dir: Path) -> None:
    """Remove a run's outputs (plan, records, per-axis and fused arrays)."""
    for path in [*run_dir.glob("axis-*.zarr"), *run_dir.glob("*.ome.zarr"), run_dir / "done"]:
        shutil.rmtree(path, ignore_errors=True)
    plan_path(run_dir).unlink(missing_ok=True)


def create_axis_store(path: Path, plan: Plan) -> None:
    """An empty RGB uint8 (Z, Y, X, 3) zarr array chunked like the plan (if absent)."""
    import zarr

    if path.exists():
        return
    with atomic_output(path) as tmp:
        zarr.create_array(str(tmp), shape=(*plan.shape, 3), chunks=(*plan.chunk, 3),
                          dtype="uint8", fill_value=0,
                          attributes={"axes": ["z", "y", "x", "c"], "hpcstain": "axis"})


def write_axis_chunk(path: Path, plan: Plan, index: int, rgb: np.ndarray) -> None:
    """Write one chunk's RGB into the per-axis array and fsync its storage file."""
    import zarr

    arr = zarr.open_array(str(path), mode="r+")
    arr[(*plan.write_region(index), slice(None))] = rgb
    key = arr.metadata.encode_chunk_key((*plan.chunk_coords(index), 0))
    chunk_file = path / key
    if chunk_file.is_file():  # absent when the chunk equals the fill value (not stored)
        with open(chunk_file, "rb") as fh:
            os.fsync(fh.fileno())


def check_source(source: VolumeSource, plan: Plan) -> None:
    if tuple(source.shape) != tuple(plan.shape):
        raise InputError(f"{source.spec}: shape {source.shape} differs from the plan's "
                         f"{plan.shape}; the input changed since the run was planned")


# --------------------------------------------------------------------------- chunks


@dataclass
class ChunkResult:
    index: int
    name: str
    axes: tuple[str, ...]
    seconds: float


def prepared_ct(source: VolumeSource, box: Region, plan: Plan) -> np.ndarray:
    """Normalised, smoothed CT over ``box`` (float32 in [-1, 1])."""
    grown = grow(box, plan.halo, plan.shape)
    raw = source.read(grown)
    ct = smooth(raw, box, grown, plan.halo, plan.sigma)
    return ct_to_unit(ct, plan.bone_level, plan.background_level)


@dataclass
class LoadedChunk:
    """A chunk's normalised, smoothed CT over its read box, ready for the generator."""

    index: int
    name: str
    todo: tuple[str, ...]
    box: Region
    write: Region
    ct: np.ndarray | None


def load_chunk(run_dir: str | os.PathLike[str], index: int, plan: Plan,
               source: VolumeSource | None = None) -> LoadedChunk:
    """The I/O and preprocessing half of a chunk: read + halo, Gaussian, normalise."""
    name = plan.chunk_name(index)
    todo = tuple(a for a in plan.axes if not is_done(run_dir, f"axis-{a}", name))
    write = plan.write_region(index)
    if not todo:
        return LoadedChunk(index, name, (), write, write, None)
    if source is None:
        source = open_volume(plan.input, plan.nan_policy, plan.nan_value, scan=False)  # type: ignore[arg-type]
    check_source(source, plan)
    box = union_region([plan.read_region(index, a) for a in todo])
    return LoadedChunk(index, name, todo, box, write, prepared_ct(source, box, plan))


def compute_chunk(run_dir: str | os.PathLike[str], chunk: LoadedChunk, fn: StainFn,
                  plan: Plan, batch_size: int = 16) -> None:
    """The generator half: stain every pending axis, write it, then its completion record."""
    run_dir = Path(run_dir)
    for axis in chunk.todo:
        assert chunk.ct is not None
        rgb = stain_block(chunk.ct, chunk.box, chunk.write, axis, plan.shape, fn, plan,
                          batch_size)
        write_axis_chunk(axis_store(run_dir, axis), plan, chunk.index, rgb)
        write_record(run_dir, f"axis-{axis}", chunk.name, {
            "chunk": chunk.name, "index": chunk.index, "axis": axis,
            "write_region": [[s.start, s.stop] for s in chunk.write],
            "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})


def stain_chunk(run_dir: str | os.PathLike[str], index: int, fn: StainFn,
                batch_size: int = 16, plan: Plan | None = None,
                source: VolumeSource | None = None,
                loaded: LoadedChunk | None = None) -> ChunkResult:
    """Stain chunk ``index`` along every planned axis that has no completion record.

    ``loaded`` is the chunk's prepared CT when an executor read it ahead of time.
    """
    t0 = time.perf_counter()
    plan = plan or load_plan(run_dir)
    chunk = loaded if loaded is not None else load_chunk(run_dir, index, plan, source)
    if not chunk.todo:
        return ChunkResult(index, chunk.name, (), 0.0)
    compute_chunk(run_dir, chunk, fn, plan, batch_size)
    return ChunkResult(index, chunk.name, chunk.todo, time.perf_counter() - t0)


def pending_chunks(run_dir: str | os.PathLike[str], plan: Plan | None = None) -> list[int]:
    """Chunks missing a completion record on at least one planned axis."""
    plan = plan or load_plan(run_dir)
    done = [done_names(run_dir, f"axis-{a}") for a in plan.axes]
    return [i for i in range(plan.n_chunks)
            if any(plan.chunk_name(i) not in d for d in done)]


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class CheckpointStainer:
    """Picklable recipe for the staining function of a checkpoint (built once per process).

    Executors ship this to workers; calling it loads the checkpoint there.
    """

    checkpoint: str
    device: str = "cpu"

    def __call__(self) -> StainFn:
        return _cached_model_fn(self.checkpoint, self.device)


_FN_CACHE: dict[tuple[str, str], StainFn] = {}


def _cached_model_fn(checkpoint: str, device: str) -> StainFn:
    key = (checkpoint, device)
    if key not in _FN_CACHE:
        _FN_CACHE[key] = model_stain_fn(checkpoint, device)
    return _FN_CACHE[key]


def model_stain_fn(checkpoint: str | os.PathLike[str], device: str = "cpu") -> StainFn:
    """The CT→histology generator of a checkpoint as a batch function (eval, no grad)."""
    from hpcstain.models import build_model_from_architecture
    from hpcstain.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = build_model_from_architecture(ckpt["architecture"], device, source=str(checkpoint))
    model.load_state_dict(ckpt["model"])
    invert = bool(ckpt.get("config", {}).get("data", {}).get("invert_ct", False))
    dev = torch.device(device)

    @torch.inference_mode()
    def fn(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(dev)
        return model.stain(-batch if invert else batch).float().cpu()

    return fn


def checkpoint_in_channels(checkpoint: str | os.PathLike[str]) -> int:
    """How many CT channels the checkpoint's generator takes (the plan's ``in_channels``)."""
    from hpcstain.train.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint)["architecture"]["ct_channels"])


def resolve_fn(fn: StainFn | None, make_fn: Callable[[], StainFn] | None, plan: Plan,
               device: str = "cpu") -> StainFn:
    """``fn`` as given, else built by ``make_fn``, else from the plan's checkpoint."""
    if fn is not None:
        return fn
    if make_fn is not None:
        return make_fn()
    if not plan.checkpoint:
        raise UsageError("no staining function: the plan names no checkpoint")
    return CheckpointStainer(plan.checkpoint, device)()
