"""`hpcstain status RUN_DIR`: how far a staining or a training run is, from its files alone.

Staining runs (``plan.json``) are read from their completion records
(``done/axis-*/<unit>.json``: host, pid, SLURM ids, end time, seconds, voxels), the
in-progress and failure markers of :mod:`hpcstain.volume.rundir`, and the fuse records
(``done/<image>/<chunk>.json``). A unit is

* **done** when its completion record exists;
* **running** when a worker's in-progress marker exists and that worker may still exist;
* **stale** when an in-progress marker is left by a worker that is provably gone: its
  SLURM job is no longer in ``squeue``, or (no SLURM job, same host) its process no longer
  exists (or its pid now belongs to a process started later). Workers on other hosts
  without a SLURM job cannot be checked; they stay "running" and are flagged *overdue*
  once their marker is older than 10 × the median unit time (at least 10 minutes);
* **failed** when the worker recorded an exception for it (and it is not done since).

Throughput is measured over the last (up to) 50 completion records: their voxels over the
wall time from the first one's start to the last one's end, so parallel workers count.
The ETA divides the voxels of the units not yet done by it; with no worker active it is
left out.

Training runs (``config.yaml`` + ``checkpoints/`` or ``losses.jsonl``) report epoch and
step (from the tail of ``losses.jsonl`` and ``epochs.jsonl``), the last losses, the age and
reason of ``checkpoints/latest.pt``, the requeue count (``requeues.jsonl``, written by
``hpcstain submit train`` when SLURM requeues the job; for older runs the "Requeued job"
lines of submitit's logs) and whether the run finished (``DONE``, or ``train.max_steps``
reached).

Exit codes for scripts: 0 complete, 3 in progress, 1 failed or stale work units.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from hpcstain.config import load_config
from hpcstain.errors import InputError

EXIT_COMPLETE, EXIT_FAILED, EXIT_IN_PROGRESS = 0, 1, 3
THROUGHPUT_WINDOW = 50         # completion records the rate is measured over
OVERDUE_FACTOR, OVERDUE_MIN_S = 10.0, 600.0
LOSS_TAIL_BYTES = 1 << 16
REQUEUE_LOG = "requeues.jsonl"
SHOWN_LOSSES = ("G_total", "pixel_ct2hist", "l1", "cycle_ct", "D_hist", "val_l1")

LiveJobs = Callable[[], set[str] | None]


# --------------------------------------------------------------------------- detection


def run_kind(run_dir: str | os.PathLike[str]) -> str:
    """``"stain"`` or ``"train"``; InputError naming the directory otherwise."""
    run = Path(run_dir)
    if not run.exists():
        raise InputError(f"{run}: no such directory")
    if not run.is_dir():
        raise InputError(f"{run}: not a directory (status needs a run directory)")
    if (run / "plan.json").is_file():
        return "stain"
    if (run / "config.yaml").is_file() and ((run / "checkpoints").is_dir()
                                            or (run / "losses.jsonl").is_file()):
        return "train"
    inner = sorted(p.name for p in run.iterdir() if p.is_dir()
                   and ((p / "plan.json").is_file() or (p / "config.yaml").is_file()))
    hint = f"; it holds run directories: {', '.join(inner[:6])}" if inner else ""
    raise InputError(f"{run}: neither a staining run (no plan.json) nor a training run "
                     f"(no config.yaml with checkpoints/ or losses.jsonl){hint}")


def collect_status(run_dir: str | os.PathLike[str], *, now: float | None = None,
                   live_jobs: LiveJobs | None = None, require_fused: bool = False
                   ) -> dict[str, Any]:
    """The status report of a staining or training run (a JSON-able dict)."""
    if run_kind(run_dir) == "stain":
        return stain_status(run_dir, now=now, live_jobs=live_jobs,
                            require_fused=require_fused)
    return train_status(run_dir, now=now)


# --------------------------------------------------------------------------- workers


class LiveJobSet(set[str]):
    """squeue's job ids, and ``started``: id → start time (epoch s) of the job's current
    run, for the jobs running now (a requeued job is pending again, or started anew)."""

    def __init__(self, ids: set[str], started: dict[str, float]) -> None:
        super().__init__(ids)
        self.started = started


_RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                   "STAGE_OUT", "RESIZING"}


def squeue_jobs() -> set[str] | None:
    """Ids of the jobs SLURM still knows as pending/running: job ids and array elements
    (``123_4``, one per element with ``-r``), as a :class:`LiveJobSet`; None without a
    usable squeue."""
    import datetime

    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-h", "-r", "-o", "%A %i %T %S"], capture_output=True,
                             text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    ids: set[str] = set()
    started: dict[str, float] = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        ids.update(fields[:2])
        if len(fields) >= 4 and fields[2] in _RUNNING_STATES:
            try:
                t = datetime.datetime.fromisoformat(fields[3]).timestamp()
            except ValueError:
                continue
            started.update({fields[0]: t, fields[1]: t})
    return LiveJobSet(ids, started)


def _proc_start(pid: int) -> float | None:
    """Start time (epoch seconds) of a local process, from /proc (None if unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text()
                     .splitlines() if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int, since: float) -> bool:
    """Whether local process ``pid``, which existed at ``since``, is still that process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _proc_start(pid)
    return start is None or start <= since + 2.0  # a later start: the pid was reused


def worker_gone(marker: dict[str, Any], live: set[str] | None, host: str) -> str | None:
    """Why the worker of an in-progress marker is provably gone, else None."""
    slurm = marker.get("slurm") or {}
    job = str(slurm.get("job_id", ""))
    if job and live is not None:
        array = slurm.get("array_job_id")
        label = f"{array}_{slurm.get('array_task_id')}" if array else job
        if job in live:
            started = getattr(live, "started", None)  # known for squeue's LiveJobSet
            if started is None:
                return None
            begun = started.get(job)
            if begun is None:  # pending again: a node failure or preemption requeued it
                return f"SLURM job {label} was requeued (node failure?) and waits to restart"
            if begun > float(marker.get("time", 0.0)) + 2.0:
                return f"SLURM job {label} was requeued and restarted after this unit began"
            return None
        return f"SLURM job {label} is no longer queued or running"
    pid, since = marker.get("pid"), float(marker.get("time", 0.0))
    if marker.get("host") == host and isinstance(pid, int) and not pid_alive(pid, since):
        return f"process {pid} on {host} is gone"
    return None


def _worker_text(m: dict[str, Any]) -> str:
    slurm = m.get("slurm") or {}
    if slurm.get("array_job_id"):
        job = f", job {slurm['array_job_id']}_{slurm.get('array_task_id')}"
    elif slurm.get("job_id"):
        job = f", job {slurm['job_id']}"
    else:
        job = ""
    return f"{m.get('host', '?')} pid {m.get('pid', '?')}{job}"


# --------------------------------------------------------------------------- staining


def _read_records(folder: Path) -> list[dict[str, Any]]:
    # lazy: hpcstain.volume loads torch
    from hpcstain.volume.rundir import read_json_folder

    return [{**rec, "_name": name} for name, rec in read_json_folder(folder).items()]


def throughput(records: list[dict[str, Any]], window: int = THROUGHPUT_WINDOW
               ) -> dict[str, Any] | None:
    """Voxels (and units) per wall second over the last ``window`` completion records."""
    timed = sorted((r for r in records if isinstance(r.get("time"), int | float)),
                   key=lambda r: r["time"])[-window:]
    if not timed:
        return None
    start = min(r["time"] - float(r.get("seconds", 0.0)) for r in timed)
    end = timed[-1]["time"]
    span = end - start
    if span <= 0:
        return None
    voxels = sum(int(r.get("voxels", 0)) for r in timed)
    return {"units": len(timed), "span_s": round(span, 3),
            "voxels_per_s": voxels / span, "units_per_hour": len(timed) * 3600.0 / span,
            "last_completion": end,
            "median_unit_s": statistics.median(float(r.get("seconds", 0.0)) for r in timed)}


_PLANS: dict[str, tuple[tuple[int, int, int], Any]] = {}


def cached_plan(run_dir: str | os.PathLike[str]) -> Any:
    """The run's :class:`~hpcstain.volume.plan.Plan`, parsed once per version of its
    ``plan.json`` (inode, mtime, size): polls (``status --watch``, ``submit --wait``) do not
    re-read and re-validate it, nor rebuild its unit list, every round. ``plan.json`` is
    only ever replaced atomically (a new inode), so a changed plan is always seen."""
    # lazy: hpcstain.volume loads torch; `status` and `submit` stay light without it
    from hpcstain.volume.plan import load_plan
    from hpcstain.volume.rundir import plan_path

    path = plan_path(run_dir)
    try:
        st = path.stat()
    except OSError:
        return load_plan(run_dir)  # its own error: not a run directory
    key, name = (st.st_ino, st.st_mtime_ns, st.st_size), str(path.absolute())
    hit = _PLANS.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    plan = load_plan(run_dir)
    if len(_PLANS) >= 16:
        _PLANS.clear()
    _PLANS[name] = (key, plan)
    return plan


class _MarkerScan:
    """The running / stale / failed markers of a run's jobs without a record, gathered into
    ``running``, ``stale`` and ``failed``; ``squeue`` is asked once, at the first marker of
    a SLURM job."""

    def __init__(self, run: Path, live_fn: LiveJobs, host: str) -> None:
        self.run, self.live_fn, self.host = run, live_fn, host
        self.live: set[str] | None = None
        self.live_checked = False
        self.running: list[dict[str, Any]] = []
        self.stale: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []

    def scan(self, task: str, done: set[str], row: dict[str, Any]) -> None:
        """``task``'s markers (stain units and fuse chunk groups) into the lists and the
        counts of ``row``."""
        # lazy: hpcstain.volume loads torch
        from hpcstain.volume.rundir import FAILED, RUNNING, read_markers

        running_now = read_markers(self.run, RUNNING, task)
        for name, m in sorted(running_now.items()):
            if name in done:
                continue
            if not self.live_checked and (m.get("slurm") or {}).get("job_id"):
                self.live, self.live_checked = self.live_fn(), True
            why = worker_gone(m, self.live, self.host)
            entry = {"task": task, "unit": name, "worker": _worker_text(m),
                     "since": m.get("time"), **({"why": why} if why else {})}
            if why:
                self.stale.append(entry)
                row["stale"] += 1
            else:
                self.running.append(entry)
                row["running"] += 1
        for name, m in sorted(read_markers(self.run, FAILED, task).items()):
            retry = running_now.get(name, {})
            if name in done or (retry.get("time") or 0) > (m.get("time") or 0):
                continue  # done since, or a retry started after the failure
            self.failed.append({"task": task, "unit": name, "worker": _worker_text(m),
                                "time": m.get("time"), "error": m.get("error", "?")})
            row["failed"] += 1


def stain_status(run_dir: str | os.PathLike[str], *, now: float | None = None,
                 live_jobs: LiveJobs | None = None, require_fused: bool = False
                 ) -> dict[str, Any]:
    """Progress of a staining run: units per axis, fused chunks, stale/failed, rate, ETA."""
    # lazy: hpcstain.volume loads torch
    from hpcstain.volume.rundir import done_names

    run = Path(run_dir)
    plan = cached_plan(run)
    now = time.time() if now is None else now
    markers = _MarkerScan(run, live_jobs or squeue_jobs, socket.gethostname())
    axes, records, total_voxels, remaining_voxels = _stain_axes(run, plan, markers)
    running, stale, failed = markers.running, markers.stale, markers.failed
    rate = throughput(records)
    if rate is not None:
        limit = max(OVERDUE_MIN_S, OVERDUE_FACTOR * rate["median_unit_s"])
        for entry in running:
            entry["overdue"] = bool(entry.get("since") and now - entry["since"] > limit)
    fused = _fused_status(run, plan.n_chunks)
    for image in fused:  # fuse's chunk groups leave markers under their first chunk
        task = image["image"].removesuffix(".zarr").removesuffix(".ome")
        counts = {"running": 0, "stale": 0, "failed": 0}
        markers.scan(task, done_names(run, task), counts)
        image.update({k: v for k, v in counts.items() if v})
    n_done = sum(a["done"] for a in axes.values())
    n_units = sum(a["total"] for a in axes.values())
    stained = n_done == n_units
    fuse_done = all(f["done"] == f["total"] and not f["pyramid_pending"] for f in fused) \
        and (fused or not require_fused)
    if stale or failed:
        state, code = "failed", EXIT_FAILED
    elif stained and fuse_done:
        state, code = "complete", EXIT_COMPLETE
    else:
        state, code = "in progress", EXIT_IN_PROGRESS
    idle = not running and (rate is None or now - rate["last_completion"] > max(
        OVERDUE_MIN_S, 5.0 * rate["median_unit_s"]))
    eta = None
    if rate is not None and remaining_voxels and not idle and rate["voxels_per_s"] > 0:
        eta = remaining_voxels / rate["voxels_per_s"]
    return {
        "kind": "stain", "run_dir": str(run), "input": plan.input, "shape": list(plan.shape),
        "chunk": list(plan.chunk), "generator_sha256": plan.generator_sha256,
        "axes": axes, "units": {"done": n_done, "total": n_units},
        "voxel_axes": {"done": total_voxels - remaining_voxels, "total": total_voxels},
        "fused": fused, "running": running, "stale": stale, "failed": failed,
        "throughput": rate, "idle": idle, "eta_s": eta, "now": now,
        "state": state, "exit_code": code,
    }


def _stain_axes(run: Path, plan: Any, markers: _MarkerScan
                ) -> tuple[dict[str, Any], list[dict[str, Any]], int, int]:
    """Per axis: units done of total and their running / stale / failed markers. Returns
    the rows, every completion record, and the voxels of all units and of those not done."""
    axes: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    remaining_voxels = total_voxels = 0
    for axis in plan.axes:
        task = f"axis-{axis}"
        units = [u for u in plan.units if u.axis == axis]
        recs = _read_records(run / "done" / task)
        done = {r["_name"] for r in recs}
        records += recs
        size = {u.name: math.prod(s.stop - s.start for s in plan.unit_write_region(u))
                for u in units}
        total_voxels += sum(size.values())
        remaining_voxels += sum(v for n, v in size.items() if n not in done)
        row = {"done": len(done & set(size)), "total": len(units), "running": 0, "stale": 0,
               "failed": 0}
        markers.scan(task, done, row)
        axes[axis] = row
    return axes, records, total_voxels, remaining_voxels


def _fused_status(run: Path, n_chunks: int) -> list[dict[str, Any]]:
    """Fused images of a run (``*.ome.zarr`` and their ``done/<image>`` records)."""
    # lazy: hpcstain.volume loads torch
    from hpcstain.volume.rundir import PYRAMID_PENDING, done_names

    tasks = {p.name.removesuffix(".zarr").removesuffix(".ome") for p in run.glob("*.ome.zarr")}
    done_dir = run / "done"
    if done_dir.is_dir():
        tasks |= {p.name for p in done_dir.iterdir() if p.is_dir()
                  and not p.name.startswith(("axis-", "."))}
    # pyramid_pending: a pass died after its chunk records but before building the pyramid
    return [{"image": f"{t}.ome.zarr", "done": len(done_names(run, t)), "total": n_chunks,
             "pyramid_pending": (done_dir / t / PYRAMID_PENDING).exists()}
            for t in sorted(tasks)]


# --------------------------------------------------------------------------- training


def _tail_rows(path: Path, nbytes: int = LOSS_TAIL_BYTES) -> list[dict[str, Any]]:
    """The JSON rows in the last ``nbytes`` of a JSONL file (the first, cut one dropped)."""
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - nbytes))
        data = fh.read().decode("utf-8", "replace")
    lines = data.splitlines()
    if size > nbytes and lines:
        lines = lines[1:]
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _latest_info(path: Path) -> dict[str, Any] | None:
    """Step, epoch and reason of a checkpoint without reading its weights (mmap)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # being replaced right now, or damaged: report the file only
        return None
    if not isinstance(ckpt, dict):
        return None
    return {k: ckpt.get(k) for k in ("epoch", "step", "reason")}


