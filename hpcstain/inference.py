"""Checkpoint → generator + CT conventions: the one inference path of predict, evaluate, stain.

A checkpoint holds the whole GAN; inference needs one generator (CT→histology, or with
``reverse`` histology→CT) and the conventions training used on its inputs:

* the §2.5 target levels (raw bone mean → ``ct_bone_level``, raw background mean →
  ``ct_background_level`` on the 16-bit scale), then ``v / 65535 * 2 - 1``;
* whether the CT is inverted before the generator (``data.invert_ct``);
* the number of CT and histology channels, the histology stretch margins;
* ``context_slices`` k: a 2.5D generator sees the k CT planes about the slice it stains
  (``model.context_slices``; checkpoints without the record read as 1);
* the generator's size multiple (tiles must be multiples of it: 4 for the ResNet,
  256 for the U-Net-256);
* the CT cupping correction (``data.cupping``) and, for ``radial``, the training set's
  fit per slide size (checkpoint key ``cupping_fits``, :func:`hpcstain.cupping.fits_record`),
  which ``predict``/``evaluate`` apply to slides of those sizes.

:func:`load_generator` builds only the generator that is asked for (no discriminators, no
pools, no reverse generator). :func:`pin_generator` writes that generator and its
conventions as a small, ordinary checkpoint file (a volume run keeps one in its run
directory); :func:`load_pinned` refuses a file whose hash differs from the recorded one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcstain.errors import InputError, UsageError

TileFn = Callable[[torch.Tensor], torch.Tensor]
CONVENTION_KEYS = ("ct_bone_level", "ct_background_level", "stretch_c", "stretch_c_prime",
                   "invert_ct", "cupping")
MIN_TILE = 16  # the ResNet's 7×7 reflection padding needs a few pixels after downsampling


@dataclass(frozen=True)
class Conventions:
    """How a checkpoint's generator wants its input (and what it returns)."""

    target_levels: tuple[float, float] = (30000.0, 10000.0)  # (bone, background), 16-bit
    invert_ct: bool = False
    ct_channels: int = 3
    histology_channels: int = 3
    stretch_c: tuple[float, float] = (0.0, 0.0)
    size_multiple: int = 4
    cupping: str = "none"  # CT preprocessing trained with: none | radial (hpcstain.cupping)
    # radial: the training set's fit per slide size ((ny, nx), Cupping), sorted by size
    cupping_fits: tuple[tuple[tuple[int, int], Any], ...] = ()
    context_slices: int = 1  # k CT planes about the slice as the generator's input (2.5D)

    @property
    def generator_channels(self) -> int:
        """Input channels of the CT→histology generator: k planes, or the slice repeated."""
        return self.context_slices if self.context_slices > 1 else self.ct_channels

    def to_dict(self) -> dict[str, Any]:
        from hpcstain.cupping import fits_record

        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["cupping_fits"] = fits_record(dict(self.cupping_fits))
        return out

    @property
    def stored_fits(self) -> dict[tuple[int, int], Any]:
        """Slide shape → the training set's :class:`~hpcstain.cupping.Cupping`."""
        return dict(self.cupping_fits)


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
    def levels(self) -> tuple[float, float]:
        """The training CT levels (bone, background) on the 16-bit scale."""
        return self.conventions.target_levels

    @property
    def stretch_c(self) -> tuple[float, float]:
        return self.conventions.stretch_c


def conventions_of(ckpt: dict[str, Any], source: str = "checkpoint") -> Conventions:
    """The input conventions recorded in a loaded checkpoint (config.data + architecture,
    and the stored cupping fits; a checkpoint from before they were stored has none)."""
    from hpcstain.config import DataConfig
    from hpcstain.cupping import fits_from_record

    config = ckpt.get("config", {}) if isinstance(ckpt.get("config"), dict) else {}
    data = config.get("data", {}) if isinstance(config.get("data"), dict) else {}
    d = DataConfig()
    get = {k: data.get(k, getattr(d, k)) for k in CONVENTION_KEYS}
    arch = ckpt["architecture"]
    return Conventions(
        target_levels=(float(get["ct_bone_level"]), float(get["ct_background_level"])),
        invert_ct=bool(get["invert_ct"]), ct_channels=int(arch["ct_channels"]),
        histology_channels=int(arch["histology_channels"]),
        stretch_c=(float(get["stretch_c"]), float(get["stretch_c_prime"])),
        size_multiple=256 if arch.get("generator") == "unet256" else 4,
        cupping=str(get["cupping"]),
        cupping_fits=tuple(sorted(fits_from_record(ckpt.get("cupping_fits"), source).items())),
        context_slices=int(arch.get("context_slices", 1)))


