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

from hpcstain.executors.local import MakeFn, StainReport, stain_pass
from hpcstain.volume.plan import load_plan
from hpcstain.volume.stain import generator_cost, pending_units
from hpcstain.volume.tasks import TaskGraph, TaskPass


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
    tp = stain_pass(run_dir, plan, todo, None, make_fn, batch_size, device)
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
    if not tp.jobs:
        return []
    return run_graph_dask(TaskGraph([tp]), progress, address, n_workers, threads_per_worker,
                          processes)[0]


def run_graph_dask(graph: TaskGraph, progress: bool = False, address: str | Any | None = None,
                   n_workers: int = 2, threads_per_worker: int = 1, processes: bool = True
                   ) -> list[list[str]]:
    """Run a task graph on dask: one dask task per job, depending on its upstream jobs'
    tasks (a fuse group starts once the stain units under it are done, while other units
    are still staining: later passes have the higher priority); the names each pass
    recorded, sorted. ``address``: as for :func:`run_dask`."""
    from distributed import Client, LocalCluster, as_completed

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
        futures: dict[tuple[int, int], Any] = {}
        for k, tp in enumerate(graph.passes):
            keys = tp.keys or [f"{tp.label}-{n}" for n in range(len(tp.jobs))]
            for j, (job, key) in enumerate(zip(tp.jobs, keys, strict=True)):
                upstream = [futures[u] for u in graph.needs(k, j)]
                futures[(k, j)] = client.submit(_after, tp.task, job, *upstream, priority=k,
                                                key=f"{key}-{os.getpid()}", pure=False)
        node = {f.key: n for n, f in futures.items()}
        bars = [tp.bar(progress) for tp in graph.passes]
        names: list[list[str]] = [[] for _ in graph.passes]
        for fut in as_completed(list(futures.values())):
            k, j = node[fut.key]
            names[k] += fut.result()
            if bars[k] is not None:
                bars[k].update(graph.passes[k].weight(j))
        for bar in bars:
            if bar is not None:
                bar.close()
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    return [sorted(n) for n in names]


def _after(task: Any, job: Any, *upstream: Any) -> list[str]:
    """A job run once its upstream jobs are done (dask passes their results; unused)."""
    return task(job)  # type: ignore[no-any-return]
