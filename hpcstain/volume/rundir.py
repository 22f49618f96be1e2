"""The run directory: its layout, completion records and markers, in one place.

A staining run is a directory; everything the engine, the executors and ``status`` know
about it is a file there:

* ``plan.json`` — the frozen plan (:mod:`hpcstain.volume.plan`), ``generator.pt`` — the
  pinned generator every worker loads;
* ``axis-{z,y,x}.zarr`` — the per-axis stains (:func:`axis_store`);
* ``<image>.ome.zarr`` — fused images (``fused.ome.zarr`` by default);
* ``done/<task>/<name>.json`` — completion records (:func:`write_record`), written only
  once a job's data is durable: a slab unit of ``axis-z`` …, a chunk of an image (task =
  the image's name); ``done/<image>/.pyramid-pending`` while a fuse pass has not built its
  pyramid (:func:`pyramid_pending`). A job is done exactly when its record exists, and every
  executor re-runs jobs without one;
* ``running/<task>/<name>.json`` — written when a worker starts computing a job, removed
  when it finishes or raises. A marker left behind means the worker died without
  unwinding (SIGKILL, out-of-memory kill, node failure, SLURM cancel). It names the worker
  (host, pid, SLURM job / array ids, start time), so ``status`` can tell whether that
  worker still exists;
* ``failed/<task>/<name>.json`` — written when reading a job's input (a damaged chunk, a
  read error) or computing it raised an exception (with the error's first line); removed
  when the job later succeeds.

Markers never change what is computed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpcstain.atomic import write_text_atomic

GENERATOR_FILE = "generator.pt"
PYRAMID_PENDING = ".pyramid-pending"  # in done/<image>/ while a pass has not built it
RUNNING = "running"
FAILED = "failed"
SLURM_IDS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID")


# --------------------------------------------------------------------------- layout


def plan_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "plan.json"


def axis_store(run_dir: str | os.PathLike[str], axis: str) -> Path:
    """The per-axis prediction array of a run: ``RUN_DIR/axis-{z,y,x}.zarr``."""
    return Path(run_dir) / f"axis-{axis}.zarr"


def generator_path(run_dir: str | os.PathLike[str]) -> Path:
    """The run's pinned generator (what every worker loads)."""
    return Path(run_dir) / GENERATOR_FILE


def record_path(run_dir: str | os.PathLike[str], task: str, name: str) -> Path:
    """Completion record of one unit of one task (``axis-z`` slab, ``fused`` chunk ...)."""
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


def pyramid_pending(run_dir: str | os.PathLike[str], task: str) -> Path:
    """The marker of an image whose last fuse pass has not built its pyramid yet."""
    return Path(run_dir) / "done" / task / PYRAMID_PENDING


# --------------------------------------------------------------------------- markers


def marker_path(run_dir: str | os.PathLike[str], kind: str, task: str, name: str) -> Path:
    return Path(run_dir) / kind / task / f"{name}.json"


def worker_identity(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Who is working: host, pid, SLURM ids (when under SLURM) and the time."""
    env = dict(os.environ) if env is None else env
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                             "time": time.time()}
    slurm = {k.removeprefix("SLURM_").lower(): env[k] for k in SLURM_IDS if env.get(k)}
    if slurm:
        ident["slurm"] = slurm
    return ident


def mark_running(run_dir: str | os.PathLike[str], task: str, name: str) -> None:
    write_text_atomic(marker_path(run_dir, RUNNING, task, name),
                      json.dumps({"unit": name, **worker_identity()}) + "\n")


def clear_running(run_dir: str | os.PathLike[str], task: str, name: str) -> None:
    """Remove this worker's running marker (not one a second worker wrote since)."""
    path = marker_path(run_dir, RUNNING, task, name)
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        owner = {}
    if owner and (owner.get("host"), owner.get("pid")) != (socket.gethostname(), os.getpid()):
        return
    path.unlink(missing_ok=True)


def mark_failed(run_dir: str | os.PathLike[str], task: str, name: str,
                exc: BaseException) -> None:
    """Record that computing ``name`` raised ``exc`` (best effort: never masks ``exc``)."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    with contextlib.suppress(OSError):
        write_text_atomic(marker_path(run_dir, FAILED, task, name), json.dumps(
            {"unit": name, "error": f"{type(exc).__name__}: {first}".rstrip(": "),
             **worker_identity()}) + "\n")


def clear_failed(run_dir: str | os.PathLike[str], task: str, name: str) -> None:
    marker_path(run_dir, FAILED, task, name).unlink(missing_ok=True)


@contextlib.contextmanager
def marked(run_dir: str | os.PathLike[str], task: str, name: str,
           failing: type[BaseException] = BaseException) -> Iterator[None]:
    """The markers around one job of a block task (:mod:`hpcstain.volume.tasks`) or one
    staining unit: running while the body runs (left behind only if the worker dies), failed
    if it raises ``failing`` (then re-raised; a stain unit passes ``Exception``, so a Ctrl-C
    or a preemption is not recorded as its failure), the failed marker cleared once it
    succeeds."""
    mark_running(run_dir, task, name)
    try:
        yield
    except failing as exc:
        mark_failed(run_dir, task, name, exc)
        raise
    finally:
        clear_running(run_dir, task, name)
    clear_failed(run_dir, task, name)


def read_markers(run_dir: str | os.PathLike[str], kind: str, task: str
                 ) -> dict[str, dict[str, Any]]:
    """Every marker of ``kind`` for ``task``, by unit name (unreadable ones as ``{}``)."""
    return read_json_folder(Path(run_dir) / kind / task)


def read_json_folder(folder: Path) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` record in ``folder`` by file stem (unreadable ones as ``{}``)."""
    out: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return out
    for path in folder.iterdir():
        if path.suffix != ".json" or path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        out[path.stem] = data if isinstance(data, dict) else {}
    return out
