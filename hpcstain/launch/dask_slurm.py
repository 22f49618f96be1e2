"""A dask-jobqueue ``SLURMCluster`` from a cluster profile, for `hpcstain stain --executor dask`.

Each dask worker is one SLURM job of the profile's shape (one process, ``cpus_per_task``
threads, the profile's partition/account/QoS/constraint/GPUs and setup lines). The volume
engine's dask executor treats it like any other cluster; chunks with completion records
are skipped, so workers lost to preemption only cost the chunks they were working on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hpcstain.errors import UsageError
from hpcstain.launch.profiles import ClusterConfig, additional_parameters


def walltime(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def sbatch_extras(cluster: ClusterConfig) -> list[str]:
    """Directives the SLURMCluster keywords do not cover."""
    extra = [f"--{k}={v}" for k, v in additional_parameters(cluster).items()]
    if cluster.constraint:
        extra.append(f"--constraint={cluster.constraint}")
    if cluster.qos:
        extra.append(f"--qos={cluster.qos}")
    if cluster.gpus_per_node:
        extra.append(f"--gpus-per-node={cluster.gpus_per_node}")
    if cluster.exclusive:
        extra.append("--exclusive")
    return extra


def slurm_cluster(cluster: ClusterConfig, jobs: int, log_dir: Path) -> Any:
    """Start a SLURMCluster of ``jobs`` worker jobs (needs the ``jobqueue`` extra)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UsageError("--dask-slurm needs dask-jobqueue (pip install 'hpcstain[jobqueue]')"
                         ) from None
    if cluster.executor != "slurm":
        raise UsageError(f"--dask-slurm needs a SLURM cluster profile, got executor "
                         f"{cluster.executor!r}")
    log_dir.mkdir(parents=True, exist_ok=True)
    dask_cluster = SLURMCluster(
        queue=cluster.partition or None, account=cluster.account or None,
        cores=cluster.cpus_per_task, processes=1, memory=f"{cluster.mem_gb or 4}GB",
        walltime=walltime(cluster.time_min), job_extra_directives=sbatch_extras(cluster),
        job_script_prologue=list(cluster.setup), log_directory=str(log_dir),
        python=sys.executable, scheduler_options={"dashboard_address": None})
    dask_cluster.scale(jobs=jobs)
    return dask_cluster
