"""The chunk plan of a staining run: chunks, halos, read and write regions, plan.json.

The volume is cut into chunks on a regular grid (the chunk edge is also the storage chunk
of every output array, so no two writers ever touch one storage chunk). A chunk *owns*
its **write region**; to compute it exactly as the whole volume would, it reads a larger
**read region**: the write region plus, for every staining axis, the in-plane context of
the global tile grid (the tiles covering the write region reach beyond it), plus the
**halo** of the 3D Gaussian (``ceil(truncate * sigma)`` voxels) around that.

A plan is frozen into ``RUN_DIR/plan.json``; a run directory only ever holds one plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from hpcstain.atomic import write_text_atomic
from hpcstain.errors import InputError, UsageError

Region = tuple[slice, slice, slice]

PLAN_FORMAT = "hpcstain-volume-plan/1"
AXES = ("z", "y", "x")
AXIS_INDEX = {"z": 0, "y": 1, "x": 2}


@dataclass(frozen=True)
class Plan:
    """Everything that determines the per-axis outputs of a run (and nothing else)."""

    input: str
    shape: tuple[int, int, int]
    chunk: tuple[int, int, int]
    axes: tuple[str, ...] = AXES
    tile: int = 256
    step: int = 64
    window: str = "mean"
    sigma: float = 1.0
    truncate: float = 4.0
    bone_level: float = 30000.0
    background_level: float = 10000.0
    in_channels: int = 3
    nan_policy: str = "error"
    nan_value: float = 0.0
    voxel_size_um: tuple[float, float, float] | None = None
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT

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

    def read_region(self, index: int, axis: str) -> Region:
        """Write region + this axis's in-plane tile context (before the Gaussian halo)."""
        return axis_context(self.write_region(index), axis, self.shape, self.tile, self.step)

    def chunks_in(self, region: Region) -> list[int]:
        """Indices of the chunks whose write regions intersect ``region``."""
        ranges = [range(s.start // k, (s.stop - 1) // k + 1)
                  for s, k in zip(region, self.chunk, strict=True)]
        return [self.chunk_index(c) for c in product(*ranges)]  # type: ignore[arg-type]

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
        for key in ("shape", "chunk", "axes"):
            kw[key] = tuple(kw[key])
        if kw.get("voxel_size_um") is not None:
            kw["voxel_size_um"] = tuple(kw["voxel_size_um"])
        return cls(**kw)


def gaussian_halo(sigma: float, truncate: float = 4.0) -> int:
    return math.ceil(truncate * sigma) if sigma > 0 else 0


def axis_context(write: Region, axis: str, shape: tuple[int, int, int], tile: int,
                 step: int) -> Region:
    """Extend ``write`` by the global-grid tile context in the slice plane of ``axis``.

    The slices perpendicular to ``axis`` are 2D images of the two other dimensions; the
    tiles covering the write rectangle (and their mirror padding at the image border)
    read the rectangle :func:`hpcstain.tiles.region_context` returns.
    """
    from hpcstain.tiles import region_context

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
    from hpcstain.tiles import check_tiling

    check_tiling(tile, step, window)
    if sigma < 0:
        raise UsageError(f"gaussian sigma must be >= 0, got {sigma}")


def make_plan(source: Any, chunk: int | tuple[int, int, int] = 128,
              axes: str | tuple[str, ...] = AXES, tile: int = 256, step: int = 64,
              window: str = "mean", sigma: float = 1.0, levels: tuple[float, float] | None = None,
              in_channels: int = 3, voxel_size_um: tuple[float, float, float] | None = None,
              checkpoint: str | os.PathLike[str] | None = None,
              config: dict[str, Any] | None = None, truncate: float = 4.0) -> Plan:
    """Freeze a run: geometry from ``source`` (a VolumeSource), levels given or estimated.

    ``levels`` is ``(bone, background)``; when None they are estimated once here with
    :func:`hpcstain.volume.io.estimate_levels` and recorded in the plan.
    """
    from hpcstain.volume.io import estimate_levels

    chunk3 = (chunk,) * 3 if isinstance(chunk, int) else tuple(chunk)
    axes_t = tuple(a.strip() for a in axes.split(",")) if isinstance(axes, str) else tuple(axes)
    validate_plan_args(chunk3, axes_t, tile, step, window, sigma)
    chunk3 = tuple(min(c, n) for c, n in zip(chunk3, source.shape, strict=True))
    bone, background = levels if levels is not None else estimate_levels(source)
    sha = ""
    if checkpoint:
        from hpcstain.train.checkpoint import file_sha256

        if not Path(checkpoint).is_file():
            raise InputError(f"{checkpoint}: checkpoint not found")
        sha = file_sha256(checkpoint)
    vox = voxel_size_um if voxel_size_um is not None else source.voxel_size_um
    return Plan(input=str(source.spec), shape=tuple(source.shape), chunk=chunk3,  # type: ignore[arg-type]
                axes=tuple(a for a in AXES if a in axes_t), tile=tile, step=step,
                window=window, sigma=float(sigma), truncate=float(truncate),
                bone_level=float(bone), background_level=float(background),
                in_channels=in_channels, nan_policy=source.nan_policy,
                nan_value=source.nan_value,
                voxel_size_um=tuple(float(v) for v in vox) if vox else None,  # type: ignore[arg-type]
                checkpoint=str(checkpoint or ""), checkpoint_sha256=sha,
                config=dict(config or {}))


# --------------------------------------------------------------------------- run dir


def plan_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "plan.json"


def load_plan(run_dir: str | os.PathLike[str]) -> Plan:
    path = plan_path(run_dir)
    if not path.is_file():
        raise InputError(f"{run_dir}: not a staining run directory (no plan.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable plan ({exc})") from None
    return Plan.from_dict(data, str(path))


def plan_differences(old: Plan, new: Plan) -> list[str]:
    """Keys whose values differ between two plans (``config`` keys as ``config.key``)."""
    a, b = old.to_dict(), new.to_dict()
    keys = [k for k in sorted(set(a) | set(b)) if k != "config" and a.get(k) != b.get(k)]
    ca, cb = a.get("config", {}), b.get("config", {})
    keys += [f"config.{k}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return keys


def save_plan(run_dir: str | os.PathLike[str], plan: Plan) -> Path:
    path = plan_path(run_dir)
    write_text_atomic(path, json.dumps(plan.to_dict(), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- records


def axis_store(run_dir: str | os.PathLike[str], axis: str) -> Path:
    """The per-axis prediction array of a run: ``RUN_DIR/axis-{z,y,x}.zarr``."""
    return Path(run_dir) / f"axis-{axis}.zarr"


def record_path(run_dir: str | os.PathLike[str], task: str, name: str) -> Path:
    """Completion record of one chunk of one task (``axis-z``, ``fused`` ...)."""
    return Path(run_dir) / "done" / task / f"{name}.json"


def is_done(run_dir: str | os.PathLike[str], task: str, name: str) -> bool:
    return record_path(run_dir, task, name).is_file()


def done_names(run_dir: str | os.PathLike[str], task: str) -> set[str]:
    """Names of the chunks with a completion record for ``task`` (one directory listing)."""
    folder = Path(run_dir) / "done" / task
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")}


def write_record(run_dir: str | os.PathLike[str], task: str, name: str,
                 info: dict[str, Any]) -> Path:
    """Write a completion record (atomically, fsync'ed); call only once the data is durable."""
    path = record_path(run_dir, task, name)
    write_text_atomic(path, json.dumps(info, indent=1) + "\n")
    return path
