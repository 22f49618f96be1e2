"""Which device a command computes on: ``auto`` (CUDA when present, else the CPU) or a
requested one, checked before anything is written; and the one line that says so."""

from __future__ import annotations

import os
import sys

from hpcstain.errors import UsageError

DEVICE_HELP = ("auto (default: the first CUDA GPU when one is present, else the CPU), cpu, "
               "cuda or cuda:N; a requested device that is absent is an error")


def resolve_device(requested: str | None = "auto", local_rank: int = 0) -> str:
    """``auto`` → ``cuda:<local_rank mod n>`` when CUDA is available, else ``cpu``.

    A requested device that this machine does not have (``cuda`` without a CUDA build or
    GPU, ``cuda:3`` on a 2-GPU node, ``mps`` off a Mac) is one :class:`UsageError`, raised
    before a command writes anything.
    """
    import torch

    name = (requested or "auto").strip().lower()
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return f"cuda:{local_rank % n_cuda}" if n_cuda else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not n_cuda:
            why = ("this torch has no CUDA build" if torch.version.cuda is None
                   else "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES="
                   f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
            raise UsageError(f"--device {requested}: {why}; use --device auto or cpu")
        index = local_rank % n_cuda
        if name.startswith("cuda:"):
            try:
                index = int(name.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {requested}: not a device (cuda:N)") from None
            if not 0 <= index < n_cuda:
                raise UsageError(f"--device {requested}: this machine has {n_cuda} CUDA "
                                 f"GPU(s), cuda:0 to cuda:{n_cuda - 1}")
        return f"cuda:{index}"
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {requested}: MPS is not available here; use "
                             "--device auto or cpu")
        return "mps"
    raise UsageError(f"--device {requested}: unknown device (auto, cpu, cuda, cuda:N)")


def describe_device(device: str, dtype: str = "float32") -> str:
    """``device: cuda:0 (NVIDIA H100 80GB HBM3), float32, 16 CPU threads`` — one line."""
    import torch

    name = device
    if device.startswith("cuda"):
        with_index = device if ":" in device else "cuda:0"
        try:
            name = f"{with_index} ({torch.cuda.get_device_name(with_index)})"
        except (RuntimeError, AssertionError):
            name = with_index
    return f"device: {name}, {dtype}, {torch.get_num_threads()} CPU threads"


def announce(device: str, dtype: str = "float32", stream: object = None) -> None:
    """Print :func:`describe_device` on stdout, with the other start lines (the plan, the
    voxel size): stderr stays for errors, so a refusal is still exactly one line there."""
    print(describe_device(device, dtype), file=stream or sys.stdout, flush=True)


def autocast_dtype(autocast: str) -> str:
    """The compute dtype a run's ``--autocast`` / ``train.amp`` means."""
    return "float32" if autocast in ("", "none") else f"float32 with {autocast} autocast"


def check_device_name(requested: str) -> str:
    """Refuse a --device that no machine has (a typo) without asking this one: for jobs
    that resolve ``auto``/``cuda`` on the node they run on (``submit stain``)."""
    name = (requested or "auto").strip().lower()
    head, _, index = name.partition(":")
    if name in ("auto", "cpu", "cuda", "mps") or (head == "cuda" and index.isdigit()):
        return name
    raise UsageError(f"--device {requested}: unknown device (auto, cpu, cuda, cuda:N)")
