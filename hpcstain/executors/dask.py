"""dask.distributed executor: one task per pending work unit on a LocalCluster or a scheduler.

Tasks are the plain :func:`~hpcstain.executors.local.process_unit`; each worker opens the
run directory and the input itself, so nothing large travels through the scheduler.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hpcstain.executors.local import MakeFn, StainReport, process_unit, unit_name
from hpcstain.volume.plan import load_plan
from hpcstain.volume.stain import generator_cost, pending_units


def run_dask(run_dir: str | os.PathLike[str], make_fn: MakeFn | None = None,
             address: str | Any | None = None, n_workers: int = 2, threads_per_worker: int = 1,
             processes: bool = True, batch_size: int = 0, device: str = "cpu",
             progress: bool = False) -> StainReport:
    """Stain every pending unit on dask.

    ``address`` is a scheduler address (``tcp://host:8786``), an existing
    ``distributed.Client`` or cluster object (e.g. a dask-jobqueue ``SLURMCluster``), or
    None for a ``LocalCluster`` of ``n_workers`` that lives for this call.
    """
    from distributed import Client, LocalCluster, as_completed

    t0 = time.perf_counter()
    run_dir = str(Path(run_dir).resolve())
    plan = load_plan(run_dir)
    todo = pending_units(run_dir, plan)
    report = StainReport(Path(run_dir), plan.n_units, skipped=plan.n_units - len(todo))
    if not todo:
        return report
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
        futures = [client.submit(process_unit, run_dir, i, make_fn, batch_size, device,
                                 key=f"stain-{plan.unit(i).axis}-{plan.unit(i).name}-"
                                 f"{os.getpid()}", pure=False)
                   for i in todo]
        done = as_completed(futures)
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(futures), desc="stain", unit="slab")
        for fut in done:
            report.stained.append(unit_name(fut.result()))
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    report.stained.sort()
    report.seconds = time.perf_counter() - t0
    report.cost = generator_cost(run_dir, plan)
    return report
