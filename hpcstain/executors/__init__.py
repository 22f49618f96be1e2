"""Executors: run the block tasks of the volume engine (:mod:`hpcstain.volume.tasks`: a
stain unit, a fuse chunk group) in-process, on local processes, on dask, over MPI ranks,
or as a SLURM-array task. None of them knows anything about staining or fusion beyond the
task callables; jobs with completion records are never handed out, so every executor is
safe to re-run.

``run_stain`` and ``run_fuse`` are the two passes; ``pass_runner`` gives the runner of an
executor for any pass; ``run_stain_fuse`` runs both as one task graph (each fuse group
after the stain units it reads)."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from hpcstain.errors import UsageError
from hpcstain.executors.dask import run_dask, run_graph_dask, run_pass_dask
from hpcstain.executors.local import (
    MakeFn,
    StainReport,
    StainTask,
    process_unit,
    run_local,
    stain_pass,
)
from hpcstain.executors.mpi import run_fuse_mpi, run_mpi
from hpcstain.volume.fuse import FuseReport, chunk_needs, fuse_run, start_fuse
from hpcstain.volume.plan import Plan, load_plan
from hpcstain.volume.stain import StainFn, generator_cost, pending_units
from hpcstain.volume.tasks import (
    Runner,
    TaskGraph,
    TaskPass,
    run_graph_processes,
    run_graph_serial,
    run_processes,
)

__all__ = ["StainReport", "StainTask", "pass_runner", "process_unit", "run_fuse", "run_local",
           "run_stain", "run_stain_fuse"]


def run_stain(run_dir: str | os.PathLike[str], fn: StainFn | None = None,
              executor: str = "local", **kwargs: Any) -> StainReport:
    """Stain every pending unit of ``run_dir`` with ``executor`` ("local", "dask", "mpi").

    ``fn`` is used in-process only; the dask executor builds the function in each worker
    from ``make_fn`` (a picklable zero-argument callable) or the plan's checkpoint.
    """
    if executor == "local":
        return run_local(run_dir, fn=fn, **kwargs)
    if executor == "dask":
        if fn is not None and "make_fn" not in kwargs:
            kwargs["make_fn"] = _Constant(fn)
        return run_dask(run_dir, **kwargs)
    if executor == "mpi":
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
    if executor == "mpi":
        return run_fuse_mpi(run_dir, **kwargs)
    if executor == "dask" and address is not None:
        workers = max(workers, 2)  # a cluster of unknown size: cut the chunks for several
    return fuse_run(run_dir, runner=pass_runner(executor, workers, address), workers=workers,
                    **kwargs)


def run_stain_fuse(run_dir: str | os.PathLike[str], fn: StainFn | None = None,
                   executor: str = "local", workers: int = 1, address: Any = None,
                   make_fn: MakeFn | None = None, batch_size: int = 0, device: str = "cpu",
                   progress: bool = True, **fuse: Any) -> tuple[StainReport, FuseReport | None]:
    """Stain every pending unit of ``run_dir`` and fuse the run, as one task graph: each
    fuse chunk group runs once the stain units it reads are done (its chunks grown by the
    fusion halo, on every fused axis). On one local worker the passes run one after the
    other, here (the next slab read ahead); on ``workers`` local processes or on dask a
    group starts while other units still stain. MPI ranks run the stain pass, then the
    fuse pass (every rank calls this; rank 0 returns the fuse report, the others None).
    ``fuse``: the options of :func:`hpcstain.volume.fuse.fuse_run` (method, out, pyramid_levels,
    ngff, fill_outside, confidence, ...). The image is the one ``stain`` then ``fuse`` would
    have written, byte for byte, and the graph resumes as they do."""
    if executor == "mpi":
        stained = run_stain(run_dir, fn, "mpi", make_fn=make_fn, batch_size=batch_size,
                            device=device, progress=False)
        return stained, run_fuse(run_dir, "mpi", progress=False, **fuse)
    if executor not in ("local", "dask"):
        raise _unknown(executor)
    t0 = time.perf_counter()
    plan = load_plan(run_dir)
    todo = interleaved(plan, pending_units(run_dir, plan))
    report = StainReport(Path(run_dir), plan.n_units, skipped=plan.n_units - len(todo))
    if executor == "dask" and address is not None:
        workers = max(workers, 2)
    if fn is not None and make_fn is None and (executor == "dask" or workers > 1):
        make_fn = _Constant(fn)  # other processes build it from here (fn must pickle)
    start = start_fuse(run_dir, workers=workers, after_stain=True, **fuse)
    position = {(plan.unit(i).axis, plan.unit(i).name): n for n, i in enumerate(todo)}
    upstream = []
    for group in start.groups:
        needs = chunk_needs(plan, group, start.fuse.axes, start.fuse.method)
        upstream.append(sorted((0, position[(a, name)]) for a, names in needs.items()
                               for name in names if (a, name) in position))
    graph = TaskGraph([stain_pass(run_dir, plan, todo, fn, make_fn, batch_size, device),
                       start.task_pass()], {1: upstream})
    if executor == "dask":
        names = run_graph_dask(graph, progress, address=address, n_workers=max(workers, 1))
    elif workers > 1:
        names = run_graph_processes(graph, progress, workers)
    else:
        names = run_graph_serial(graph, progress)
    report.stained = names[0]
    report.seconds = time.perf_counter() - t0
    report.cost = generator_cost(run_dir, plan)
    return report, start.finish(names[1])


def interleaved(plan: Plan, todo: list[int]) -> list[int]:
    """The units ``todo`` with the axes advancing together (z, y, x, z, y, x, ... in
    proportion to their unit counts): the chunks near the origin have all their axes
    stained early, so their fuse groups can start while the rest stains."""
    per_axis = [[i for i in todo if plan.unit(i).axis == a] for a in plan.axes]
    order = sorted((n / len(units), k, i) for k, units in enumerate(per_axis)
                   for n, i in enumerate(units))
    return [i for _, _, i in order]


def _unknown(executor: str) -> Exception:
    return UsageError(f"unknown executor {executor!r} (choose local, dask or mpi)")


class _Constant:
    """A make_fn that returns a given function (must itself pickle for process workers)."""

    def __init__(self, fn: StainFn) -> None:
        self.fn = fn

    def __call__(self) -> StainFn:
        return self.fn
