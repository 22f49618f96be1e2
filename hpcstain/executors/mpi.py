"""MPI executor: ``mpirun -n N hpcstain stain ... --executor mpi``.

Every rank stains, rank 0 included: units are claimed one at a time from a shared counter
in an MPI window on rank 0 (atomic fetch-and-add), so a slow unit never stalls the others
(dynamic scheduling) and no rank idles as a dispatcher. mpi4py is imported only here (optional extra
``hpcstain[mpi]``, needs an MPI library such as Debian's openmpi-bin libopenmpi-dev).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.errors import UsageError
from hpcstain.executors.local import MakeFn, StainReport, run_local, unit_name
from hpcstain.volume.fuse import fuse_run
from hpcstain.volume.plan import load_plan
from hpcstain.volume.stain import (
    StainFn,
    generator_cost,
    pending_units,
    resolve_fn,
    stain_unit,
)
from hpcstain.volume.tasks import TaskPass


def world_comm() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise UsageError("the mpi executor needs mpi4py (pip install 'hpcstain[mpi]', with an "
                         f"MPI library installed): {exc}") from None
    return MPI.COMM_WORLD


def run_mpi(run_dir: str | os.PathLike[str], fn: StainFn | None = None,
            make_fn: MakeFn | None = None, batch_size: int = 0, device: str = "cpu",
            progress: bool = False, comm: Any = None) -> StainReport:
    """Stain every pending unit over the ranks of ``comm`` (default: MPI.COMM_WORLD).

    Every rank returns a report; rank 0's covers the whole run.
    """
    comm = comm or world_comm()
    if comm.Get_size() == 1:
        return run_local(run_dir, fn=fn, make_fn=make_fn, batch_size=batch_size,
                         device=device, progress=progress)
    t0 = time.perf_counter()
    plan = load_plan(run_dir)
    todo = pending_units(run_dir, plan) if comm.Get_rank() == 0 else None
    todo = comm.bcast(todo, root=0)
    report = StainReport(Path(run_dir), plan.n_units, skipped=plan.n_units - len(todo))
    unit_fn = resolve_fn(fn, make_fn, plan, run_dir, device)

    def task(index: int) -> list[str]:
        return [unit_name(stain_unit(run_dir, index, unit_fn, batch_size=batch_size,
                                     plan=plan, device=device))]

    report.stained = run_pass_mpi(TaskPass(task, todo, label="stain", unit="slab"), comm)
    if comm.Get_rank() == 0:
        report.cost = generator_cost(run_dir, plan)
    report.seconds = time.perf_counter() - t0
    comm.Barrier()
    return report


def run_pass_mpi(tp: TaskPass, comm: Any, progress: bool = False) -> list[str]:
    """Run a block-task pass over the ranks of ``comm``: every rank (rank 0 included) claims
    jobs one at a time (:func:`_claimed`). Every rank must call it with the same jobs.
    Rank 0 returns every recorded name, sorted; the others their own."""
    mine: list[str] = []
    for n in _claimed(comm, len(tp.jobs)):
        mine += tp.task(tp.jobs[n])
    names = comm.gather(mine, root=0)
    return sorted(x for part in names for x in part) if comm.Get_rank() == 0 else mine


def run_fuse_mpi(run_dir: str | os.PathLike[str], comm: Any = None, **kwargs: Any) -> Any:
    """``fuse_run`` over the ranks of ``comm``: rank 0 prepares the image, hands the chunk
    groups to every rank (:func:`run_pass_mpi`) and builds the pyramid; the others only
    fuse groups. Rank 0 returns the report, the others None."""
    comm = comm or world_comm()
    if comm.Get_size() == 1:
        return fuse_run(run_dir, **kwargs)
    if comm.Get_rank() != 0:
        tp = comm.bcast(None, root=0)
        if tp is not None:
            run_pass_mpi(tp, comm)
        comm.Barrier()
        return None
    sent = False

    def runner(tp: TaskPass, progress: bool) -> list[str]:
        nonlocal sent
        comm.bcast(tp, root=0)
        sent = True
        return run_pass_mpi(tp, comm, progress)

    try:
        kwargs.pop("workers", None)
        report = fuse_run(run_dir, runner=runner, workers=comm.Get_size(), **kwargs)
    finally:
        if not sent:  # nothing to fuse, or refused before: release the other ranks
            comm.bcast(None, root=0)
        comm.Barrier()
    return report


def _claimed(comm: Any, n: int) -> Iterator[int]:
    """Positions 0..n-1, each handed to exactly one rank (shared atomic counter on rank 0)."""
    from mpi4py import MPI

    counter = np.zeros(1, np.int64)  # exposed by rank 0 only
    win = MPI.Win.Create(counter if comm.Get_rank() == 0 else None, 8, comm=comm)
    try:
        comm.Barrier()
        one = np.ones(1, np.int64)
        got = np.zeros(1, np.int64)
        while True:
            win.Lock(0)
            win.Fetch_and_op(one, got, 0, 0, MPI.SUM)
            win.Unlock(0)
            if got[0] >= n:
                return
            yield int(got[0])
    finally:
        comm.Barrier()
        win.Free()
