"""The block-task contract of the volume engine, and the in-process runner.

A *block task* is a picklable callable ``task(job) -> list[str]``: it computes one job (a
slab unit of ``stain``, a chunk group of ``fuse``), writes its data, then the job's
completion records ``RUN_DIR/done/<task>/<name>.json`` (:func:`hpcstain.volume.plan.
write_record`, only once the data is durable), and returns the names it recorded. A pass
hands out only jobs without records, so a pass killed at any point is resumed by running
it again, with any runner.

A :class:`TaskPass` is one pass of a task over its pending jobs. A *runner*
(:data:`Runner`) maps the task over the jobs and returns every recorded name: in this
process (:func:`run_serial`), or through ``hpcstain.executors`` (local processes, dask,
MPI ranks: :func:`hpcstain.executors.pass_runner`). The engines never import the
executors: they take a runner (``fuse_run(runner=...)``).

A :class:`TaskGraph` chains passes: a job of a later pass names the jobs of earlier passes
it reads (its *upstream*: a fuse group, the stain units under its chunks) and starts once
they are done, so with several workers fusion runs while staining goes on
(:func:`run_graph_processes`; dask: :func:`hpcstain.executors.dask.run_graph_dask`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

BlockTask = Callable[[Any], list[str]]


@dataclass
class TaskPass:
    """One pass of a block task over its pending jobs (picklable: executors ship it)."""

    task: BlockTask
    jobs: Sequence[Any]
    label: str = "task"                 # progress bar description
    unit: str = "job"                   # what the progress bar counts
    weights: Sequence[int] | None = None  # progress per job (default 1 each)
    keys: Sequence[str] | None = None   # scheduler keys per job (dask), for dashboards
    meta: dict[str, Any] = field(default_factory=dict)
    here: Runner | None = None          # how the pass runs in this process, where it has its
    #                                     own way (stain: the next slab read ahead)

    def weight(self, n: int) -> int:
        return 1 if self.weights is None else int(self.weights[n])

    def bar(self, enabled: bool) -> Any:
        """A tqdm bar over the pass (None when disabled or empty)."""
        total = sum(self.weight(n) for n in range(len(self.jobs)))
        if not enabled or not total:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=self.label, unit=self.unit)


Runner = Callable[["TaskPass", bool], list[str]]


def run_serial(tp: TaskPass, progress: bool = False) -> list[str]:
    """Run the pass's jobs one after another in this process, in order (by the pass's own
    in-process runner, ``tp.here``, where it has one)."""
    if tp.here is not None:
        return tp.here(tp, progress)
    bar = tp.bar(progress)
    names: list[str] = []
    for n, job in enumerate(tp.jobs):
        names += tp.task(job)
        if bar is not None:
            bar.update(tp.weight(n))
    if bar is not None:
        bar.close()
    return names


def run_processes(tp: TaskPass, progress: bool = False, workers: int = 2) -> list[str]:
    """Run the pass's jobs on ``workers`` local processes, as they finish; names sorted.

    The processes are forked from this one (:func:`_process_context`), so they start at
    once with everything imported."""
    if workers <= 1 or len(tp.jobs) <= 1:
        return run_serial(tp, progress)
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = _process_context([type(tp.task).__module__])
    bar = tp.bar(progress)
    names: list[str] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(tp.jobs)),
                             mp_context=context) as pool:
        futures = {pool.submit(tp.task, job): n for n, job in enumerate(tp.jobs)}
        try:
            for f in as_completed(futures):
                names += f.result()
                if bar is not None:
                    bar.update(tp.weight(futures[f]))
        except BaseException:  # a failed job: the jobs not started yet are dropped
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if bar is not None:
        bar.close()
    return sorted(names)


@dataclass
class TaskGraph:
    """Passes of block tasks in order; ``upstream[k][j]`` lists the jobs, as (pass, job)
    positions of earlier passes, that job ``j`` of pass ``k`` waits for (default: none)."""

    passes: list[TaskPass]
    upstream: dict[int, list[list[tuple[int, int]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, needs in self.upstream.items():
            if len(needs) != len(self.passes[k].jobs) or any(
                    not 0 <= p < k or not 0 <= j < len(self.passes[p].jobs)
                    for need in needs for p, j in need):
                raise ValueError(f"pass {k}: upstream must name earlier passes' jobs, one "
                                 "list per job")

    def needs(self, k: int, j: int) -> list[tuple[int, int]]:
        return self.upstream[k][j] if k in self.upstream else []

    def nodes(self) -> list[tuple[int, int]]:
        return [(k, j) for k, tp in enumerate(self.passes) for j in range(len(tp.jobs))]


def run_graph_serial(graph: TaskGraph, progress: bool = False) -> list[list[str]]:
    """Run the graph's passes one after another in this process (each by
    :func:`run_serial`: a pass before the next is a valid order of any graph); the names
    each pass recorded."""
    return [run_serial(tp, progress) if tp.jobs else [] for tp in graph.passes]


def run_graph_processes(graph: TaskGraph, progress: bool = False, workers: int = 2,
                        threads: int | None = None) -> list[list[str]]:
    """Run the graph on ``workers`` local processes: a job starts as soon as its upstream
    jobs are done (among those ready, later passes first: a fuse group whose slabs are
    stained goes before the next slab, so results appear early); the names each pass
    recorded, sorted. A failed job stops the graph: nothing
    downstream of it runs, and the jobs not started are dropped. The workers come from a
    fork server (the stain task runs torch, which a plain fork of this process may hang)
    and share the cores: ``threads`` each (default: the cores over ``workers``)."""
    if workers <= 1:
        return run_graph_serial(graph, progress)
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    nodes = graph.nodes()
    waiting = {n: set(graph.needs(*n)) for n in nodes}
    downstream: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for n in nodes:
        for u in waiting[n]:
            downstream.setdefault(u, []).append(n)
    def first(n: tuple[int, int]) -> tuple[int, int]:
        return -n[0], n[1]

    ready = sorted((n for n in nodes if not waiting[n]), key=first)
    bars = [tp.bar(progress) for tp in graph.passes]
    context = _process_context(sorted({type(tp.task).__module__ for tp in graph.passes}),
                               fork=False)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    names: list[list[str]] = [[] for _ in graph.passes]
    with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                             initializer=_share_cores, initargs=(threads,)) as pool:
        running: dict[Any, tuple[int, int]] = {}
        try:
            while ready or running:
                while ready and len(running) < workers:
                    k, j = ready.pop(0)
                    tp = graph.passes[k]
                    running[pool.submit(tp.task, tp.jobs[j])] = (k, j)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    k, j = running.pop(f)
                    names[k] += f.result()
                    bar = bars[k]
                    if bar is not None:
                        bar.update(graph.passes[k].weight(j))
                    for d in downstream.get((k, j), []):
                        waiting[d].discard((k, j))
                        if not waiting[d]:
                            ready.append(d)
                    ready.sort(key=first)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    for bar in bars:
        if bar is not None:
            bar.close()
    return [sorted(n) for n in names]


def _share_cores(threads: int) -> None:
    """A worker's thread budget (OpenMP, BLAS, torch), set before it runs a task."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _process_context(modules: list[str], fork: bool = True) -> Any:
    """How :func:`run_processes` starts its workers. Fork, where zarr resets its I/O thread
    in a forked child (zarr registers ``reset_resources_after_fork``; the engine's own
    threads live only inside a task call, and torch is not used by the tasks' children):
    the workers start at once. Elsewhere a fork server that imports ``modules`` once
    (spawning would import the engine, torch included, in every worker: 3-6 s each)."""
    import multiprocessing

    from zarr.core import sync

    if fork and "fork" in multiprocessing.get_all_start_methods() and hasattr(
            sync, "reset_resources_after_fork"):
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(modules)
    return context