def requeue_count(run: Path) -> int:
    """Requeues of a training run: ``requeues.jsonl`` rows, else submitit's log lines."""
    log = run / REQUEUE_LOG
    if log.is_file():
        return sum(1 for line in log.read_text().splitlines() if line.strip())
    count = 0
    for path in run.glob("*/*_log.out"):
        try:
            count += path.read_text(errors="replace").count("Requeued job")
        except OSError:
            continue
    return count


def train_status(run_dir: str | os.PathLike[str], *, now: float | None = None
                 ) -> dict[str, Any]:
    """Progress of a training run: epoch, step, last losses, latest.pt, requeues, done."""
    run = Path(run_dir)
    now = time.time() if now is None else now
    try:
        cfg = load_config(str(run / "config.yaml"))
    except Exception as exc:
        raise InputError(f"{run / 'config.yaml'}: unreadable run config ({exc})") from None
    rows = _tail_rows(run / "losses.jsonl")
    last = rows[-1] if rows else {}
    epochs_rows = _tail_rows(run / "epochs.jsonl")
    step = int(last.get("step", 0))
    epochs_done = int(epochs_rows[-1]["epoch"]) if epochs_rows else 0
    latest = run / "checkpoints" / "latest.pt"
    latest_info = None
    if latest.is_file():
        latest_info = {"path": str(latest), "age_s": now - latest.stat().st_mtime,
                       **(_latest_info(latest) or {})}
        step = max(step, int(latest_info.get("step") or 0))
    per_epoch = _steps_per_epoch(run / "losses.jsonl", rows)
    max_steps = cfg.train.max_steps
    total = cfg.train.epochs * per_epoch if per_epoch else None
    if max_steps:
        total = min(total, max_steps) if total else max_steps
    done_file = (run / "DONE").is_file()
    reached_max = bool(max_steps) and step >= max_steps
    complete = done_file or reached_max
    times = [float(r.get("step_s", 0.0)) + float(r.get("data_wait_s", 0.0)) for r in rows[-50:]]
    eta = None
    if not complete and total and times and step < total:
        eta = (total - step) * statistics.fmean(times)
    losses_file = run / "losses.jsonl"
    worker, stopped = None if complete else train_worker(run), None
    if not complete and worker is None:
        stopped = "no process is working on it"
    elif worker is not None and worker.get("gone"):
        stopped = str(worker["gone"])
    losses = {k: v for k, v in last.items() if k not in ("step", "epoch", "lr")
              and not k.endswith("_s") and isinstance(v, int | float)}
    return {
        "kind": "train", "run_dir": str(run), "profile": cfg.profile,
        "variant": cfg.model.variant, "epoch": epochs_done, "epochs": cfg.train.epochs,
        "step": step, "steps_total": total, "max_steps": max_steps,
        "steps_per_epoch": per_epoch, "last_losses": losses,
        "last_epoch_means": ({k: v for k, v in epochs_rows[-1].items() if k != "epoch"}
                             if epochs_rows else {}),
        "last_step_age_s": (now - losses_file.stat().st_mtime) if losses_file.is_file()
        else None,
        "latest": latest_info,
        "min_checkpoints": sorted(p.name for p in (run / "checkpoints").glob("min-*.pt")),
        "requeues": requeue_count(run), "done": complete,
        "finished_by": "DONE" if done_file else ("max_steps" if reached_max else None),
        "eta_s": None if stopped else eta, "now": now,
        "worker": worker, "stopped_because": stopped,
        "state": "complete" if complete else ("stopped" if stopped else "in progress"),
        "exit_code": EXIT_COMPLETE if complete else (EXIT_FAILED if stopped
                                                     else EXIT_IN_PROGRESS),
    }


