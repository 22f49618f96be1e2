"""In-process executor: work units one after another, with a progress bar."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hpcstain.volume.plan import Plan, load_plan
from hpcstain.volume.stain import (
    LoadedUnit,
    StainFn,
    UnitResult,
    generator_cost,
    load_unit,
    pending_units,
    resolve_fn,
    stain_unit,
    unit_bytes,
)
from hpcstain.volume.tasks import TaskPass, run_serial

MakeFn = Callable[[], StainFn]
# What a unit being stained and the next one read ahead may hold together (unit_bytes):
# beyond it the next unit is read only once the current one's CT is freed. 1.25 GiB keeps
# a run of the plan's largest units (128 whole 1024² planes) under 2 GB of peak RSS with
# the interpreter and torch (docs/benchmarks.md, "A real-size run").
READ_AHEAD_BYTES = 5 << 28


@dataclass
class StainReport:
    """Which units a pass stained (the rest of the plan was already done)."""

    run_dir: Path
    n_units: int
    stained: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    cost: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        line = (f"{self.run_dir}: stained {len(self.stained)} unit(s), {self.skipped} already "
                f"done, {self.n_units} in the plan ({self.seconds:.1f} s)")
        if self.cost:
            line += ("\n  generator pixels per output voxel·axis: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in self.cost.items()))
        return line


def process_unit(run_dir: str | os.PathLike[str], index: int,
                 make_fn: MakeFn | None = None, batch_size: int = 0,
                 device: str = "cpu") -> UnitResult:
    """The unit of work every executor runs: open the run, stain one unit, record it.

    ``make_fn`` builds the staining function in the worker (default: the run's pinned
    generator, loaded once per process).
    """
    plan = load_plan(run_dir)
    fn = resolve_fn(None, make_fn, plan, run_dir, device)
    return stain_unit(run_dir, index, fn, batch_size=batch_size, plan=plan, device=device)


def unit_name(result: UnitResult) -> str:
    return f"{result.axis}/{result.name}"


@dataclass
class StainTask:
    """Stain's block task (:mod:`hpcstain.volume.tasks`): ``task(unit index)`` stains and
    records one unit (:func:`process_unit`) and returns its name (``axis/unit``)."""

    run_dir: str
    make_fn: MakeFn | None = None
    batch_size: int = 0
    device: str = "cpu"

    def __call__(self, index: int) -> list[str]:
        return [unit_name(process_unit(self.run_dir, index, self.make_fn, self.batch_size,
                                       self.device))]


def run_local(run_dir: str | os.PathLike[str], fn: StainFn | None = None,
              make_fn: MakeFn | None = None, units: Iterable[int] | None = None,
              batch_size: int = 0, device: str = "cpu", progress: bool = True,
              prefetch: bool = True) -> StainReport:
    """Stain every pending unit (or the given ``units``) in this process.

    With ``prefetch`` a background thread reads and preprocesses the next unit (read +
    halo, Gaussian, normalisation) while the generator works on the current one.
    """
    t0 = time.perf_counter()
    plan = load_plan(run_dir)
    pending = set(pending_units(run_dir, plan))
    todo = [i for i in (range(plan.n_units) if units is None else units) if i in pending]
    report = StainReport(Path(run_dir), plan.n_units, skipped=plan.n_units - len(pending))
    if todo:
        report.stained = run_serial(stain_pass(run_dir, plan, todo, fn, make_fn, batch_size,
                                               device, prefetch), progress)
    report.seconds = time.perf_counter() - t0
    report.cost = generator_cost(run_dir, plan)
    return report


def stain_pass(run_dir: str | os.PathLike[str], plan: Plan, todo: list[int],
               fn: StainFn | None = None, make_fn: MakeFn | None = None, batch_size: int = 0,
               device: str = "cpu", prefetch: bool = True) -> TaskPass:
    """Stain's pass over the units ``todo``: a :class:`StainTask` per unit wherever the
    runner sends it (built there from ``make_fn`` or the run's pinned generator); in this
    process by :func:`stain_here` (``fn``, the next unit read ahead)."""
    return TaskPass(StainTask(str(run_dir), make_fn, batch_size, device), todo, label="stain",
                    unit="slab", keys=[f"stain-{plan.unit(i).axis}-{plan.unit(i).name}"
                                       for i in todo],
                    here=functools.partial(stain_here, fn=fn, prefetch=prefetch))


def stain_here(tp: TaskPass, progress: bool = False, fn: StainFn | None = None,
               prefetch: bool = True, read_ahead_bytes: int | None = None) -> list[str]:
    """Run a stain pass in this process; with ``prefetch`` a background thread reads and
    prepares the next unit while the generator works on the current one, when both fit in
    ``read_ahead_bytes`` (default :data:`READ_AHEAD_BYTES`; :func:`~hpcstain.volume.stain.
    unit_bytes`); when they do not, the next unit is read once the current one's CT is
    freed, while its RGB is written, so memory stays near one unit's."""
    task: StainTask = tp.task  # type: ignore[assignment]
    run_dir, todo = task.run_dir, list(tp.jobs)
    budget = READ_AHEAD_BYTES if read_ahead_bytes is None else read_ahead_bytes
    plan = load_plan(run_dir)
    fn = resolve_fn(fn, task.make_fn, plan, run_dir, task.device)
    bar = tp.bar(progress)
    names: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead: Future[LoadedUnit] | None = None
        for n, i in enumerate(todo):
            loaded = ahead.result() if ahead is not None else None
            ahead = None
            nxt = todo[n + 1] if prefetch and n + 1 < len(todo) else None

            def read_next(nxt: int | None = nxt) -> None:
                nonlocal ahead
                if nxt is not None and ahead is None:
                    ahead = pool.submit(load_unit, run_dir, nxt, plan)

            if nxt is not None and unit_bytes(plan, i)[0] + unit_bytes(plan, nxt)[1] <= budget:
                read_next()  # now: both fit
            result = stain_unit(run_dir, i, fn, batch_size=task.batch_size, plan=plan,
                                loaded=loaded, device=task.device, released=read_next)
            read_next()  # (a unit found done calls nothing)
            names.append(unit_name(result))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return names
