"""A calm terminal for `hpcstain submit ... --wait`.

* :class:`RepeatFilter` collapses submitit's repeated log warnings: on a SLURM without job
  accounting every poll logs "Call #N - Bypassing sacct error …" (and array jobs several
  per poll). The first warning of each kind passes (marked so), the rest are counted; the
  waiting command prints one line with the count at the end.
* :func:`wait_for_jobs` replaces the silent ``job.result()`` loop with one progress line
  of finished tasks and of the run's work units (read from the completion records; the
  same counts as ``hpcstain status``), redrawn in place on a terminal and printed at most
  every ``log_every`` seconds (and whenever a task finishes) into a log file. Failed
  tasks become one line each (the exception's last line and the task's log file), never a
  traceback.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hpcstain.launch.submit import describe, submit_fuse
from hpcstain.status import cached_plan, squeue_jobs, train_status

SUBMITIT_LOGGER = "submitit"
HIDDEN_NOTE = " [repeats of this warning are hidden]"
_CALL = re.compile(r"^Call #\d+ - ")
_NUMBER = re.compile(r"\d+")


def message_key(message: str) -> str:
    """What makes two warnings "the same": the text with every number replaced."""
    return _NUMBER.sub("#", _CALL.sub("", message))


class RepeatFilter(logging.Filter):
    """Pass the first record of each (level, message-kind); count the repeats."""

    def __init__(self, min_level: int = logging.WARNING) -> None:
        super().__init__()
        self.min_level = min_level
        self.counts: Counter[tuple[int, str]] = Counter()
        self.first: dict[tuple[int, str], str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        message = record.getMessage()
        key = (record.levelno, message_key(message))
        self.counts[key] += 1
        if self.counts[key] > 1:
            return False
        self.first[key] = message
        record.msg, record.args = message + HIDDEN_NOTE, ()
        return True

    @property
    def hidden(self) -> int:
        return sum(n - 1 for n in self.counts.values())

    def summary(self) -> list[str]:
        """One line per repeated warning: how often it was hidden."""
        out = []
        for key, n in self.counts.items():
            if n > 1:
                text = self.first[key]
                text = text if len(text) <= 100 else text[:99] + "…"
                out.append(f"(submitit: {n - 1} more × \"{text}\" hidden)")
        return out


_FILTER: RepeatFilter | None = None


def quiet_submitit() -> RepeatFilter:
    """Install (once) the repeat filter on submitit's logger and warnings; return it."""
    global _FILTER
    if _FILTER is None:
        _FILTER = RepeatFilter()
        logging.getLogger(SUBMITIT_LOGGER).addFilter(_FILTER)
        warnings.filterwarnings("once", module=r"submitit(\..*)?$")
    return _FILTER


# --------------------------------------------------------------------------- progress


@dataclass
class JobOutcome:
    job: Any
    ok: bool
    result: Any = None
    error: str = ""


@dataclass
class WaitReport:
    outcomes: list[JobOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if not o.ok]