def train_worker(run: Path, live: LiveJobs | None = None) -> dict[str, Any] | None:
    """[status] The process the trainer recorded in ``running.json`` (None: no marker, no
    process works on the run), with ``gone``: why it provably no longer runs."""
    try:
        marker = json.loads((run / "running.json").read_text())
    except (OSError, ValueError):
        return None
    jobs = (live or squeue_jobs)() if (marker.get("slurm") or {}).get("job_id") else None
    # a requeued job waiting to restart is still the run's worker: no start times here
    gone = worker_gone(marker, None if jobs is None else set(jobs), socket.gethostname())
    return {**marker, "gone": gone}


def _steps_per_epoch(path: Path, tail: list[dict[str, Any]]) -> int | None:
    """Optimizer steps per epoch (constant in a run): the last step of epoch ``e`` is
    ``(e + 1) × k``; found where the epoch number changes in the loss log."""
    for a, b in itertools.pairwise(tail):
        if int(b.get("epoch", 0)) == int(a.get("epoch", 0)) + 1:
            return int(a["step"]) // (int(a.get("epoch", 0)) + 1)
    if not path.is_file():
        return None
    with open(path) as fh:  # no boundary in the tail: epoch 1 begins at step k + 1
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and int(row.get("epoch", 0)) >= 1:
                return int(row["step"]) - 1
    return None


