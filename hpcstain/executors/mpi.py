"""MPI executor: ``mpirun -n N hpcstain stain ... --executor mpi``.

Rank 0 hands out pending chunk indices one at a time to whichever worker asks next, so a
slow chunk never stalls the others (dynamic scheduling); ranks 1..N-1 stain. With a single
rank, rank 0 stains everything itself. mpi4py is imported only here (optional extra
``hpcstain[mpi]``, needs an MPI library such as Debian's openmpi-bin libopenmpi-dev).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hpcstain.errors import UsageError
from hpcstain.executors.local import MakeFn, StainReport, run_local
from hpcstain.volume.plan import load_plan
from hpcstain.volume.stain import StainFn, pending_chunks, resolve_fn, stain_chunk

TAG_WORK, TAG_STOP, TAG_READY = 1, 2, 3


def world_comm() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise UsageError("the mpi executor needs mpi4py (pip install 'hpcstain[mpi]', with an "
                         f"MPI library installed): {exc}") from None
    return MPI.COMM_WORLD


def run_mpi(run_dir: str | os.PathLike[str], fn: StainFn | None = None,
            make_fn: MakeFn | None = None, batch_size: int = 16, device: str = "cpu",
            progress: bool = False, comm: Any = None) -> StainReport:
    """Stain every pending chunk over the ranks of ``comm`` (default: MPI.COMM_WORLD).

    Every rank returns a report; rank 0's covers the whole run.
    """
    comm = comm or world_comm()
    if comm.Get_size() == 1:
        return run_local(run_dir, fn=fn, make_fn=make_fn, batch_size=batch_size,
                         device=device, progress=progress)
    t0 = time.perf_counter()
    plan = load_plan(run_dir)
    if comm.Get_rank() == 0:
        todo = pending_chunks(run_dir, plan)
        report = StainReport(Path(run_dir), plan.n_chunks,
                             skipped=plan.n_chunks - len(todo))
        _serve(comm, todo, report)
    else:
        report = StainReport(Path(run_dir), plan.n_chunks)
        chunk_fn = resolve_fn(fn, make_fn, plan, device)
        _work(comm, run_dir, chunk_fn, batch_size, plan, report)
    names = comm.gather(report.stained, root=0)
    if comm.Get_rank() == 0:
        report.stained = sorted(n for part in names for n in part)
    report.seconds = time.perf_counter() - t0
    comm.Barrier()
    return report


def _serve(comm: Any, todo: list[int], report: StainReport) -> None:
    """Rank 0: answer each READY message with the next chunk, then with STOP."""
    from mpi4py import MPI

    queue = list(todo)
    workers = comm.Get_size() - 1
    status = MPI.Status()
    while workers:
        comm.recv(source=MPI.ANY_SOURCE, tag=TAG_READY, status=status)
        source = status.Get_source()
        if queue:
            comm.send(queue.pop(0), dest=source, tag=TAG_WORK)
        else:
            comm.send(None, dest=source, tag=TAG_STOP)
            workers -= 1


def _work(comm: Any, run_dir: str | os.PathLike[str], fn: StainFn, batch_size: int,
          plan: Any, report: StainReport) -> None:
    """Ranks ≥ 1: ask for a chunk, stain it (completion record last), repeat until STOP."""
    from mpi4py import MPI

    status = MPI.Status()
    while True:
        comm.send(None, dest=0, tag=TAG_READY)
        index = comm.recv(source=0, tag=MPI.ANY_TAG, status=status)
        if status.Get_tag() == TAG_STOP:
            return
        result = stain_chunk(run_dir, index, fn, batch_size=batch_size, plan=plan)
        report.stained.append(result.name)
