"""The plan of a staining run: storage chunks, work units (slabs), halos, plan.json.

Storage: every output array (``axis-{z,y,x}.zarr``, the fused image) is chunked on the
plan's ``chunk`` grid.

Work: staining along axis ``a`` is cut into **slabs**, whole slices perpendicular to ``a``,
one storage chunk thick along ``a``; a slab is the work unit, so no in-plane tile context is
ever computed twice. Only when a slab would exceed ``max_unit_voxels`` is its plane split
into in-plane **blocks** (multiples of the storage chunk), each reading the tile context of
the global grid around it. Every unit *owns* its **write region** (whole storage chunks: one
writer per chunk) and reads a **read region** (write region + in-plane tile context when
split) plus the **halo** of the 3D Gaussian (``ceil(truncate * sigma)`` voxels).

Fusion works per storage chunk; a chunk is ready once every axis's units covering it
(and its fusion halo) are done.

A plan is frozen into ``RUN_DIR/plan.json``; a run directory only ever holds one plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hpcstain.atomic import write_text_atomic
from hpcstain.checkpoint import read_checkpoint
from hpcstain.ct.cupping import Cupping, resolve_cupping, volume_fit_line
from hpcstain.ct.levels import (
    DEFAULT_TARGET,
    RawLevels,
    TargetLevels,
    require_confident,
    volume_levels,
)
from hpcstain.ct.prepare import CtRecipe, gaussian_halo
from hpcstain.errors import InputError, UsageError
from hpcstain.geometry import AXES, AXIS_INDEX, Region, intersects
from hpcstain.inference import checkpoint_conventions
from hpcstain.models.fastpath import memory_format_of
from hpcstain.tiles import check_tiling, plane_tiles, region_context
from hpcstain.volume.io import CorrectedSource, VolumeSpec, parse_spec
from hpcstain.volume.rundir import plan_path
from hpcstain.volume.voxelsize import parse_voxel_size

PLAN_FORMAT = "hpcstain-volume-plan/2"
MAX_UNIT_VOXELS = 1 << 27  # ~134 M voxels: ~0.5 GB of float32 CT per unit


@dataclass(frozen=True)
class Plan:
    """Everything that determines the per-axis outputs of a run (and nothing else)."""

    input: str
    shape: tuple[int, int, int]
    chunk: tuple[int, int, int]
    axes: tuple[str, ...] = AXES
    tile: int = 256
    step: int = 192
    window: str = "hann"
    max_tile: int = 0
    sigma: float = 1.0
    truncate: float = 4.0
    fuse_method: str = "mean"  # `fuse`'s default, the checkpoint's data.fuse_method
    bone_level: float = DEFAULT_TARGET.bone        # the CT's raw levels, decided at plan time
    background_level: float = DEFAULT_TARGET.background
    target_levels: tuple[float, float] = DEFAULT_TARGET  # the checkpoint's
    in_channels: int = 3
    context_slices: int = 1  # 2.5D: CT planes per stained slice, ±(k-1)/2 along the axis
    size_multiple: int = 1
    max_unit_voxels: int = MAX_UNIT_VOXELS
    autocast: str = "none"
    # the generator's layout (hpcstain.models.fastpath); changes the last bits, so recorded.
    # A plan written before the field reads as contiguous, what those runs used.
    memory_format: str = "contiguous"
    nan_policy: str = "error"
    nan_value: float = 0.0
    voxel_size_um: tuple[float, float, float] | None = None
    voxel_size_from: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    generator_sha256: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    # the CT's cupping correction, fitted once here ({}: none; hpcstain.ct.cupping.Cupping)
    cupping: dict[str, Any] = field(default_factory=dict)
    # [runs are places] the input relative to the run directory, for a run moved or
    # mounted elsewhere together with its input ("": not recorded)
    input_from_run: str = ""
    format: str = PLAN_FORMAT

    # ----------------------------------------------------------------- CT

    @property
    def raw_levels(self) -> RawLevels:
        return RawLevels(self.bone_level, self.background_level)

    @cached_property
    def ct_recipe(self) -> CtRecipe:
        """How this run's raw CT becomes the generator's input (:mod:`hpcstain.ct.prepare`)."""
        cupping = Cupping.from_dict(self.cupping, "plan.json") if self.cupping else None
        return CtRecipe(raw=self.raw_levels, target=TargetLevels(*self.target_levels),
                        sigma=self.sigma, halo=self.halo, cupping=cupping,
                        context_halo=self.context_halo)

    # ----------------------------------------------------------------- geometry

    @property
    def halo(self) -> int:
        """Gaussian halo (voxels) read around the tile context; 0 without the Gaussian."""
        return gaussian_halo(self.sigma, self.truncate)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Number of chunks along z, y, x."""
        return tuple(math.ceil(n / c) for n, c in zip(self.shape, self.chunk, strict=True))  # type: ignore[return-value]

    @property
    def n_chunks(self) -> int:
        return math.prod(self.grid)

    def chunk_coords(self, index: int) -> tuple[int, int, int]:
        """Flat chunk index (C order over the grid) → grid coordinates."""
        if not 0 <= index < self.n_chunks:
            raise UsageError(f"chunk index {index} out of range (plan has {self.n_chunks})")
        _, gy, gx = self.grid
        return index // (gy * gx), (index // gx) % gy, index % gx

    def chunk_index(self, coords: tuple[int, int, int]) -> int:
        _, gy, gx = self.grid
        return (coords[0] * gy + coords[1]) * gx + coords[2]

    def chunk_name(self, index: int) -> str:
        return "c-" + "-".join(str(c) for c in self.chunk_coords(index))

    def write_region(self, index: int) -> Region:
        coords = self.chunk_coords(index)
        return tuple(slice(c * k, min(n, (c + 1) * k))  # type: ignore[return-value]
                     for c, k, n in zip(coords, self.chunk, self.shape, strict=True))

    # ----------------------------------------------------------------- work units

    def plane(self, axis: str) -> tuple[int, int]:
        """Shape of the slices perpendicular to ``axis``."""
        a = AXIS_INDEX[axis]
        return tuple(n for d, n in enumerate(self.shape) if d != a)  # type: ignore[return-value]

    def plane_tiling(self, axis: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per-axis (tile, step) of the slices of ``axis``: never larger than the plane."""
        return plane_tiles(self.plane(axis), self.tile, self.step, self.size_multiple,
                           minimum=min(16, self.tile), max_tile=self.max_tile)

    def unit_block(self, axis: str) -> tuple[int, int]:
        """In-plane block edge (rows, cols) of the units of ``axis``: the whole plane unless
        a slab exceeds ``max_unit_voxels`` (then multiples of the storage chunk)."""
        a = AXIS_INDEX[axis]
        dims = [d for d in range(3) if d != a]
        thick = self.chunk[a]
        block = [self.shape[d] for d in dims]
        while thick * block[0] * block[1] > self.max_unit_voxels:
            i = 0 if block[0] >= block[1] else 1
            c = self.chunk[dims[i]]
            if block[i] <= c:
                i = 1 - i
                c = self.chunk[dims[i]]
                if block[i] <= c:
                    break
            block[i] = max(c, (block[i] // 2 + c - 1) // c * c)
        return block[0], block[1]

    def unit_grid(self, axis: str) -> tuple[int, int, int]:
        """Number of units of ``axis`` along (the axis, plane rows, plane cols)."""
        a = AXIS_INDEX[axis]
        dims = [d for d in range(3) if d != a]
        block = self.unit_block(axis)
        return (math.ceil(self.shape[a] / self.chunk[a]),
                math.ceil(self.shape[dims[0]] / block[0]),
                math.ceil(self.shape[dims[1]] / block[1]))

    @cached_property
    def units(self) -> list[Unit]:
        """Every work unit, axis by axis, slab by slab."""
        out = []
        for axis in self.axes:
            ns, nr, nc = self.unit_grid(axis)
            split = nr * nc > 1
            for s in range(ns):
                for r in range(nr):
                    for c in range(nc):
                        name = f"s{s:04d}" + (f"-b{r}-{c}" if split else "")
                        out.append(Unit(axis, s, (r, c), name))
        return out

    @property
    def n_units(self) -> int:
        return len(self.units)

    def unit(self, index: int) -> Unit:
        units = self.units
        if not 0 <= index < len(units):
            raise UsageError(f"work unit {index} out of range (plan has {len(units)})")
        return units[index]

    def unit_write_region(self, unit: Unit) -> Region:
        a = AXIS_INDEX[unit.axis]
        dims = [d for d in range(3) if d != a]
        block = self.unit_block(unit.axis)
        out: list[slice] = [slice(0, 0)] * 3
        out[a] = slice(unit.slab * self.chunk[a], min(self.shape[a],
                                                      (unit.slab + 1) * self.chunk[a]))
        for d, b, k in zip(dims, block, unit.block, strict=True):
            out[d] = slice(k * b, min(self.shape[d], (k + 1) * b))
        return tuple(out)  # type: ignore[return-value]

    def unit_read_region(self, unit: Unit) -> Region:
        """Write region + the in-plane tile context (before the Gaussian halo).

        A 2.5D model's (k-1)/2 context slices along the axis are added by
        :func:`hpcstain.volume.stain.load_unit` (mirrored at the volume border)."""
        tile, step = self.plane_tiling(unit.axis)
        return axis_context(self.unit_write_region(unit), unit.axis, self.shape, tile, step)

    @property
    def context_halo(self) -> int:
        """Slices read on each side along the stacking axis for a 2.5D model: (k-1)/2."""
        return self.context_slices // 2

    def units_covering(self, axis: str, region: Region) -> list[str]:
        """Names of the units of ``axis`` whose write regions intersect ``region``."""
        return [u.name for u in self.units if u.axis == axis
                and intersects(self.unit_write_region(u), region)]

    # ----------------------------------------------------------------- records

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise InputError(f"{source}: not an hpcstain volume plan (format "
                             f"{data.get('format')!r}, expected {PLAN_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"{source}: unknown plan keys {unknown}")
        kw = dict(data)
        for key in ("shape", "chunk", "axes", "target_levels"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if kw.get("voxel_size_um") is not None:
            kw["voxel_size_um"] = tuple(kw["voxel_size_um"])
        return cls(**kw)


@dataclass(frozen=True)
class Unit:
    """One work unit: slab ``slab`` along ``axis`` (and in-plane block, when split)."""

    axis: str
    slab: int
    block: tuple[int, int]
    name: str

    @property
    def task(self) -> str:
        return f"axis-{self.axis}"


def axis_context(write: Region, axis: str, shape: tuple[int, int, int],
                 tile: int | tuple[int, int], step: int | tuple[int, int]) -> Region:
    """Extend ``write`` by the global-grid tile context in the slice plane of ``axis``.

    The slices perpendicular to ``axis`` are 2D images of the two other dimensions; the
    tiles covering the write rectangle (and their mirror padding at the image border)
    read the rectangle :func:`hpcstain.tiles.region_context` returns.
    """
    dims = [d for d in range(3) if d != AXIS_INDEX[axis]]
    plane = (shape[dims[0]], shape[dims[1]])
    ctx = region_context(plane, (write[dims[0]], write[dims[1]]), tile, step)
    out = list(write)
    out[dims[0]], out[dims[1]] = ctx
    return tuple(out)  # type: ignore[return-value]


def validate_plan_args(chunk: tuple[int, ...], axes: tuple[str, ...], tile: int, step: int,
                       window: str, sigma: float) -> None:
    if len(chunk) != 3 or min(chunk) < 1:
        raise UsageError(f"chunk must be three positive sizes (z, y, x), got {chunk}")
    if not axes or len(set(axes)) != len(axes) or not set(axes) <= set(AXES):
        raise UsageError(f"axes must be a non-empty subset of z,y,x, got {','.join(axes)}")
    check_tiling(tile, step, window)
    if sigma < 0:
        raise UsageError(f"gaussian sigma must be >= 0, got {sigma}")


def make_plan(source: Any, chunk: int | tuple[int, int, int] = 128,
              axes: str | tuple[str, ...] = AXES, tile: int = 256, step: int = 192,
              window: str = "hann", sigma: float | None = None,
              levels: tuple[float, float] | None = None, in_channels: int | None = None,
              voxel_size_um: tuple[float, float, float] | None = None,
              checkpoint: str | os.PathLike[str] | None = None,
              config: dict[str, Any] | None = None, truncate: float = 4.0,
              max_unit_voxels: int = MAX_UNIT_VOXELS, autocast: str = "none",
              memory_format: str = "contiguous", max_tile: int = 0, cupping: Any = None,
              cupping_override: bool = False,
              report: Callable[[str], None] | None = None) -> Plan:
    """Freeze a run: geometry from ``source`` (a VolumeSource), levels given or estimated.

    ``levels`` is the raw ``(bone, background)``; when None they are estimated once here
    with :func:`hpcstain.volume.io.estimate_levels` and recorded in the plan. The
    checkpoint's CT conventions (target levels, channels, size multiple) are recorded too;
    ``in_channels`` is only for runs without a checkpoint (a staining function given in
    code). ``autocast`` (``none``/``bf16``/``fp16``) runs the generator under torch autocast
    (GPU throughput; it changes the output, so it is part of the plan), ``memory_format``
    (``contiguous``/``channels_last``, :mod:`hpcstain.models.fastpath`) the layout the
    generator runs in (the same: recorded). ``max_tile`` lets
    planes be covered by fewer, larger equal tiles (:func:`hpcstain.tiles.plane_tiles`).
    ``cupping`` (``None``: as the checkpoint was trained, ``"auto"``/``"none"``, or a fitted
    :class:`~hpcstain.ct.cupping.Cupping`) is resolved by
    :func:`~hpcstain.ct.cupping.resolve_cupping`; the levels are then estimated on the
    corrected CT. Both are decided here and only here; ``report`` (e.g. ``print``) receives
    the fitted correction and the level estimate's table, before an ambiguous estimate is
    refused.
    """
    if sigma is None:  # the checkpoint's convention (data.stain_sigma), else §2.11's 1 voxel
        sigma = checkpoint_conventions(checkpoint).stain_sigma \
            if checkpoint and Path(checkpoint).is_file() else 1.0
    chunk3 = (chunk,) * 3 if isinstance(chunk, int) else tuple(chunk)
    axes_t = tuple(a.strip() for a in axes.split(",")) if isinstance(axes, str) else tuple(axes)
    validate_plan_args(chunk3, axes_t, tile, step, window, sigma)
    if max_unit_voxels < 1:
        raise UsageError(f"max_unit_voxels must be >= 1, got {max_unit_voxels}")
    if autocast not in ("none", "bf16", "fp16"):
        raise UsageError(f"autocast must be none, bf16 or fp16, got {autocast!r}")
    memory_format_of(memory_format)  # refuse an unknown one before anything is read
    chunk3 = tuple(min(c, n) for c, n in zip(chunk3, source.shape, strict=True))
    sha, target, channels, multiple = "", DEFAULT_TARGET, in_channels or 3, 1
    context, fuse_method = 1, "mean"
    trained: str | None = None
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise InputError(f"{checkpoint}: checkpoint not found")
        conv = checkpoint_conventions(checkpoint)
        sha, target = read_checkpoint(checkpoint).sha256, conv.target_levels
        channels, multiple, trained = conv.generator_channels, conv.size_multiple, conv.cupping
        context, fuse_method = conv.context_slices, conv.fuse_method
    fitted = resolve_cupping(source, cupping, trained, cupping_override, str(checkpoint))
    if fitted is not None and report is not None:
        report(volume_fit_line(fitted))
    bone, background = levels if levels is not None else \
        _estimate_levels(CorrectedSource(source, fitted) if fitted is not None else source, report)
    vox, vox_from = voxel_size_of(source, voxel_size_um)
    return Plan(input=absolute_spec(source.spec), shape=tuple(source.shape), chunk=chunk3,  # type: ignore[arg-type]
                axes=tuple(a for a in AXES if a in axes_t), tile=tile, step=step,
                window=window, max_tile=int(max_tile), sigma=float(sigma),
                truncate=float(truncate), fuse_method=fuse_method,
                bone_level=float(bone), background_level=float(background),
                target_levels=(float(target[0]), float(target[1])), in_channels=channels,
                context_slices=int(context), size_multiple=multiple,
                max_unit_voxels=int(max_unit_voxels),
                autocast=autocast, memory_format=memory_format,
                nan_policy=source.nan_policy, nan_value=source.nan_value,
                voxel_size_um=vox, voxel_size_from=vox_from,
                checkpoint=str(Path(checkpoint).absolute()) if checkpoint else "",
                checkpoint_sha256=sha,
                config=dict(config or {}),
                cupping=fitted.to_dict() if fitted is not None else {})


def _estimate_levels(source: Any, report: Callable[[str], None] | None) -> RawLevels:
    """The raw levels of ``source`` (:func:`hpcstain.ct.levels.volume_levels`), the estimate
    reported first; an ambiguous one is refused."""
    estimate = volume_levels(source)
    if report is not None:
        report("\n".join(estimate.lines()))
    return require_confident(estimate).levels


def voxel_size_of(source: Any, override: Any = None
                  ) -> tuple[tuple[float, float, float] | None, str]:
    """The run's voxel size in µm (z, y, x) and where it came from: ``override`` (the
    ``--voxel-size`` flag), else the input's metadata, else (None, "")."""
    if override is not None:
        return parse_voxel_size(override), "--voxel-size"
    vox = getattr(source, "voxel_size_um", None)
    if vox is None:
        return None, ""
    return tuple(float(v) for v in vox), getattr(source, "voxel_size_from", "")  # type: ignore[return-value]


