"""Networks of §2.6: ResNet and U-Net-256 generators, the 70×70 PatchGAN discriminator.

Each network is written as a table of small layer factories (``c7s1``, ``down``, ``up``,
``ResidualBlock``) so the code reads like the architecture tables of CycleGAN/pix2pix.
Convolutions carry a bias when no affine norm follows them (instance norm is not affine),
which gives the canonical parameter counts: 11,378,179 for the paper's ResNet generator
and 2,764,737 for its PatchGAN.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn

from hpcstain.config import ModelConfig
from hpcstain.errors import ConfigError, InputError
from hpcstain.models.students import build_student

NORMS = ("instance", "batch")
UPSAMPLINGS = ("transpose", "resize")
GENERATORS = ("resnet", "unet256", "unet", "s2dnet", "dsresnet")

# --------------------------------------------------------------------------- layer factories


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Instance norm (no affine, no running stats) or batch norm (affine)."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ConfigError(f"model.norm: must be one of {list(NORMS)}, got {kind!r}")


def conv_bias(norm: str) -> bool:
    """A conv followed by a norm needs its own bias only when the norm has no shift."""
    return norm == "instance"


def c7s1(in_ch: int, out_ch: int, norm: str) -> list[nn.Module]:
    """7×7 reflection-padded conv, norm, ReLU (the generator's stem)."""
    return [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, out_ch, 7, bias=conv_bias(norm)),
            norm_layer(norm, out_ch), nn.ReLU()]


def down(in_ch: int, out_ch: int, norm: str) -> list[nn.Module]:
    """3×3 stride-2 conv, norm, ReLU: halves the patch."""
    return [nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=conv_bias(norm)),
            norm_layer(norm, out_ch), nn.ReLU()]


