"""Environment report for `hpcstain info`: library versions, devices, SLURM/MPI context."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from typing import Any

LIBRARIES = ("torch", "numpy", "zarr", "h5py", "dask", "distributed", "submitit", "mpi4py",
             "scipy", "skimage")

SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS",
              "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION",
              "SLURM_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE")
MPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
            "PMIX_RANK")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def library_versions() -> dict[str, str]:
    """Installed version of each library, or 'not installed'; nothing is imported."""
    dist_names = {"skimage": "scikit-image"}
    out: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(dist_names.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def devices() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [],
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}",
                 "bf16": torch.cuda.is_bf16_supported()}
            )
    return info


def launch_context(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Which launcher this process runs under (SLURM, MPI, torchrun), from the environment."""
    env = dict(os.environ) if env is None else env
    ctx: dict[str, Any] = {
        "slurm": {k: env[k] for k in SLURM_VARS if k in env} or None,
        "mpi": {k: env[k] for k in MPI_VARS if k in env} or None,
        "torchrun": {k: env[k] for k in TORCHRUN_VARS if k in env} or None,
    }
    return ctx


def cpu_info() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "usable_cpus": affinity,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def collect() -> dict[str, Any]:
    from hpcstain import __version__

    return {
        "hpcstain": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "devices": devices(),
        "cpu": cpu_info(),
        "launch": launch_context(),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"hpcstain {report['hpcstain']}  (python {report['python']}, {report['platform']})",
             "libraries:"]
    lines += [f"  {k:12s} {v}" for k, v in report["libraries"].items()]
    dev = report["devices"]
    lines.append(f"cuda: {'yes' if dev['cuda_available'] else 'no'}"
                 + (f" (CUDA {dev['cuda_version']})" if dev["cuda_version"] else ""))
    for g in dev["gpus"]:
        lines.append(f"  gpu {g['index']}: {g['name']}, {g['memory_gib']} GiB, sm {g['capability']}"
                     f", bf16 {'yes' if g['bf16'] else 'no'}")
    cpu = report["cpu"]
    lines.append(f"cpu: {cpu['cpu_count']} cores, {cpu['usable_cpus']} usable, "
                 f"torch threads {dev['torch_threads']}, OMP_NUM_THREADS={cpu['omp_num_threads']}")
    launch = report["launch"]
    for name in ("slurm", "mpi", "torchrun"):
        val = launch[name]
        lines.append(f"{name}: " + (" ".join(f"{k}={v}" for k, v in val.items()) if val
                                    else "not detected"))
    return "\n".join(lines)
