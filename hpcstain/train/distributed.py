"""DDP set-up from the environment (torchrun, srun/submitit, or a single process).

Rank, world size and the rendezvous address are read from the variables torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, under ``srun``, from SLURM's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST).
NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def env_ranks(env: dict[str, str] | None = None) -> tuple[int, int, int, dict[str, str]]:
    """(rank, world, local_rank, extra env to export) from torchrun or SLURM variables."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), {}
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if ntasks > 1 and "SLURM_PROCID" in env:
        extra = {
            "MASTER_ADDR": env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            "MASTER_PORT": env.get("MASTER_PORT")
            or str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000),
        }
        return (int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)), extra)
    return 0, 1, 0, {}


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``train.device``: auto → this rank's GPU when CUDA is present, else the CPU; a
    requested device that is absent is one UsageError (before the run writes anything)."""
    from hpcstain.device import resolve_device

    return torch.device(resolve_device(requested, local_rank))


def setup(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Join the process group when the environment says there is more than one rank."""
    rank, world, local_rank, extra = env_ranks()
    os.environ.update(extra)
    dev = pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local_rank, dev, backend)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world_size
    return values


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when it is true on any rank (used for the preemption stop)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