def unit_counts(run_dir: str | Path) -> dict[str, tuple[int, int]]:
    """(done, total) of a staining run's work units and of its fused chunks."""
    # lazy: hpcstain.volume loads torch (`submit train --wait` does not need it)
    from hpcstain.volume.rundir import done_names

    plan = cached_plan(run_dir)  # parsed once per plan.json version, not every poll
    done = sum(len(done_names(run_dir, f"axis-{a}")) for a in plan.axes)
    out = {"units": (min(done, plan.n_units), plan.n_units)}
    fused = Path(run_dir) / "done" / "fused"
    if fused.is_dir() or (Path(run_dir) / "fused.ome.zarr").exists():
        out["fused"] = (len(done_names(run_dir, "fused")), plan.n_chunks)
    return out


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _elapsed(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(label: str, tasks_done: int, n_tasks: int,
                  counts: dict[str, tuple[int, int]], seconds: float) -> str:
    parts = [f"{label} {_bar(tasks_done, n_tasks)} {tasks_done}/{n_tasks} task(s) finished"]
    for name, (done, total) in counts.items():
        parts.append(f"{name} {done}/{total}")
    parts.append(_elapsed(seconds))
    return " · ".join(parts)


def _failure(job: Any) -> str:
    """The last line of a failed job's exception and where its log is."""
    try:
        exc = job.exception()
    except Exception as err:  # submitit raises many kinds here
        exc = err
    text = str(exc).strip().splitlines() if exc is not None else []
    lines = [ln.strip() for ln in text if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return f"{last[:300]} (log: {job.paths.stderr})"


def wait_for_jobs(jobs: list[Any], label: str, counts: Callable[[], dict[str, Any]] | None
                  = None, out: TextIO | None = None, interval: float = 2.0,
                  log_every: float = 30.0, gone: Callable[[Any], bool] | None = None
                  ) -> WaitReport:
    """Wait for ``jobs`` showing one progress line; collect results and failures.

    ``counts`` returns extra ``name: (done, total)`` pairs (work units, fused chunks).
    ``gone(job)`` says a job left the scheduler without a result (killed); it is then
    reported failed instead of waited on forever.
    """
    out = out or sys.stderr
    tty = out.isatty()
    t0 = time.monotonic()
    finished: dict[int, bool] = {}
    shown, shown_tasks, last_print = "", -1, -1e9
    while True:
        for i, job in enumerate(jobs):
            if i not in finished and job.done():
                finished[i] = True
            elif i not in finished and gone is not None and gone(job):
                finished[i] = False
        extra = counts() if counts is not None else {}
        now = time.monotonic()
        line = progress_line(label, len(finished), len(jobs), extra, now - t0)
        complete = len(finished) == len(jobs)
        changed = line.rsplit(" · ", 1)[0] != shown
        if tty:
            out.write("\r" + line + "\x1b[K" + ("\n" if complete else ""))
            out.flush()
        elif complete or len(finished) != shown_tasks or (changed and
                                                          now - last_print >= log_every):
            out.write(line + "\n")  # a log file: a line per finished task, else sparse
            out.flush()
            shown, shown_tasks, last_print = line.rsplit(" · ", 1)[0], len(finished), now
        if complete:
            break
        time.sleep(interval)
    report = WaitReport(seconds=time.monotonic() - t0)
    for i, job in enumerate(jobs):
        if not finished[i]:
            report.outcomes.append(JobOutcome(job, False, error="left the queue without a "
                                              f"result (killed?) (log: {job.paths.stderr})"))
            continue
        try:
            results = job.results()  # one per task (rank) of the job
            report.outcomes.append(JobOutcome(job, True, results[0] if results else None))
        except Exception:  # the job's own exception, shown as one line
            report.outcomes.append(JobOutcome(job, False, error=_failure(job)))
    return report


def slurm_gone(cluster_executor: str) -> Callable[[Any], bool] | None:
    """For SLURM: a job is gone when ``squeue`` no longer lists it on two polls in a row
    and it left no result file (the scheduler killed it). None elsewhere."""
    if cluster_executor != "slurm":
        return None
    misses: Counter[str] = Counter()
    cache: dict[str, Any] = {"t": -1e9, "live": None}

    def gone(job: Any) -> bool:
        if time.monotonic() - cache["t"] > 1.0:  # one squeue call per poll
            cache.update(t=time.monotonic(), live=squeue_jobs())
        live = cache["live"]
        if live is None:
            return False
        jid = str(job.job_id)
        if jid in live:
            misses[jid] = 0
            return False
        misses[jid] += 1
        return misses[jid] >= 3 and not job.done()

    return gone


def print_summary(report: WaitReport, filt: RepeatFilter | None, out: TextIO | None = None
                  ) -> None:
    out = out or sys.stderr
    for o in report.failed:
        out.write(f"job {o.job.job_id} failed: {o.error}\n")
    if filt is not None:
        for line in filt.summary():
            out.write(line + "\n")
    out.flush()


def wait_stain(run_dir: Path, cluster: Any, jobs: list[Any], fuse_job: Any = None,
               fuse: bool = False, method: str | None = None, out: TextIO | None = None,
               interval: float = 2.0) -> int:
    """``submit stain --wait``: progress of the array (tasks, units), then of the fuse job.

    With local processes (no scheduler dependencies) the fuse job is submitted here once
    the array succeeded. Returns 0, or 1 when a job failed.
    """
    out = out or sys.stderr
    filt = quiet_submitit()
    gone = slurm_gone(cluster.executor)
    report = wait_for_jobs(jobs, "stain", lambda: unit_counts(run_dir), out=out,
                           interval=interval, gone=gone)
    if fuse and report.failed:
        what = f" (job {fuse_job.job_id} will never start: cancel it)" if fuse_job else ""
        out.write(f"fuse not waited for: the stain array failed{what}\n")
    elif fuse:
        if fuse_job is None:
            fuse_job = submit_fuse(run_dir, cluster, method=method)
            print("fuse job:")
            print(describe(fuse_job))
        fused = wait_for_jobs([fuse_job], "fuse", lambda: unit_counts(run_dir), out=out,
                              interval=interval, gone=gone)
        report.outcomes += fused.outcomes
        if not fused.failed:
            print(fused.outcomes[0].result)
    print_summary(report, filt, out)
    done = sum(o.ok for o in report.outcomes)
    print(f"{done}/{len(report.outcomes)} job(s) succeeded; details: hpcstain status "
          f"{run_dir}")
    return 1 if report.failed else 0


def wait_train(jobs: list[Any], run_dirs: list[Path], out: TextIO | None = None,
               interval: float = 5.0) -> list[JobOutcome]:
    """``submit train/cv --wait``: one progress line (jobs finished, steps of the runs)."""
    def steps() -> dict[str, tuple[int, int]]:
        done = total = 0
        for run in run_dirs:
            try:
                r = train_status(run)
            except Exception:  # not started yet (no config.yaml): nothing to count
                continue
            done += int(r["step"])
            total += int(r["steps_total"] or 0)
        return {"steps": (done, total)} if total else {}

    filt = quiet_submitit()
    report = wait_for_jobs(jobs, "train", steps, out=out, interval=interval)
    print_summary(report, filt, out)
    return report.outcomes
