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
"""

from __future__ import annotations

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

    def weight(self, n: int) -> int:
        return 1 if self.weights is None else int(self.weights[n])

    def bar(self, enabled: bool) -> Any:
        """A tqdm bar over the pass (None when disabled or empty)."""
        total = sum(self.weight(n) for n in range(len(self.jobs)))
        if not enabled or not total:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=self.label, unit=self.unit)


Runner = Callable[[TaskPass, bool], list[str]]


def run_serial(tp: TaskPass, progress: bool = False) -> list[str]:
    """Run the pass's jobs one after another in this process, in order."""
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

    context = _process_context(type(tp.task).__module__)
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


def _process_context(module: str) -> Any:
    """How :func:`run_processes` starts its workers. Fork, where zarr resets its I/O thread
    in a forked child (zarr registers ``reset_resources_after_fork``; the engine's own
    threads live only inside a task call, and torch is not used by the tasks' children):
    the workers start at once. Elsewhere a fork server that imports ``module`` once
    (spawning would import the engine, torch included, in every worker: 3-6 s each)."""
    import multiprocessing

    from zarr.core import sync

    if "fork" in multiprocessing.get_all_start_methods() and hasattr(
            sync, "reset_resources_after_fork"):
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module])
    return context
