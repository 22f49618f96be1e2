"""Redo the damaged part of a staining run: one storage chunk of an axis array.

A storage chunk of ``RUN_DIR/axis-{z,y,x}.zarr`` whose bytes no longer decode (disk or
transfer damage after staining) makes ``hpcstain fuse`` stop with one line that names the
array, the chunk and the command to run::

    python -m hpcstain.volume.repair RUN_DIR --axis z --chunk 1,0,2 --restain
    hpcstain fuse RUN_DIR

The first command deletes the damaged chunk file and the completion records of every work
unit of that axis whose ``write_region`` (``[[z0, z1], [y0, y1], [x0, x1]]`` in the record)
intersects the chunk; with ``--restain`` it then stains exactly those units again with the
run's pinned generator (without it, re-run the original ``hpcstain stain`` command or the
array job later). Records are matched by their write region, not by their name, so this
does not depend on how work units are named. A unit owns whole storage chunks, so
re-staining rewrites every dropped chunk completely; the result is byte-identical to an
undamaged run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpcstain.errors import HpcstainError, InputError, UsageError
from hpcstain.geometry import AXES
from hpcstain.volume.io import chunk_regions, locate_damage, one_line, region_text
from hpcstain.volume.plan import load_plan
from hpcstain.volume.rundir import axis_store
from hpcstain.volume.stain import pending_units, resolve_fn, stain_unit

Region = tuple[slice, slice, slice]


# --------------------------------------------------------------------------- regions


def parse_chunk(text: str) -> tuple[int, int, int]:
    """``"1,0,2"`` → ``(1, 0, 2)``: a storage-chunk index (z, y, x) of the plan's grid."""
    try:
        idx = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise UsageError(f"chunk must be three integers z,y,x (e.g. 1,0,2), got {text!r}"
                         ) from None
    if len(idx) != 3 or min(idx) < 0:
        raise UsageError(f"chunk must be three non-negative integers z,y,x, got {text!r}")
    return idx  # type: ignore[return-value]


def parse_region(text: str) -> Region:
    """``"16:32,0:16,32:48"`` → voxel slices (z, y, x), stop exclusive."""
    try:
        parts = [tuple(int(v) for v in p.split(":")) for p in text.replace(" ", "").split(",")]
        region = tuple(slice(a, b) for a, b in parts)  # type: ignore[misc]
    except ValueError:
        raise UsageError(f"region must be z0:z1,y0:y1,x0:x1, got {text!r}") from None
    if len(region) != 3 or any(s.start < 0 or s.stop <= s.start for s in region):
        raise UsageError(f"region must be three non-empty ranges z0:z1,y0:y1,x0:x1, "
                         f"got {text!r}")
    return region  # type: ignore[return-value]


