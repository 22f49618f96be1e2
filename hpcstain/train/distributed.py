"""DDP set-up from the environment (torchrun, srun/submitit, or a single process).

Rank, world size and the rendezvous address are read from the variables torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, under ``srun``, from SLURM's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST).
NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hpcstain.device import resolve_device


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


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as names: ``n[01-03,7]`` → n01 n02 n03 n7.

    Handles comma-separated items, several bracket groups per item (``r[1-2]n[1-2]``)
    and zero-padded ranges; what ``scontrol show hostnames`` prints, without SLURM.
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    names: list[str] = []
    for item in (it.strip() for it in items):
        if item:
            names.extend(_expand_item(item))
    return names


def _expand_item(item: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.find("]", open_at)
    if close_at < 0:
        raise ValueError(f"unbalanced bracket in host list item {item!r}")
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    values: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in host list item {item!r}")
        if not sep:
            values.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return [prefix + v + tail for v in values for tail in _expand_item(rest)]


def _first_slurm_host(nodelist: str) -> str:
    """The first node of ``SLURM_JOB_NODELIST``, as an address this process can resolve.

    The name comes from ``scontrol show hostnames`` (else :func:`expand_hostlist`). A name
    the resolver does not know (several slurmd on one host, sites without DNS for node
    names) is replaced by the node's ``NodeAddr`` from ``scontrol show node``; without
    that, rendezvous would hang on "gai error" until the DDP timeout.
    """
    first = ""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        first = out[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        pass
    if not first:
        try:
            names = expand_hostlist(nodelist)
        except ValueError:
            names = []
        first = names[0] if names else nodelist.split(",")[0].split("[")[0]
    if _resolves(first):
        return first
    return _node_addr(first) or first


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    return True


def _node_addr(node: str) -> str | None:
    """``NodeAddr`` of a SLURM node (``scontrol show node -o``), or None."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], check=True,
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for field in out.split():
        key, _, value = field.partition("=")
        if key == "NodeAddr" and value and value != "(null)":
            return value
    return None


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
    return torch.device(resolve_device(requested, local_rank))


DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "HPCSTAIN_DDP_TIMEOUT_S"


def ddp_timeout_s(env: dict[str, str] | None = None) -> int:
    """Collective/rendezvous timeout: ``HPCSTAIN_DDP_TIMEOUT_S`` if set, else 30 min.

    A rank whose peer is gone (a lost node) blocks in its next collective this long, then
    raises (``hpcstain submit train`` then requeues the job, see ``launch.submit``).
    """
    raw = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be > 0")
    return value


def setup(device: str = "auto", timeout_s: int | None = None) -> DistEnv:
    """Join the process group when the environment says there is more than one rank.

    ``timeout_s`` (default :func:`ddp_timeout_s`) bounds rendezvous and every collective.
    """
    if timeout_s is None:
        timeout_s = ddp_timeout_s()
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
