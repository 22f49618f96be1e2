"""Checkpoint → generator: the one inference path of predict, evaluate, stain and distill.

A checkpoint holds the whole GAN; inference needs one generator (CT→histology, or with
``reverse`` histology→CT) and the conventions training used on its inputs
(:class:`hpcstain.ct.conventions.Conventions`).

:func:`load_generator` builds only the generator that is asked for (no discriminators, no
pools, no reverse generator). :func:`pin_generator` writes that generator and its
conventions as a small, ordinary checkpoint file (a volume run keeps one in its run
directory); :func:`load_pinned` refuses a file whose hash differs from the recorded one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcstain.checkpoint import file_sha256, read_checkpoint, save_checkpoint
from hpcstain.ct.conventions import CONVENTION_KEYS, Conventions, conventions_of
from hpcstain.ct.levels import TargetLevels
from hpcstain.device import resolve_device
from hpcstain.errors import InputError, UsageError
from hpcstain.models.fastpath import memory_format_of, prepare_for_inference
from hpcstain.models.gans import model_config_of
from hpcstain.models.networks import build_generator

TileFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Stainer:
    """One direction of a checkpoint's generator as a tile function, plus its conventions."""

    fn: TileFn
    conventions: Conventions
    reverse: bool = False
    source: str = ""
    architecture: dict[str, Any] | None = None

    @property
    def in_channels(self) -> int:
        c = self.conventions
        return c.histology_channels if self.reverse else c.generator_channels

    @property
    def context_slices(self) -> int:
        """CT planes the generator sees per stained slice (1 unless a 2.5D model)."""
        return 1 if self.reverse else self.conventions.context_slices

    @property
    def out_channels(self) -> int:
        c = self.conventions
        return c.ct_channels if self.reverse else c.histology_channels

    @property
    def levels(self) -> TargetLevels:
        """The training CT levels (bone, background) on the 16-bit scale."""
        return self.conventions.target_levels

    @property
    def stretch_c(self) -> tuple[float, float]:
        return self.conventions.stretch_c


def checkpoint_conventions(checkpoint: str | os.PathLike[str]) -> Conventions:
    """The conventions of a checkpoint file (read once per file version: a plan, the cupping
    check and distillation all ask; see :func:`hpcstain.checkpoint.read_checkpoint`)."""
    return conventions_of(read_checkpoint(checkpoint).data, str(checkpoint))


def generator_net(ckpt: dict[str, Any], name: str, source: str, device: str) -> nn.Module:
    """Build and load the generator ``name`` (``ct2hist`` / ``hist2ct``) of a checkpoint."""
    arch = ckpt["architecture"]
    cfg = model_config_of(arch, source)
    c_ct, c_hist = int(arch["ct_channels"]), int(arch["histology_channels"])
    k = int(arch.get("context_slices", 1))
    net = build_generator(cfg, c_hist, c_ct) if name == "hist2ct" else \
        build_generator(cfg, k if k > 1 else c_ct, c_hist)
    saved = ckpt.get("model", {}).get("generators", {})
    if name not in saved:
        raise InputError(f"{source}: no generator {name!r} in the checkpoint "
                         f"(has {sorted(saved)})")
    try:
        net.load_state_dict(saved[name])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"{source}: generator {name!r} does not fit its architecture "
                         f"({first})") from None
    return net.to(device).eval()


def load_generator(checkpoint: str | os.PathLike[str], device: str = "cpu",
                   reverse: bool = False, autocast: str = "none",
                   memory_format: str = "contiguous") -> Stainer:
    """CT→histology (or, with ``reverse``, histology→CT) generator of a checkpoint.

    ``autocast`` (``none``, ``bf16``, ``fp16``) runs the generator under torch autocast on
    the device (outputs are returned as float32 on the CPU either way). ``memory_format``
    (``contiguous``, ``channels_last``) is the layout its weights and input batches are
    kept in (:mod:`hpcstain.models.fastpath`; outputs come back contiguous either way).
    """
    device = resolve_device(device)  # "auto" (a worker on a GPU node) → cuda, else cpu
    ckpt = read_checkpoint(checkpoint).data
    arch = ckpt.get("architecture")
    if not isinstance(arch, dict):
        raise InputError(f"{checkpoint}: checkpoint has no architecture record")
    if reverse and arch.get("variant") == "pix2pix":
        raise UsageError(f"{checkpoint}: a pix2pix checkpoint has no histology→CT generator; "
                         "--reverse needs a CycleGAN (modcyclegan/cyclegan) checkpoint")
    conv = conventions_of(ckpt, str(checkpoint))
    net = generator_net(ckpt, "hist2ct" if reverse else "ct2hist", str(checkpoint), device)
    net = prepare_for_inference(net, memory_format)
    return Stainer(fn=_tile_fn(net, conv, reverse, device, autocast, memory_format),
                   conventions=conv,
                   reverse=reverse, source=str(checkpoint), architecture=dict(arch))


def _tile_fn(net: nn.Module, conv: Conventions, reverse: bool, device: str,
             autocast: str, memory_format: str = "contiguous") -> TileFn:
    sign = -1.0 if conv.invert_ct else 1.0
    dev = torch.device(device)
    dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if autocast not in dtypes:
        raise UsageError(f"autocast must be one of {', '.join(dtypes)}, got {autocast!r}")
    amp = dtypes[autocast]
    fmt = memory_format_of(memory_format)

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            if fmt is torch.contiguous_format:
                return net(batch.to(dev)).float()
            return net(batch.to(dev).contiguous(memory_format=fmt)).float().contiguous()

    if reverse:
        return lambda batch: (sign * run(batch)).cpu()
    return lambda batch: run(sign * batch).cpu()


# --------------------------------------------------------------------------- pinning


def pin_generator(checkpoint: str | os.PathLike[str], dest: str | os.PathLike[str]) -> str:
    """Write the CT→histology generator + conventions of ``checkpoint`` to ``dest``.

    The file is an ordinary (slim) checkpoint: ``predict`` and ``stain`` read it like any
    other. Returns its sha256, which the caller records (a volume run's plan does).
    """
    ckpt = read_checkpoint(checkpoint).data
    generator_net(ckpt, "ct2hist", str(checkpoint), "cpu")  # refuse a broken one now
    data = (ckpt.get("config") or {}).get("data", {})
    payload = {
        "architecture": ckpt["architecture"],
        "config": {"data": {k: data[k] for k in CONVENTION_KEYS if k in data},
                   "model": (ckpt.get("config") or {}).get("model", {})},
        "model": {"generators": {"ct2hist": ckpt["model"]["generators"]["ct2hist"]}},
        "epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0),
        "reason": f"generator pinned from {checkpoint}",
        "pinned_from": str(checkpoint),
        **({"cupping_fits": ckpt["cupping_fits"]} if ckpt.get("cupping_fits") else {}),
        **({"palette": ckpt["palette"]} if ckpt.get("palette") else {}),
    }
    save_checkpoint(dest, payload)
    return file_sha256(dest)


def load_pinned(path: str | os.PathLike[str], sha256: str, device: str = "cpu",
                autocast: str = "none", memory_format: str = "contiguous") -> Stainer:
    """The generator pinned at ``path``, refused unless its hash is ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: the run's pinned generator is missing")
    actual = file_sha256(path)
    if sha256 and actual != sha256:
        raise InputError(f"{path}: pinned generator has sha256 {actual[:16]}…, the plan "
                         f"recorded {sha256[:16]}…; the run's weights changed — restain "
                         "into a new run directory")
    return load_generator(path, device, autocast=autocast, memory_format=memory_format)
