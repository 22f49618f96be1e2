"""`hpcstain submit`: submitit jobs from cluster profiles; the jobs call plain functions.

Training is one job of ``nodes × tasks_per_node`` DDP ranks. When SLURM warns of a time
limit or preemption (submitit's USR2, or SIGTERM/SIGUSR1), every rank finishes its step,
rank 0 writes ``latest.pt``, and the job hands the signal back to submitit, which
requeues it through :meth:`TrainJob.checkpoint`; the requeued job resumes from
``latest.pt`` (the same run directory), so nothing is lost.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hpcstain.config import Config, from_dict, load_config, to_dict
from hpcstain.data.folds import make_folds
from hpcstain.data.manifest import read_manifest
from hpcstain.device import announce, resolve_device
from hpcstain.errors import UsageError
from hpcstain.launch.profiles import ClusterConfig, additional_parameters, slurm_parameters
from hpcstain.train.runs import absolute_inputs


def make_executor(cluster: ClusterConfig, folder: Path, job_name: str) -> Any:
    """A submitit executor for this cluster profile (SLURM or local processes)."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    if cluster.executor == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=cluster.time_min,
                             tasks_per_node=cluster.tasks_per_node,
                             nodes=1, gpus_per_node=cluster.gpus_per_node)
        return ex
    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=cluster.max_requeues,
                                python=sys.executable)
    params = slurm_parameters(cluster)
    ex.update_parameters(**_slurm_executor_keys(params), job_name=job_name)
    return ex


def _slurm_executor_keys(params: dict[str, Any]) -> dict[str, Any]:
    """Translate AutoExecutor-style keys into SlurmExecutor keyword names."""
    names = {"tasks_per_node": "ntasks_per_node", "timeout_min": "time",
             "slurm_signal_delay_s": "signal_delay_s", "mem_gb": "mem",
             "slurm_array_parallelism": "array_parallelism"}
    out: dict[str, Any] = {}
    for key, value in params.items():
        key = names.get(key, key)
        if key == "mem":
            value = f"{value}GB"
        out[key.removeprefix("slurm_")] = value
    return out


@dataclass
class TrainJob:
    """The callable a training job runs on every task (pickled by submitit)."""

    config: dict[str, Any]
    run_dir: str
    ddp_timeout_s: int = 0     # 0: HPCSTAIN_DDP_TIMEOUT_S or the 30-min default
    max_requeues: int = 3      # requeues after a lost peer (SLURM_RESTART_COUNT below this)

    def __call__(self) -> dict[str, Any]:
        # lazy: torch, on the compute node only (`submit` on a login node stays light)
        from hpcstain.train.distributed import TIMEOUT_ENV
        from hpcstain.train.trainer import StopFlag, train

        _export_torch_env()
        if self.ddp_timeout_s > 0:
            os.environ[TIMEOUT_ENV] = str(self.ddp_timeout_s)
        if int(os.environ.get("SLURM_PROCID", "0") or 0) == 0:
            record_slurm_requeues(self.run_dir)
        cfg: Config = from_dict(self.config)
        usr = signal.SIGUSR2
        stop = StopFlag((signal.SIGUSR1, usr, signal.SIGTERM))
        try:
            result = train(cfg, self.run_dir, stop=stop, progress=False)
        except Exception as exc:
            if lost_peer(exc):
                requeue_after_lost_peer(self.run_dir, exc, self.max_requeues)
            raise
        if result.status == "preempted":
            # latest.pt is durable; let submitit's handler requeue us via checkpoint().
            if int(os.environ.get("SLURM_PROCID", "0")) == 0:
                os.kill(os.getpid(), usr)
            return {"status": "preempted", "step": result.step}
        return {"status": result.status, "epoch": result.epoch, "step": result.step,
                "checkpoint": str(result.checkpoint)}

    def checkpoint(self) -> Any:
        import submitit

        record_requeue(self.run_dir)
        return submitit.helpers.DelayedSubmission(replace(self))


