"""Executors: run the block tasks of the volume engine (:mod:`hpcstain.volume.tasks`: a
stain unit, a fuse chunk group) in-process, on local processes, on dask, over MPI ranks,
or as a SLURM-array task. None of them knows anything about staining or fusion beyond the
task callables; jobs with completion records are never handed out, so every executor is
safe to re-run.

``run_stain`` and ``run_fuse`` are the two passes; ``pass_runner`` gives the runner of an
executor for any pass."""

from __future__ import annotations

import functools
import os
from typing import Any

from hpcstain.executors.local import StainReport, StainTask, process_unit, run_local
from hpcstain.volume.stain import StainFn
from hpcstain.volume.tasks import Runner, TaskPass, run_processes

__all__ = ["StainReport", "StainTask", "pass_runner", "process_unit", "run_fuse", "run_local",
           "run_stain"]

EXECUTORS = ("local", "dask", "mpi")


def run_stain(run_dir: str | os.PathLike[str], fn: StainFn | None = None,
              executor: str = "local", **kwargs: Any) -> StainReport:
    """Stain every pending unit of ``run_dir`` with ``executor`` ("local", "dask", "mpi").

    ``fn`` is used in-process only; the dask executor builds the function in each worker
    from ``make_fn`` (a picklable zero-argument callable) or the plan's checkpoint.
    """
    if executor == "local":
        return run_local(run_dir, fn=fn, **kwargs)
    if executor == "dask":
        from hpcstain.executors.dask import run_dask

        if fn is not None and "make_fn" not in kwargs:
            kwargs["make_fn"] = _Constant(fn)
        return run_dask(run_dir, **kwargs)
    if executor == "mpi":
        from hpcstain.executors.mpi import run_mpi

        kwargs.pop("address", None)
        kwargs.pop("n_workers", None)
        return run_mpi(run_dir, fn=fn, **kwargs)
    raise _unknown(executor)


def pass_runner(executor: str = "local", workers: int = 1, address: Any = None) -> Runner:
    """The runner of a block-task pass on ``executor``: "local" (this process, or
    ``workers`` local processes), "dask" (``address``: a scheduler address, client or
    cluster; else a LocalCluster of ``workers``). MPI passes need every rank in the call:
    use :func:`run_fuse` (or :func:`run_stain`) with ``executor="mpi"``."""
    if executor == "local":
        return functools.partial(run_processes, workers=workers)
    if executor == "dask":
        from hpcstain.executors.dask import run_pass_dask

        def on_dask(tp: TaskPass, progress: bool) -> list[str]:
            return run_pass_dask(tp, progress, address=address, n_workers=max(workers, 1))

        return on_dask
    raise _unknown(executor)


def run_fuse(run_dir: str | os.PathLike[str], executor: str = "local", workers: int = 1,
             address: Any = None, **kwargs: Any) -> Any:
    """Fuse a run (:func:`hpcstain.volume.fuse.fuse_run`) with its chunk groups run by
    ``executor``: "local" (``workers`` local processes), "dask" (``address`` or a
    LocalCluster of ``workers``), "mpi" (every rank calls this; rank 0 returns the report).
    The fused image does not depend on the executor."""
    from hpcstain.volume.fuse import fuse_run

    if executor == "mpi":
        from hpcstain.executors.mpi import run_fuse_mpi

        return run_fuse_mpi(run_dir, **kwargs)
    if executor == "dask" and address is not None:
        workers = max(workers, 2)  # a cluster of unknown size: cut the chunks for several
    return fuse_run(run_dir, runner=pass_runner(executor, workers, address), workers=workers,
                    **kwargs)


def _unknown(executor: str) -> Exception:
    from hpcstain.errors import UsageError

    return UsageError(f"unknown executor {executor!r} (choose local, dask or mpi)")


class _Constant:
    """A make_fn that returns a given function (must itself pickle for process workers)."""

    def __init__(self, fn: StainFn) -> None:
        self.fn = fn

    def __call__(self) -> StainFn:
        return self.fn
