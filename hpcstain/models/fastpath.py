"""Inference-only rewrites of a generator, and the memory format it runs in.

:func:`prepare_for_inference` turns a loaded generator into the one the tile engine calls:

* every ``Upsample(×2, nearest)`` directly followed by ``ReflectionPad2d(1)`` (the
  ``resize`` up-levels of the ResNet and U-Net generators) becomes one :class:`UpsamplePad`,
  which writes the upsampled, padded tensor in one copy and in the layout the following
  convolution reads. Only copies: the output is **bit-identical** to the two modules (torch
  upsamples a tensor it first makes contiguous, pads in a second pass, and the convolution
  then converts the layout a third time; for a small student these copies cost a third of
  its time, ``benchmarks/bench_small_model.py``). Parameter names do not change (the two
  modules have none).
* ``memory_format="channels_last"`` stores the weights in NHWC and the tile function feeds
  NHWC batches (oneDNN's native layout on CPUs, tensor cores' on GPUs). It changes the
  order of the convolutions' float sums, so outputs differ from ``contiguous`` in the last
  bits (~1e-5): a volume run records it in its plan (``Plan.memory_format``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hpcstain.errors import UsageError

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def memory_format_of(name: str) -> torch.memory_format:
    if name not in MEMORY_FORMATS:
        raise UsageError(f"memory format must be one of {', '.join(MEMORY_FORMATS)}, "
                         f"got {name!r}")
    return MEMORY_FORMATS[name]


class UpsamplePad(nn.Module):
    """``ReflectionPad2d(1)(Upsample(scale_factor=2, mode="nearest")(x))`` in one copy,
    written in ``memory_format`` (with autograd on, the two torch ops themselves: their
    backward sums in torch's order)."""

    def __init__(self, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__()
        self.memory_format = memory_format

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1),
                         mode="reflect")
        n, c, h, w = x.shape
        out = torch.empty((n, c, 2 * h + 2, 2 * w + 2), dtype=x.dtype, device=x.device,
                          memory_format=self.memory_format)
        # each input row twice along the width into the odd padded rows, then those rows
        # into the even ones (whole rows: long contiguous runs in either layout)
        odd = out[:, :, 1:2 * h + 1:2, 1:2 * w + 1]
        odd.unflatten(3, (w, 2)).copy_(x[:, :, :, :, None].expand(n, c, h, w, 2))
        out[:, :, 2:2 * h + 2:2, 1:2 * w + 1] = odd
        # reflection (the edge not repeated): padded row 0 is upsampled row 1, the last
        # padded row is upsampled row 2h-2; rows first, then columns (the corners)
        out[:, :, 0] = out[:, :, 2]
        out[:, :, 2 * h + 1] = out[:, :, 2 * h - 1]
        out[:, :, :, 0] = out[:, :, :, 2]
        out[:, :, :, 2 * w + 1] = out[:, :, :, 2 * w - 1]
        return out


def _is_upsample2(m: nn.Module) -> bool:
    return isinstance(m, nn.Upsample) and m.mode == "nearest" and m.size is None and \
        m.scale_factor in (2, 2.0, (2.0, 2.0), (2, 2))


def _is_reflect1(m: nn.Module) -> bool:
    return isinstance(m, nn.ReflectionPad2d) and tuple(m.padding) == (1, 1, 1, 1)


def fuse_upsample_pad(net: nn.Module, memory_format: torch.memory_format
                      = torch.contiguous_format) -> int:
    """Replace each Upsample(×2 nearest) → ReflectionPad2d(1) pair inside a Sequential by
    :class:`UpsamplePad` (and an Identity, so the indices of later modules, and so the
    parameter names, stay). Returns the number of pairs fused."""
    fused = 0
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if _is_upsample2(seq[i]) and _is_reflect1(seq[i + 1]):
                seq[i], seq[i + 1] = UpsamplePad(memory_format), nn.Identity()
                fused += 1
    return fused


def prepare_for_inference(net: nn.Module, memory_format: str = "contiguous") -> nn.Module:
    """The eval-mode generator the tile engine runs: up-levels fused (bit-identical), the
    weights in ``memory_format``."""
    fmt = memory_format_of(memory_format)
    fuse_upsample_pad(net, fmt)
    if fmt is torch.channels_last:
        net = net.to(memory_format=fmt)
    return net.eval()
