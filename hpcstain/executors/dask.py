"""dask.distributed executor: one dask task per pending job of a block-task pass (a stain
unit, a fuse chunk group: :mod:`hpcstain.volume.tasks`) on a LocalCluster or a scheduler.

Stain's tasks are :class:`~hpcstain.executors.local.StainTask` (the plain
:func:`~hpcstain.executors.local.process_unit`); each worker opens the run directory and
the input itself, so nothing large travels through the scheduler.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hpcstain.executors.local import MakeFn, StainReport, StainTask
from hpcstain.volume.plan import load_plan
from hpcstain.volume.stain import generator_cost, pending_units
from hpcstain.volume.tasks import TaskPass


def run_dask(run_dir: str | os.PathLike[str], make_fn: MakeFn | None = None,
             address: str | Any | None = None, n_workers: int = 2, threads_per_worker: int = 1,
             processes: bool = True, batch_size: int = 0, device: str = "cpu",
             progress: bool = False) -> StainReport:
    """Stain every pending unit on dask (:func:`run_pass_dask`, one task per unit).

    ``address`` is a scheduler address (``tcp://host:8786``), an existing
    ``distributed.Client`` or cluster object (e.g. a dask-jobqueue ``SLURMCluster``), or
    None for a ``LocalCluster`` of ``n_workers`` that lives for this call.
    """
    t0 = time.perf_counter()
    run_dir = str(Path(run_dir).resolve())
    plan = load_plan(run_dir)
    todo = pending_units(run_dir, plan)
    report = StainReport(Path(run_dir), plan.n_units, skipped=plan.n_units - len(todo))
    if not todo:
        return report
    tp = TaskPass(StainTask(run_dir, make_fn, batch_size, device), todo, label="stain",
                  unit="slab", keys=[f"stain-{plan.unit(i).axis}-{plan.unit(i).name}"
                                     for i in todo])
    report.stained = sorted(run_pass_dask(tp, progress, address, n_workers,
                                          threads_per_worker, processes))
    report.seconds = time.perf_counter() - t0
    report.cost = generator_cost(run_dir, plan)
    return report


def run_pass_dask(tp: TaskPass, progress: bool = False, address: str | Any | None = None,
                  n_workers: int = 2, threads_per_worker: int = 1, processes: bool = True
                  ) -> list[str]:
    """Run a block-task pass on dask, one dask task per job; the recorded names, sorted.

    ``address``: as for :func:`run_dask`. Each worker opens the run directory and the input
    itself (the task is small and picklable), so nothing large travels through the
    scheduler.
    """
    from distributed import Client, LocalCluster, as_completed

    if not tp.jobs:
        return []
    cluster = None
    if isinstance(address, Client):
        client, own_client = address, False
    else:
        if address is None:
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                   processes=processes, dashboard_address=None)
            address = cluster
        client, own_client = Client(address), True
    try:
        keys = tp.keys or [f"{tp.label}-{n}" for n in range(len(tp.jobs))]
        futures = {client.submit(tp.task, job, key=f"{key}-{os.getpid()}", pure=False): n
                   for n, (job, key) in enumerate(zip(tp.jobs, keys, strict=True))}
        bar = tp.bar(progress)
        names: list[str] = []
        for fut in as_completed(futures):
            names += fut.result()
            if bar is not None:
                bar.update(tp.weight(futures[fut]))
        if bar is not None:
            bar.close()
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    return sorted(names)