# --------------------------------------------------------------------------- run dir


def load_plan(run_dir: str | os.PathLike[str]) -> Plan:
    path = plan_path(run_dir)
    if not path.is_file():
        raise InputError(f"{run_dir}: not a staining run directory (no plan.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable plan ({exc})") from None
    return Plan.from_dict(data, str(path))


# Hashes are not compared: a run keeps its pinned generator even if the source file changed.
UNCOMPARED = ("config", "checkpoint_sha256", "generator_sha256", "voxel_size_from",
              "input_from_run", "fuse_method")  # fuse_method: not what a stain writes


def plan_differences(old: Plan, new: Plan) -> list[str]:
    """Keys whose values differ between two plans (``config`` keys as ``config.key``).

    [runs are places] The input and checkpoint are compared by what they are (the same
    file or folder, and the same array inside), not by how a shell spelled them.
    """
    a, b = old.to_dict(), new.to_dict()
    keys = [k for k in sorted(set(a) | set(b)) if k not in UNCOMPARED and a.get(k) != b.get(k)
            and not (k in ("input", "checkpoint") and same_location(a.get(k), b.get(k)))]
    ca, cb = a.get("config", {}), b.get("config", {})
    keys += [f"config.{k}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return keys


def same_location(a: object, b: object) -> bool:
    """Two spellings (relative, absolute, via a link) of one file[:array]."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        sa, sb = parse_spec(a), parse_spec(b)
        parts = ((sa.path, (sa.key or "").strip("/")), (sb.path, (sb.key or "").strip("/")))
    except InputError:  # not a volume spec (a checkpoint): the path alone
        parts = ((Path(a), ""), (Path(b), ""))
    (pa, ka), (pb, kb) = parts
    try:
        return ka == kb and pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def input_at(plan: Plan, run_dir: str | os.PathLike[str]) -> str:
    """[runs are places] The run's input spec as it exists from here: the recorded
    absolute path, else the path relative to the run directory (a run moved or mounted
    elsewhere with its input), else the recorded one (whose error names it)."""
    try:
        spec = parse_spec(plan.input)
    except InputError:
        return plan.input
    if spec.path.exists() or not plan.input_from_run:
        return plan.input
    moved = parse_spec(plan.input_from_run)
    moved = dataclasses.replace(moved, path=Path(run_dir) / moved.path)
    return str(moved) if moved.path.exists() else plan.input


def input_from_run(plan: Plan, run_dir: str | os.PathLike[str]) -> str:
    """``plan.input`` relative to ``run_dir`` (recorded by ``init_run``)."""
    try:
        spec = parse_spec(plan.input)
    except InputError:
        return ""
    rel = os.path.relpath(spec.path.absolute(), Path(run_dir).absolute())
    return str(dataclasses.replace(spec, path=Path(rel)))


def absolute_spec(spec: object) -> str:
    """A volume spec with its file made absolute (the plan works from any directory)."""
    if isinstance(spec, VolumeSpec):
        return str(dataclasses.replace(spec, path=spec.path.absolute()))
    return str(spec)


def save_plan(run_dir: str | os.PathLike[str], plan: Plan) -> Path:
    path = plan_path(run_dir)
    write_text_atomic(path, json.dumps(plan.to_dict(), indent=2) + "\n")
    return path