def chunk_region(shape: Sequence[int], chunk: Sequence[int], index: Sequence[int]) -> Region:
    """Voxel region of storage chunk ``index`` of a (z, y, x) grid of ``chunk``-sized chunks."""
    grid = [-(-n // c) for n, c in zip(shape, chunk, strict=True)]
    if len(index) != 3 or any(not 0 <= i < g for i, g in zip(index, grid, strict=True)):
        raise UsageError(f"chunk {','.join(map(str, index))} is outside the chunk grid "
                         f"{'x'.join(map(str, grid))}")
    return tuple(slice(i * c, min(n, (i + 1) * c))  # type: ignore[return-value]
                 for i, c, n in zip(index, chunk, shape, strict=True))


def _as_region(run_dir: Path, region_or_chunk: Any) -> Region:
    """A chunk index (3 ints, or "1,0,2"), or a region (3 slices / [[a, b], ...] / "a:b,...")."""
    if isinstance(region_or_chunk, str):
        value: Any = (parse_region(region_or_chunk) if ":" in region_or_chunk
                      else parse_chunk(region_or_chunk))
    else:
        value = tuple(region_or_chunk)
    if len(value) == 3 and all(isinstance(v, int) for v in value):
        plan = load_plan(run_dir)
        return chunk_region(plan.shape, plan.chunk, value)
    if len(value) == 3 and all(isinstance(v, slice) for v in value):
        return value  # type: ignore[no-any-return]
    if len(value) == 3 and all(isinstance(v, Sequence) and len(v) == 2 for v in value):
        return tuple(slice(int(a), int(b)) for a, b in value)  # type: ignore[return-value]
    raise UsageError(f"expected a chunk index (z, y, x) or a region of three slices, got "
                     f"{region_or_chunk!r}")


def _intersects(a: Region, b: Region) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- records


def records_covering(run_dir: str | os.PathLike[str], axis: str, region: Region
                     ) -> list[Path]:
    """Completion records of ``axis`` whose ``write_region`` intersects ``region``.

    A record that cannot be read as JSON with a ``write_region`` is included too: it is
    damaged itself, and dropping it only costs recomputing its unit.
    """
    folder = Path(run_dir) / "done" / f"axis-{axis}"
    if not folder.is_dir():
        return []
    hits = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            box = json.loads(path.read_text())["write_region"]
            written = tuple(slice(int(a), int(b)) for a, b in box)
        except (OSError, ValueError, KeyError, TypeError):
            hits.append(path)
            continue
        if len(written) == 3 and _intersects(written, region):  # type: ignore[arg-type]
            hits.append(path)
    return hits


def drop_records(run_dir: str | os.PathLike[str], axis: str, region_or_chunk: Any,
                 remove_chunks: bool = True) -> list[Path]:
    """Forget the work of ``axis`` over a damaged storage chunk (or any voxel region).

    ``region_or_chunk`` is a storage-chunk index ``(z, y, x)`` of the plan's grid (or
    ``"1,0,2"``) or a voxel region (three slices, ``[[z0, z1], [y0, y1], [x0, x1]]`` or
    ``"z0:z1,y0:y1,x0:x1"``). Deletes the completion records of every unit whose write
    region intersects it and, with ``remove_chunks``, the storage chunk files of
    ``axis-{axis}.zarr`` in it (they are rewritten whole when the units are stained
    again). Returns the records deleted; the next stain pass redoes exactly those units.
    """
    run_dir = Path(run_dir)
    if axis not in AXES:
        raise UsageError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    plan = load_plan(run_dir)
    if axis not in plan.axes:
        raise UsageError(f"{run_dir}: axis {axis!r} was not stained (plan axes: "
                         f"{','.join(plan.axes)})")
    region = _as_region(run_dir, region_or_chunk)
    records = records_covering(run_dir, axis, region)
    for path in records:
        path.unlink(missing_ok=True)
    if remove_chunks:
        for file in chunk_files(run_dir, axis, region):
            file.unlink(missing_ok=True)
    return records


def chunk_files(run_dir: str | os.PathLike[str], axis: str, region: Region) -> list[Path]:
    """Storage chunk files of ``axis-{axis}.zarr`` that ``region`` touches (existing ones)."""
    import zarr

    store = axis_store(run_dir, axis)
    try:
        arr = zarr.open_array(str(store), mode="r")
    except Exception as exc:  # the array's metadata is damaged too
        raise InputError(f"{store}: unreadable axis array ({one_line(exc)})") from None
    grid = _storage_grid(arr)
    files = []
    for idx, _ in chunk_regions(region, tuple(arr.shape[:3]), grid):
        file = store / arr.metadata.encode_chunk_key((*idx, 0))
        if file.is_file():
            files.append(file)
    return files


def _storage_grid(arr: Any) -> tuple[int, int, int]:
    """(z, y, x) edge of the array's storage files: shards when sharded, else chunks."""
    return tuple((getattr(arr, "shards", None) or arr.chunks)[:3])  # type: ignore[return-value]


# --------------------------------------------------------------------------- fuse errors


def repair_command(run_dir: str | os.PathLike[str], axis: str, chunk: Sequence[int]) -> str:
    """The shell command that drops and re-stains one damaged chunk of an axis array."""
    return (f"python -m hpcstain.volume.repair {shlex.quote(str(run_dir))} --axis {axis} "
            f"--chunk {','.join(str(i) for i in chunk)} --restain")


def damaged_axis_error(run_dir: str | os.PathLike[str], axis: str, arr: Any, region: Region,
                       exc: BaseException) -> BaseException:
    """The error for a failed read of ``region`` of ``axis-{axis}.zarr`` during fusion.

    Names the array, the first storage chunk that does not decode, the codec's complaint,
    and the :func:`repair_command` that redoes it. Errors that are not about the bytes
    (memory, our own errors) are returned unchanged.
    """
    if isinstance(exc, HpcstainError | MemoryError):
        return exc
    store = axis_store(run_dir, axis)
    shape, grid = tuple(arr.shape[:3]), _storage_grid(arr)
    found = locate_damage(lambda r: arr[r], region, shape, grid)
    if found is None:
        return InputError(f"{store}: unreadable voxels {region_text(region)} "
                          f"({one_line(exc)})")
    idx, sub, chunk_exc = found
    try:
        file = f"; file {store / arr.metadata.encode_chunk_key((*idx, 0))}"
    except Exception:
        file = ""
    return InputError(f"{store}: damaged storage chunk {','.join(map(str, idx))} (voxels "
                      f"{region_text(sub)}{file}): {one_line(chunk_exc)}; redo it with: "
                      f"{repair_command(run_dir, axis, idx)} && hpcstain fuse "
                      f"{shlex.quote(str(run_dir))}")


# --------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hpcstain.volume.repair",
        description="Drop the completion records (and the chunk files) of the work units of "
        "one axis covering a damaged storage chunk, so they are stained again.")
    p.add_argument("run_dir")
    p.add_argument("--axis", required=True, choices=list(AXES))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--chunk", help="storage-chunk index z,y,x (as in the fuse error)")
    where.add_argument("--region", help="voxel region z0:z1,y0:y1,x0:x1")
    p.add_argument("--restain", action="store_true",
                   help="stain the dropped units again now (in this process)")
    p.add_argument("--device", default="cpu", help="device for --restain")
    p.add_argument("--keep-chunks", action="store_true",
                   help="keep the storage chunk files (default: delete them)")
    args = p.parse_args(argv)
    try:
        target = parse_chunk(args.chunk) if args.chunk else parse_region(args.region)
        dropped = drop_records(args.run_dir, args.axis, target,
                               remove_chunks=not args.keep_chunks)
        print(f"dropped {len(dropped)} completion record(s) of axis {args.axis}: "
              + (", ".join(p.stem for p in dropped) or "none"))
        if args.restain and dropped:
            print(restain(args.run_dir, args.device))
        elif dropped:
            print("stain them again with the original `hpcstain stain` command (or "
                  "--restain here), then run `hpcstain fuse` again")
    except HpcstainError as exc:
        print(f"hpcstain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0



def restain(run_dir: str, device: str = "cpu") -> str:
    """Stain the run's pending units again in this process, with its pinned generator."""
    plan = load_plan(run_dir)
    todo = pending_units(run_dir, plan)
    fn = resolve_fn(None, None, plan, run_dir, device)
    for index in todo:
        stain_unit(run_dir, index, fn, plan=plan, device=device)
    return f"{run_dir}: stained {len(todo)} unit(s) again"


if __name__ == "__main__":
    sys.exit(main())