def up(in_ch: int, out_ch: int, norm: str, mode: str) -> list[nn.Module]:
    """Doubles the patch: 3×3 transposed conv, or nearest ×2 resize then 3×3 conv."""
    bias = conv_bias(norm)
    if mode == "transpose":
        conv: list[nn.Module] = [nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1,
                                                    output_padding=1, bias=bias)]
    elif mode == "resize":
        conv = [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                nn.Conv2d(in_ch, out_ch, 3, bias=bias)]
    else:
        raise ConfigError(f"model.upsampling: must be one of {list(UPSAMPLINGS)}, got {mode!r}")
    return [*conv, norm_layer(norm, out_ch), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + (pad, conv3×3, norm, ReLU, [dropout], pad, conv3×3, norm)(x)."""

    def __init__(self, channels: int, norm: str, use_dropout: bool = False) -> None:
        super().__init__()
        bias = conv_bias(norm)
        layers: list[nn.Module] = [nn.ReflectionPad2d(1),
                                   nn.Conv2d(channels, channels, 3, bias=bias),
                                   norm_layer(norm, channels), nn.ReLU()]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias),
                   norm_layer(norm, channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


# --------------------------------------------------------------------------- generators


class ResnetGenerator(nn.Module):
    """c7s1-ngf, d2ngf, d4ngf, n_blocks × R4ngf, u2ngf, ungf, c7s1-out, tanh.

    Input height and width must be multiples of 4 (two stride-2 downsamplings).
    """

    size_multiple = 4

    def __init__(self, in_channels: int, out_channels: int, ngf: int = 64, n_blocks: int = 9,
                 norm: str = "instance", upsampling: str = "transpose",
                 use_dropout: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            *c7s1(in_channels, ngf, norm),
            *down(ngf, 2 * ngf, norm),
            *down(2 * ngf, 4 * ngf, norm),
        )
        self.blocks = nn.Sequential(
            *[ResidualBlock(4 * ngf, norm, use_dropout) for _ in range(n_blocks)])
        self.decoder = nn.Sequential(
            *up(4 * ngf, 2 * ngf, norm, upsampling),
            *up(2 * ngf, ngf, norm, upsampling),
            nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.blocks(self.encoder(x)))


def unet_down(in_ch: int, out_ch: int, norm: str | None, outermost: bool) -> nn.Sequential:
    """[LeakyReLU 0.2], 4×4 stride-2 conv, [norm]: one U-Net encoder level."""
    layers: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2)]
    layers.append(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1,
                            bias=norm is None or conv_bias(norm)))
    if norm is not None:
        layers.append(norm_layer(norm, out_ch))
    return nn.Sequential(*layers)


def unet_up(in_ch: int, out_ch: int, norm: str | None, dropout: bool,
            upsampling: str = "transpose") -> nn.Sequential:
    """ReLU, 4×4 stride-2 transposed conv (or, ``resize``, nearest ×2 then a reflection-
    padded 3×3 conv: no checkerboard), then norm [+ dropout 0.5], or tanh when outermost."""
    bias = norm is None or conv_bias(norm)
    layers: list[nn.Module] = [nn.ReLU()]
    if upsampling == "transpose":
        layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=bias))
    elif upsampling == "resize":
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                   nn.Conv2d(in_ch, out_ch, 3, bias=bias)]
    else:
        raise ConfigError(f"model.upsampling: must be one of {list(UPSAMPLINGS)}, "
                          f"got {upsampling!r}")
    if norm is None:
        layers.append(nn.Tanh())
    else:
        layers.append(norm_layer(norm, out_ch))
        if dropout:
            layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


class UnetGenerator(nn.Module):
    """U-Net with ``n_down`` stride-2 levels and skip connections (pix2pix's U-Net-256).

    Encoder widths ngf, 2ngf, 4ngf, 8ngf, 8ngf…; the innermost level has no norm; with
    ``use_dropout`` the three up-levels next to the innermost one drop out at 0.5.
    Input height and width must be multiples of 2**n_down (256 for U-Net-256), unless
    ``pad``: then any input is reflection-padded up to the multiple and the output cropped
    back (``model.generator: unet``, whose levels are ``model.n_blocks``).
    """

    def __init__(self, in_channels: int, out_channels: int, ngf: int = 64, n_down: int = 8,
                 norm: str = "instance", use_dropout: bool = False,
                 upsampling: str = "transpose", pad: bool = False) -> None:
        super().__init__()
        if n_down < 5:
            raise ConfigError(f"U-Net needs at least 5 levels, got {n_down}")
        widths = [ngf * min(2**i, 8) for i in range(n_down)]
        inner = n_down - 1
        self.multiple = 2**n_down
        self.pad = pad
        self.size_multiple = 1 if pad else self.multiple
        self.downs = nn.ModuleList(
            unet_down(in_channels if i == 0 else widths[i - 1], widths[i],
                      None if i in (0, inner) else norm, outermost=i == 0)
            for i in range(n_down))
        # ups[i] undoes downs[i]: it reads widths[i] (innermost) or the skip concat 2·widths[i]
        self.ups = nn.ModuleList(
            unet_up(widths[i] if i == inner else 2 * widths[i],
                    out_channels if i == 0 else widths[i - 1],
                    None if i == 0 else norm,
                    dropout=use_dropout and 4 <= i < inner, upsampling=upsampling)
            for i in range(n_down))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.pad:
            ph, pw = -h % self.multiple, -w % self.multiple
            if ph or pw:
                mode = "reflect" if ph < h and pw < w else "replicate"
                x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode)
                return self._levels(x)[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
        elif h % self.size_multiple or w % self.size_multiple:
            raise InputError(f"U-Net generator: patch {h}×{w} is not a multiple of "
                             f"{self.size_multiple} pixels")
        return self._levels(x)

    def _levels(self, x: Tensor) -> Tensor:
        skips = []
        for level in self.downs:
            x = level(x)
            skips.append(x)
        y = self.ups[-1](skips[-1])
        for i in range(len(self.ups) - 2, -1, -1):
            y = self.ups[i](torch.cat([skips[i], y], dim=1))
        return y


# --------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN: C(ndf) without norm, C(2ndf)…, a stride-1 C(8ndf), then a 1-channel map.

    With n_layers=3 each output value sees a 70×70 input patch. No sigmoid: the GAN
    losses take raw scores (LSGAN) or logits (vanilla).
    """

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3,
                 norm: str = "instance") -> None:
        super().__init__()
        bias = conv_bias(norm)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            out = ndf * min(2**n, 8)
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias),
                       norm_layer(norm, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


# --------------------------------------------------------------------------- builders


def init_weights(net: nn.Module, gain: float = 0.02,
                 generator: torch.Generator | None = None) -> nn.Module:
    """Conv weights ~ N(0, gain), affine norm weights ~ N(1, gain), every bias 0."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.normal_(0.0, gain, generator=generator)
            elif isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.weight is not None:
                m.weight.normal_(1.0, gain, generator=generator)
            else:
                continue
            if m.bias is not None:
                m.bias.zero_()
    return net


def inert_biases(net: nn.Module) -> list[nn.Parameter]:
    """Conv biases that feed a non-affine instance norm, which subtracts them right away."""
    found = []
    for seq in net.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for conv, norm in pairwise(seq):
            if (isinstance(conv, nn.Conv2d | nn.ConvTranspose2d) and conv.bias is not None
                    and isinstance(norm, nn.InstanceNorm2d) and not norm.affine):
                found.append(conv.bias)
    return found


def freeze_inert_biases(net: nn.Module) -> nn.Module:
    """Zero the gradient of :func:`inert_biases` so they keep their initial 0.

    They change no output, so their gradient is float round-off, which Adam would blow
    up into a random drift of ~lr per step (and differently on 1 or N ranks). They stay
    parameters, so the canonical counts and state-dict layout are kept.
    """
    for bias in inert_biases(net):
        bias.register_hook(torch.zeros_like)
    return net


def build_generator(cfg: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    """The generator named by ``cfg.generator`` (not initialised)."""
    if cfg.generator == "resnet":
        return ResnetGenerator(in_channels, out_channels, cfg.ngf, cfg.n_blocks, cfg.norm,
                               cfg.upsampling, cfg.use_dropout)
    if cfg.generator == "unet256":
        return UnetGenerator(in_channels, out_channels, cfg.ngf, 8, cfg.norm, cfg.use_dropout)
    if cfg.generator == "unet":  # small U-Net: n_blocks levels, any input size, upsampling
        return UnetGenerator(in_channels, out_channels, cfg.ngf, cfg.n_blocks, cfg.norm,
                             cfg.use_dropout, cfg.upsampling, pad=True)
    if cfg.generator in ("s2dnet", "dsresnet"):  # distillation students (models/students.py)

        return build_student(cfg.generator, in_channels, out_channels, cfg.ngf, cfg.n_blocks,
                             cfg.norm)
    raise ConfigError(f"model.generator: must be one of {list(GENERATORS)}, "
                      f"got {cfg.generator!r}")


def build_discriminator(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The PatchGAN discriminator of ``cfg`` (not initialised)."""
    return PatchDiscriminator(in_channels, cfg.ndf, cfg.n_layers_d, cfg.norm)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
