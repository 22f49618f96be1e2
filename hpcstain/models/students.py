"""Student generators for knowledge distillation (docs/distillation.md).

Two layouts, both fully convolutional with output size = input size, height and width
multiples of 4 (the tile engine rounds tiles up to :attr:`size_multiple`):

* ``s2dnet`` (space-to-depth): a 4× pixel-unshuffle folds every 4×4 cell into channels, a
  1×1 conv mixes them into ``ngf`` features, ``n_blocks`` depthwise-separable residual
  blocks work at 1/4 resolution, a 1×1 conv and a 4× pixel-shuffle give ``ngf/8``
  full-resolution detail maps, and one 3×3 conv over those maps and the CT itself gives the
  image (tanh). Nothing wide ever runs at full resolution, which is what makes it fast on
  CPUs (memory traffic, not FLOPs, bounds small nets there).
* ``dsresnet``: the CycleGAN ResNet layout (stem, two stride-2 downs, blocks at 1/4
  resolution, two ups, 7×7 head) with depthwise-separable residual blocks and a 3×3 stem.

``norm`` is ``instance`` (as the teacher: measured the best student of the phantom teacher,
docs/distillation.md), ``batch`` or ``none`` (no per-tile statistics, so a tile's output
never depends on the rest of the tile). Weights start from He-normal draws of the model's
seeded generator, with the last conv of every residual branch scaled by 0.1 (each block
starts near the identity).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hpcstain.errors import ConfigError

STUDENT_GENERATORS = ("s2dnet", "dsresnet")
STUDENT_NORMS = ("none", "instance", "batch")


def _norm(kind: str, channels: int) -> list[nn.Module]:
    if kind == "none":
        return []
    if kind == "instance":
        return [nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)]
    if kind == "batch":
        return [nn.BatchNorm2d(channels)]
    raise ConfigError(f"model.norm: a student generator takes one of {list(STUDENT_NORMS)}, "
                      f"got {kind!r}")


def separable(channels: int, out: int, dilation: int = 1) -> list[nn.Module]:
    """Reflection pad, depthwise 3×3, pointwise 1×1 (``channels`` → ``out``)."""
    return [nn.ReflectionPad2d(dilation),
            nn.Conv2d(channels, channels, 3, groups=channels, dilation=dilation, bias=False),
            nn.Conv2d(channels, out, 1)]


class SeparableBlock(nn.Module):
    """x + (dw3×3, pw1×1, [norm], ReLU, dw3×3 (dilated), pw1×1, [norm])(x)."""

    def __init__(self, channels: int, norm: str = "instance", dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*separable(channels, channels), *_norm(norm, channels),
                                  nn.ReLU(), *separable(channels, channels, dilation),
                                  *_norm(norm, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _dilations(n_blocks: int) -> list[int]:
    """1, 2, 1, 2, …: every other block sees twice as far at no extra cost."""
    return [1 + (i % 2) for i in range(n_blocks)]


class SpaceToDepthGenerator(nn.Module):
    """unshuffle 4, 1×1 → ngf, n_blocks × separable residual at 1/4 resolution, 1×1 and
    shuffle 4 → ngf/8 full-resolution detail maps, 3×3 conv over (detail maps, CT), tanh.

    The last conv sees the CT itself at full resolution, so edges stay where the CT has
    them while the low-resolution trunk decides the colours: the centre input channel, which
    is the stained section for a 2.5D input (K planes about it) and, for copies of one
    plane, that plane.
    """

    size_multiple = 4
    factor = 4

    def __init__(self, in_channels: int, out_channels: int, ngf: int = 32, n_blocks: int = 3,
                 norm: str = "instance") -> None:
        super().__init__()
        f2 = self.factor ** 2
        self.detail = max(ngf // 8, 1)
        self.stem = nn.Sequential(nn.PixelUnshuffle(self.factor),
                                  nn.Conv2d(in_channels * f2, ngf, 1), *_norm(norm, ngf),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[SeparableBlock(ngf, norm, d)
                                      for d in _dilations(n_blocks)])
        self.up = nn.Sequential(nn.Conv2d(ngf, self.detail * f2, 1),
                                nn.PixelShuffle(self.factor), nn.ReLU())
        self.head = nn.Sequential(nn.ReflectionPad2d(1),
                                  nn.Conv2d(self.detail + 1, out_channels, 3), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        detail = self.up(self.blocks(self.stem(x)))
        c = x.shape[1] // 2  # the section (any channel of a 1-plane input: all equal)
        return self.head(torch.cat([detail, x[:, c:c + 1]], dim=1))


class SeparableResnetGenerator(nn.Module):
    """c3s1-ngf, d2ngf, d4ngf, n_blocks × separable R4ngf, u2ngf, ungf, c7s1-out, tanh."""

    size_multiple = 4

    def __init__(self, in_channels: int, out_channels: int, ngf: int = 8, n_blocks: int = 3,
                 norm: str = "instance") -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(in_channels, ngf, 3), *_norm(norm, ngf), nn.ReLU(),
            nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1), *_norm(norm, 2 * ngf), nn.ReLU(),
            nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1), *_norm(norm, 4 * ngf),
            nn.ReLU())
        self.blocks = nn.Sequential(*[SeparableBlock(4 * ngf, norm, d)
                                      for d in _dilations(n_blocks)])
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 3, stride=2, padding=1, output_padding=1),
            *_norm(norm, 2 * ngf), nn.ReLU(),
            nn.ConvTranspose2d(2 * ngf, ngf, 3, stride=2, padding=1, output_padding=1),
            *_norm(norm, ngf), nn.ReLU(),
            nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.blocks(self.encoder(x)))


def build_student(kind: str, in_channels: int, out_channels: int, ngf: int, n_blocks: int,
                  norm: str) -> nn.Module:
    """The student generator ``kind`` (not initialised; see :func:`init_student`)."""
    if ngf < 1 or n_blocks < 0:
        raise ConfigError(f"model.ngf/n_blocks: need ngf ≥ 1 and n_blocks ≥ 0, got {ngf}, "
                          f"{n_blocks}")
    if kind == "s2dnet":
        return SpaceToDepthGenerator(in_channels, out_channels, ngf, n_blocks, norm)
    if kind == "dsresnet":
        return SeparableResnetGenerator(in_channels, out_channels, ngf, n_blocks, norm)
    raise ConfigError(f"model.generator: not a student generator: {kind!r} "
                      f"(students: {list(STUDENT_GENERATORS)})")


def init_student(net: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """He-normal conv weights from ``generator``, zero biases; residual branches start small."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else \
                    m.weight.shape[0] * m.weight[0, 0].numel() // max(m.groups, 1)
                m.weight.normal_(0.0, math.sqrt(2.0 / max(fan_in, 1)), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for block in net.modules():
            if isinstance(block, SeparableBlock):
                last = [m for m in block.body if isinstance(m, nn.Conv2d)][-1]
                last.weight.mul_(0.1)
    return net