# --------------------------------------------------------------------------- text


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s} s"
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d} min"


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)) if t else "?"


def _si(value: float) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def _count(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_status(report: dict[str, Any]) -> str:
    if report["kind"] == "stain":
        return _format_stain(report)
    return _format_train(report)


def _format_stain(r: dict[str, Any]) -> str:
    shape = "×".join(map(str, r["shape"]))
    sha = r["generator_sha256"][:12] + "…" if r["generator_sha256"] else "none"
    lines = [f"{r['run_dir']}: staining run of {r['input']} ({shape}, chunk "
             f"{'×'.join(map(str, r['chunk']))}, generator {sha})"]
    for axis, a in r["axes"].items():
        extra = [f"{a[k]} {k}" for k in ("running", "stale", "failed") if a[k]]
        lines.append(f"  axis {axis}: {bar(a['done'], a['total'])} {a['done']}/{a['total']} "
                     f"units done" + (f" ({', '.join(extra)})" if extra else ""))
    if r["fused"]:
        for f in r["fused"]:
            lines.append(f"  {f['image']}: {bar(f['done'], f['total'])} {f['done']}/"
                         f"{f['total']} chunks fused"
                         + (" (pyramid not built yet: run fuse again)"
                            if f["pyramid_pending"] else ""))
    else:
        lines.append("  fused: not started (hpcstain fuse RUN_DIR)")
    rate = r["throughput"]
    if rate is not None:
        line = (f"  throughput: {_si(rate['voxels_per_s'])}voxel·axes/s, "
                f"{_count(rate['units_per_hour'])} units/h (last {rate['units']} units); last "
                f"completion {_duration(r['now'] - rate['last_completion'])} ago")
        lines.append(line)
    if r["eta_s"] is not None:
        lines.append(f"  ETA staining: {_duration(r['eta_s'])} (about "
                     f"{_clock(r['now'] + r['eta_s'])})")
    elif r["units"]["done"] < r["units"]["total"] and r["idle"]:
        lines.append("  no worker active: re-run `hpcstain stain` or resubmit the array to "
                     "finish the remaining units")
    for e in r["running"]:
        age = _duration(r["now"] - e["since"]) if e.get("since") else "?"
        flag = " — overdue (cannot check this host; is it still alive?)" \
            if e.get("overdue") else ""
        lines.append(f"  running: {e['task']}/{e['unit']} on {e['worker']} for {age}{flag}")
    for e in r["stale"]:
        lines.append(f"  stale: {e['task']}/{e['unit']}: {e['why']} (started "
                     f"{_clock(e.get('since'))}); re-run stain or resubmit to redo it")
    for e in r["failed"]:
        lines.append(f"  failed: {e['task']}/{e['unit']}: {e['error']} ({e['worker']}, "
                     f"{_clock(e.get('time'))})")
    lines.append(f"  state: {r['state']}")
    return "\n".join(lines)


def _format_train(r: dict[str, Any]) -> str:
    lines = [f"{r['run_dir']}: training run ({r['variant']}, profile "
             f"{r['profile'] or '?'})"]
    total = r["steps_total"]
    prog = f"{bar(r['step'], total)} step {r['step']}/{total}" if total else \
        f"step {r['step']}"
    lines.append(f"  epoch {r['epoch']}/{r['epochs']} done, {prog}"
                 + (f" ({r['steps_per_epoch']} steps/epoch)" if r["steps_per_epoch"] else ""))
    if r["last_losses"]:
        losses = r["last_losses"]
        keys = [k for k in SHOWN_LOSSES if k in losses] + sorted(set(losses) - set(SHOWN_LOSSES))
        shown = ", ".join(f"{k} {losses[k]:.4g}" for k in keys[:6])
        lines.append(f"  last losses: {shown}")
    if r["last_step_age_s"] is not None:
        lines.append(f"  last step logged {_duration(r['last_step_age_s'])} ago")
    lt = r["latest"]
    if lt is not None:
        what = f"step {lt.get('step')}, epoch {lt.get('epoch')}, reason {lt.get('reason')!r}" \
            if lt.get("step") is not None else "unreadable right now"
        lines.append(f"  latest.pt: {_duration(lt['age_s'])} old ({what})")
    else:
        lines.append("  latest.pt: none yet")
    if r["min_checkpoints"]:
        lines.append(f"  minima: {len(r['min_checkpoints'])} min-*.pt")
    lines.append(f"  requeues: {r['requeues']}")
    if r["eta_s"] is not None:
        lines.append(f"  ETA: {_duration(r['eta_s'])} (about {_clock(r['now'] + r['eta_s'])})")
    done = {"DONE": "finished (DONE)", "max_steps": f"stopped at max_steps {r['max_steps']}"}
    state = done.get(r["finished_by"], r["state"])
    if r.get("stopped_because"):
        state = (f"stopped: {r['stopped_because']}; run the same train command again to "
                 "resume from latest.pt")
    elif r.get("worker"):
        state = f"in progress ({_worker_text(r['worker'])})"
    lines.append(f"  state: {state}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- watch


def watch(run_dir: str | os.PathLike[str], interval: float, as_json: bool = False,
          out: TextIO | None = None, require_fused: bool = False,
          max_rounds: int | None = None) -> int:
    """Print the status every ``interval`` s until the run is complete or failed."""
    out = out or sys.stdout
    tty = out.isatty()
    code, rounds = EXIT_IN_PROGRESS, 0
    try:
        while True:
            report = collect_status(run_dir, require_fused=require_fused)
            code = report["exit_code"]
            text = json.dumps(report) if as_json else format_status(report)
            if tty and not as_json:
                out.write("\x1b[H\x1b[J")  # clear the screen, redraw
            out.write(text + "\n")
            out.flush()
            rounds += 1
            if code != EXIT_IN_PROGRESS or (max_rounds and rounds >= max_rounds):
                return code
            time.sleep(interval)
    except KeyboardInterrupt:
        return code