def checkpoint_conventions(checkpoint: str | os.PathLike[str]) -> Conventions:
    """The conventions of a checkpoint file, read once per file version (a plan, the cupping
    check and distillation all ask; a large ``latest.pt`` is not re-read and re-verified)."""
    path = Path(checkpoint)
    st = path.stat()
    return _conventions_of_file(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _conventions_of_file(path: str, mtime_ns: int, size: int) -> Conventions:
    from hpcstain.train.checkpoint import load_checkpoint

    return conventions_of(load_checkpoint(path), path)


def _generator_net(ckpt: dict[str, Any], name: str, source: str, device: str) -> nn.Module:
    """Build and load the generator ``name`` (``ct2hist`` / ``hist2ct``) of a checkpoint."""
    from hpcstain.models.gans import model_config_of
    from hpcstain.models.networks import build_generator

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
                   reverse: bool = False, autocast: str = "none") -> Stainer:
    """CT→histology (or, with ``reverse``, histology→CT) generator of a checkpoint.

    ``autocast`` (``none``, ``bf16``, ``fp16``) runs the generator under torch autocast on
    the device (outputs are returned as float32 on the CPU either way).
    """
    from hpcstain.device import resolve_device
    from hpcstain.train.checkpoint import load_checkpoint

    device = resolve_device(device)  # "auto" (a worker on a GPU node) → cuda, else cpu
    ckpt = load_checkpoint(checkpoint)
    arch = ckpt.get("architecture")
    if not isinstance(arch, dict):
        raise InputError(f"{checkpoint}: checkpoint has no architecture record")
    if reverse and arch.get("variant") == "pix2pix":
        raise UsageError(f"{checkpoint}: a pix2pix checkpoint has no histology→CT generator; "
                         "--reverse needs a CycleGAN (modcyclegan/cyclegan) checkpoint")
    conv = conventions_of(ckpt, str(checkpoint))
    net = _generator_net(ckpt, "hist2ct" if reverse else "ct2hist", str(checkpoint), device)
    return Stainer(fn=_tile_fn(net, conv, reverse, device, autocast), conventions=conv,
                   reverse=reverse, source=str(checkpoint), architecture=dict(arch))


def _tile_fn(net: nn.Module, conv: Conventions, reverse: bool, device: str,
             autocast: str) -> TileFn:
    sign = -1.0 if conv.invert_ct else 1.0
    dev = torch.device(device)
    dtypes = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if autocast not in dtypes:
        raise UsageError(f"autocast must be one of {', '.join(dtypes)}, got {autocast!r}")
    amp = dtypes[autocast]

    @torch.inference_mode()
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return net(batch.to(dev)).float()

    if reverse:
        return lambda batch: (sign * run(batch)).cpu()
    return lambda batch: run(sign * batch).cpu()


# --------------------------------------------------------------------------- pinning


def pin_generator(checkpoint: str | os.PathLike[str], dest: str | os.PathLike[str]) -> str:
    """Write the CT→histology generator + conventions of ``checkpoint`` to ``dest``.

    The file is an ordinary (slim) checkpoint: ``predict`` and ``stain`` read it like any
    other. Returns its sha256, which the caller records (a volume run's plan does).
    """
    from hpcstain.train.checkpoint import file_sha256, load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    _generator_net(ckpt, "ct2hist", str(checkpoint), "cpu")  # refuse a broken one now
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
    }
    save_checkpoint(dest, payload)
    return file_sha256(dest)


def load_pinned(path: str | os.PathLike[str], sha256: str, device: str = "cpu",
                autocast: str = "none") -> Stainer:
    """The generator pinned at ``path``, refused unless its hash is ``sha256``."""
    from hpcstain.train.checkpoint import file_sha256

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: the run's pinned generator is missing")
    actual = file_sha256(path)
    if sha256 and actual != sha256:
        raise InputError(f"{path}: pinned generator has sha256 {actual[:16]}…, the plan "
                         f"recorded {sha256[:16]}…; the run's weights changed — restain "
                         "into a new run directory")
    return load_generator(path, device, autocast=autocast)


# --------------------------------------------------------------------------- CT


def ct_to_unit(ct: np.ndarray, raw_levels: tuple[float, float],
               conventions: Conventions) -> np.ndarray:
    """Raw CT → the generator's [-1, 1] input (§2.5 with the checkpoint's target levels).

    Inversion (``invert_ct``) is applied by the stainer's tile function, not here.
    """
    from hpcstain.data.normalise import ct16_to_unit, normalise_ct

    bone, background = conventions.target_levels
    return ct16_to_unit(normalise_ct(np.asarray(ct), raw_levels[0], raw_levels[1], bone,
                                     background))
