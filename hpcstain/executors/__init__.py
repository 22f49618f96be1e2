"""Executors: run ``process_unit(run_dir, unit_index)`` in-process, on dask, over MPI ranks,
or as a SLURM-array task. None of them knows anything about staining beyond that function;
units with completion records are skipped, so every executor is safe to re-run."""

from __future__ import annotations

import os
from typing import Any

from hpcstain.executors.local import StainReport, process_unit, run_local
from hpcstain.volume.stain import StainFn

__all__ = ["StainReport", "process_unit", "run_local", "run_stain"]


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
    from hpcstain.errors import UsageError

    raise UsageError(f"unknown executor {executor!r} (choose local, dask or mpi)")


class _Constant:
    """A make_fn that returns a given function (must itself pickle for process workers)."""

    def __init__(self, fn: StainFn) -> None:
        self.fn = fn

    def __call__(self) -> StainFn:
        return self.fn