def record_requeue(run_dir: str | os.PathLike[str], reason: str = "signal") -> None:
    """Append one line to ``RUN_DIR/requeues.jsonl`` (what ``hpcstain status`` counts).

    submitit calls ``checkpoint()`` on rank 0 only, right before it requeues the job
    (reason "signal"); a rank that lost a peer records "lost peer" before its own
    ``scontrol requeue``; a requeue SLURM made itself (node failure) is recorded when the
    job starts again (:func:`record_slurm_requeues`).
    """
    import json
    import socket
    import time

    # lazy: hpcstain.volume loads torch (`submit` on a login node stays light)
    from hpcstain.volume.rundir import worker_identity

    row = {"time": time.time(), "host": socket.gethostname(), "reason": reason,
           "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
           **{k: v for k, v in worker_identity().items() if k == "slurm"}}
    try:
        with open(Path(run_dir) / "requeues.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
    except OSError:  # never stand in the way of the requeue itself
        pass


def record_slurm_requeues(run_dir: str | os.PathLike[str]) -> int:
    """On start, record requeues SLURM did that no one recorded (returns how many).

    SLURM requeues a job whose node failed (``JobRequeue``) without any signal to the job;
    the next start sees ``SLURM_RESTART_COUNT`` above the rows of this job in
    ``requeues.jsonl`` and adds one row per missing requeue (reason "node failure").
    """
    import json

    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    job = os.environ.get("SLURM_JOB_ID", "")
    if not restarts or not job:
        return 0
    seen = 0
    try:
        for line in (Path(run_dir) / "requeues.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if str((row.get("slurm") or {}).get("job_id", "")) == job:
                seen += 1
    except OSError:
        pass
    for _ in range(restarts - seen):
        record_requeue(run_dir, reason="node failure")
    return max(restarts - seen, 0)


_PEER_LOST = ("gloo", "nccl", "timed out", "connection closed by peer",
              "connection reset by peer", "processgroup", "watchdog")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a failed DDP collective or rendezvous."""
    import torch.distributed as dist

    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, getattr(dist, "DistError", ())):
            return True
        if isinstance(err, RuntimeError) and any(k in str(err).lower() for k in _PEER_LOST):
            return True
        err = err.__cause__ or err.__context__
    return False


def requeue_after_lost_peer(run_dir: str | os.PathLike[str], exc: BaseException,
                            max_requeues: int) -> None:
    """A DDP collective failed (a rank's node died or hangs): requeue the job, then exit.

    The job then resumes from ``latest.pt`` like after a time limit. Only under a SLURM
    batch job and while ``SLURM_RESTART_COUNT < max_requeues``; otherwise returns and the
    error stands (the job fails). Exits the process without a submitit result, so
    ``job.result()`` waits for the requeued run.
    """
    import subprocess

    job = os.environ.get("SLURM_JOB_ID", "")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    rank = os.environ.get("SLURM_PROCID", "?")
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if not job or restarts >= max_requeues:
        print(f"hpcstain: rank {rank}: lost a DDP peer ({first}); not requeued "
              f"(restart {restarts} of at most {max_requeues})", file=sys.stderr, flush=True)
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"hpcstain: rank {rank}: scontrol requeue {job} failed: {err}", file=sys.stderr,
              flush=True)
        return
    if done.returncode == 0:
        record_requeue(run_dir, reason="lost peer")
        print(f"hpcstain: rank {rank}: lost a DDP peer ({first}); requeued job {job}, it "
              "resumes from latest.pt", file=sys.stderr, flush=True)
    elif _restart_count(job) > restarts:  # requeued already: by SLURM, or by another rank
        print(f"hpcstain: rank {rank}: lost a DDP peer ({first}); job {job} was requeued "
              "already", file=sys.stderr, flush=True)
    else:
        print(f"hpcstain: rank {rank}: lost a DDP peer ({first}); scontrol requeue {job} "
              f"failed: {done.stderr.strip() or done.returncode}", file=sys.stderr, flush=True)
        return
    os._exit(75)  # no result file: submitit's job.result() waits for the requeued run


def _restart_count(job: str) -> int:
    """SLURM's restart count of ``job`` now (``scontrol show job``), -1 if unknown."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return -1
    for field in out.split():
        key, _, value = field.partition("=")
        if key == "Restarts" and value.isdigit():
            return int(value)
    return -1


@dataclass
class CVTask:
    """Array task ``i`` of a cross-validation: one (variant, fold) training run each."""

    runs: list[tuple[dict[str, Any], str]]  # (config, run_dir) per array index

    def __call__(self, index: int) -> dict[str, Any]:
        config, run_dir = self.runs[index]
        return {"run_dir": run_dir, **TrainJob(config, run_dir)()}

    def checkpoint(self, index: int) -> Any:
        import submitit

        record_requeue(self.runs[index][1])
        return submitit.helpers.DelayedSubmission(self, index)


def cv_runs(variants: list[str], n_folds: int, out: Path, overrides: list[str]
            ) -> list[tuple[Config, Path]]:
    """The paper's k-fold CV × model variants: one resolved config and run dir per fold."""
    if n_folds < 2:
        raise UsageError(f"cross-validation needs at least 2 folds, got {n_folds}")
    runs = []
    for variant in variants:
        for fold in range(n_folds):
            cfg = load_config(variant, [*overrides, f"data.n_folds={n_folds}",
                                        f"data.fold={fold}"])
            runs.append((absolute_inputs(cfg), out / variant / f"fold-{fold}"))
    first = runs[0][0].data  # fail here, on the login node, if the folds cannot be made
    make_folds(read_manifest(first.manifest), n_folds=n_folds, n_test=first.n_test,
               seed=first.seed)
    return runs


def submit_cv(runs: list[tuple[Config, Path]], cluster: ClusterConfig, name: str) -> list[Any]:
    """All CV runs as one job array (each task one DDP job of the profile's shape)."""
    for _, run_dir in runs:
        run_dir.mkdir(parents=True, exist_ok=True)
    folder = runs[0][1].parent.parent / cluster.log_folder
    ex = make_executor(cluster, folder.resolve(), job_name=f"hpcstain-cv-{name}")
    _requeue_on_node_failure(ex, cluster)
    task = CVTask([(to_dict(cfg), str(run_dir.resolve())) for cfg, run_dir in runs])
    return list(ex.map_array(task, list(range(len(runs)))))


def _export_torch_env() -> None:
    """Under SLURM with several tasks: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from SLURM's
    variables (:func:`~hpcstain.train.distributed.env_ranks`: the master is the first
    node of ``SLURM_JOB_NODELIST``, its ``NodeAddr`` where the name does not resolve)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1 or "RANK" in os.environ:
        return
    # lazy: torch, on the compute node only
    from hpcstain.train.distributed import env_ranks

    rank, world, local_rank, extra = env_ranks()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_RANK": str(local_rank), **extra})


def _requeue_on_node_failure(ex: Any, cluster: ClusterConfig) -> None:
    """``sbatch --requeue``: SLURM requeues the job when one of its nodes fails, also on
    sites whose ``JobRequeue`` default is 0 (training resumes from ``latest.pt``; stain
    tasks skip finished units)."""
    if cluster.executor == "slurm":
        ex.update_parameters(additional_parameters={**additional_parameters(cluster),
                                                    "requeue": True})


def submit_train(cfg: Config, run_dir: Path, cluster: ClusterConfig) -> Any:
    """Submit one (multi-task) training job; returns the submitit Job."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = run_dir / cluster.log_folder
    ex = make_executor(cluster, folder, job_name=f"hpcstain-train-{run_dir.name}")
    _requeue_on_node_failure(ex, cluster)
    return ex.submit(TrainJob(to_dict(cfg), str(run_dir), cluster.ddp_timeout_s,
                              cluster.max_requeues))


def describe(job: Any) -> str:
    """How to follow a submitted job: id, logs, commands."""
    paths = job.paths
    lines = [f"submitted job {job.job_id}",
             f"  stdout: {paths.stdout}", f"  stderr: {paths.stderr}"]
    if type(job).__name__ == "LocalJob":  # its id is a process id, not a SLURM job
        lines.append("  (local process; follow the log files above)")
    else:
        lines.append(f"  follow: squeue -j {job.job_id}; tail -f {paths.stdout}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- volume jobs


@dataclass
class StainJob:
    """Array task ``i`` of ``n_tasks``: stain unit group i (pending slabs only).

    Requeueing is always safe: finished units have completion records and are skipped.
    """

    run_dir: str
    n_tasks: int
    device: str = "auto"
    batch_size: int = 0

    def __call__(self, task_id: int) -> str:
        """[device] A job of several tasks (a GPU profile: one task per GPU) splits its
        group once more, task k on GPU k of the node; ``auto`` resolves here, on the node."""
        # lazy: torch, on the compute node only
        from hpcstain.executors.array import run_array_task

        ntasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
        proc = int(os.environ.get("SLURM_PROCID", "0") or 0) if ntasks > 1 else 0
        local = int(os.environ.get("SLURM_LOCALID", "0") or 0) if ntasks > 1 else 0
        device = resolve_device(self.device, local_rank=local)
        announce(device)
        report = run_array_task(self.run_dir, task_id * ntasks + proc, self.n_tasks * ntasks,
                                device=device, batch_size=self.batch_size)
        return report.summary()

    def checkpoint(self, task_id: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, task_id)


@dataclass
class FuseJob:
    """Fuse every chunk complete on all axes (a CPU job after the stain array: the stain →
    fuse graph on SLURM, the fuse job depending on the array with ``afterok``)."""

    run_dir: str
    method: str | None = None  # None: the plan's (the checkpoint's data.fuse_method)
    single_axis: str | None = None

    def __call__(self) -> str:
        """The chunk groups on the job's CPUs (``SLURM_CPUS_PER_TASK`` local processes; the
        image does not depend on how many)."""
        # lazy: torch, on the compute node only
        from hpcstain.executors import run_fuse

        workers = int(os.environ.get("SLURM_CPUS_PER_TASK", "1") or 1)
        return run_fuse(self.run_dir, "local", workers=workers, method=self.method,
                        single_axis=self.single_axis).summary()

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def submit_stain(run_dir: Path, cluster: ClusterConfig, n_tasks: int, device: str = "auto",
                 batch_size: int = 0) -> list[Any]:
    """Submit the stain array (one job per task, one SLURM array); returns its jobs.

    [device] A profile with GPUs (``gpus_per_node`` > 0) runs each array job as one task
    per GPU; a CPU profile as one task per job (its ``cpus_per_task`` threads).
    """
    run_dir = run_dir.resolve()
    ex = make_executor(stain_cluster(cluster), run_dir / cluster.log_folder,
                       job_name=f"hpcstain-stain-{run_dir.name}")
    _requeue_on_node_failure(ex, cluster)
    task = StainJob(str(run_dir), n_tasks, device, batch_size)
    return list(ex.map_array(task, list(range(n_tasks))))


def stain_cluster(cluster: ClusterConfig) -> ClusterConfig:
    """The stain array's shape: one task per GPU on GPU profiles, else one task per job."""
    tasks = cluster.gpus_per_node if cluster.gpus_per_node > 0 else 1
    return ClusterConfig(**{**cluster.__dict__, "tasks_per_node": tasks})


def submit_fuse(run_dir: Path, cluster: ClusterConfig, after: list[Any] | None = None,
                method: str | None = None, single_axis: str | None = None) -> Any:
    """Submit the fuse job; on SLURM it starts only after ``after`` succeeded (afterok)."""
    run_dir = run_dir.resolve()
    cpu = ClusterConfig(**{**cluster.__dict__, "gpus_per_node": 0, "tasks_per_node": 1,
                           "nodes": 1, "exclusive": False})
    ex = make_executor(cpu, run_dir / cluster.log_folder,
                       job_name=f"hpcstain-fuse-{run_dir.name}")
    if after:
        if cluster.executor == "slurm":
            array_ids = sorted({str(j.job_id).split("_")[0] for j in after})
            ex.update_parameters(dependency="afterok:" + ":".join(array_ids))
        else:  # local processes have no scheduler dependencies: wait here
            for job in after:
                job.result()
    return ex.submit(FuseJob(str(run_dir), method, single_axis))
