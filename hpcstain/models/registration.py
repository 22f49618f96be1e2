"""Learned alignment of paired-but-misaligned slides (``model.align``, docs/models.md).

Real CT/histology pairs are never pixel-aligned: sections shrink, shear and warp. A small
registration network ``R`` looks at the generator's output (detached) and the histology
and predicts a smooth displacement field ``d`` (pixels, (dy, dx) per pixel); the output is
warped by ``d`` before the masked pixel loss, ``ℓ1(warp(G(ct), d), hist)``, and a
smoothness term penalises the field's spatial gradient. ``R`` is trained jointly with the
generators (same optimiser); inference uses the generator alone, so a model trained with
alignment stains in the CT's geometry.

Conventions: ``warp(img, d)(p) = img(p + d(p))`` (bilinear, border padding, pixel
centres as in ``grid_sample(align_corners=False)``). A histology pixel ``p`` that shows
the tissue at CT position ``p + u(p)`` is matched by ``d = u``; the reverse direction
(a CT-like image onto the CT) uses ``-d``, the first-order inverse of a smooth small field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISPLACEMENT_GAIN = 8.0   # pixels per unit of the last convolution's output


def _block(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1),
                         nn.LeakyReLU(0.2, inplace=True))


class RegistrationNet(nn.Module):
    """(moving, fixed) images → displacement field (B, 2, H, W) in pixels, (dy, dx).

    A small U-Net: a full-resolution stem, three stride-2 stages (receptive field ~60 px,
    enough for the shifts of strongly misaligned sections), and a decoder back to 1/4
    resolution with skips; the field is predicted there and upsampled bilinearly, which
    keeps it smooth. The last convolution starts at zero, so the initial warp is the
    identity and training starts from the plain masked ℓ1. No normalisation layers (a
    field must follow absolute offsets, not per-image statistics). Any H, W ≥ 8 works.
    """

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        w = int(width)
        self.stem = _block(2 * channels, w)
        self.down1 = _block(w, 2 * w, 2)        # 1/2
        self.down2 = _block(2 * w, 2 * w, 2)    # 1/4
        self.down3 = _block(2 * w, 2 * w, 2)    # 1/8
        self.bottom = _block(2 * w, 2 * w)
        self.up = _block(4 * w, 2 * w)          # 1/4, after concatenating the skip
        self.refine = _block(2 * w, w)
        self.flow = nn.Conv2d(w, 2, 3, 1, 1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        x = torch.cat([moving, fixed.to(moving.dtype)], dim=1)
        s1 = self.down1(self.stem(x))
        s2 = self.down2(s1)
        b = self.bottom(self.down3(s2))
        b = F.interpolate(b, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        y = self.refine(self.up(torch.cat([b, s2], dim=1)))
        flow = self.flow(y) * DISPLACEMENT_GAIN
        return F.interpolate(flow, size=moving.shape[-2:], mode="bilinear",
                             align_corners=False)


def identity_grid(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """(1, H, W, 2) sampling grid of ``grid_sample`` (x, y order) that reproduces the image."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


def warp(img: Tensor, disp: Tensor, mode: str = "bilinear") -> Tensor:
    """``img`` (B, C, H, W) resampled at ``p + disp(p)``; ``disp`` (B, 2, H, W) in pixels.

    Computed in float32 (``grid_sample`` wants one dtype for image and grid; under autocast
    the generator's output may be bf16/fp16). Gradients reach both ``img`` and ``disp``
    (``mode`` "bilinear"; "nearest" for masks and labels).
    """
    h, w = img.shape[-2:]
    d = disp.float()
    scale = torch.tensor([2.0 / w, 2.0 / h], device=d.device).view(1, 1, 1, 2)
    grid = identity_grid(h, w, d.device) + d.flip(1).permute(0, 2, 3, 1) * scale
    return F.grid_sample(img.float(), grid, mode=mode, padding_mode="border",
                         align_corners=False)


def smoothness(disp: Tensor) -> Tensor:
    """Mean squared forward difference of the field along y and x (pixels per pixel)²."""
    d = disp.float()
    dy = d[:, :, 1:, :] - d[:, :, :-1, :]
    dx = d[:, :, :, 1:] - d[:, :, :, :-1]
    return dy.pow(2).mean() + dx.pow(2).mean()


def _grey_gradient(img: Tensor) -> Tensor:
    """(B, 2, H-1, W-1) forward differences (y, x) of the image's channel mean."""
    g = img.float().mean(1, keepdim=True)
    base = g[..., :-1, :-1]
    return torch.cat([g[..., 1:, :-1] - base, g[..., :-1, 1:] - base], dim=1)


def edge_misfit(moving: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
    """How badly the edges of two images of different modalities line up, in [0, 1].

    The normalised-gradient-field distance on grey versions (channel means):
    ``1 − (∇a·∇b)² / ((|∇a|² + εa²)(|∇b|² + εb²))``, averaged over the pixels (inside
    ``mask`` (B, 1, H, W) when given). It is small where the gradients are parallel or
    anti-parallel, so it ignores how each modality renders a tissue (bright bone in the CT,
    dark or pink in the stain): only where the boundaries run. Flat regions score ≈ 1
    and give no gradient. ``ε`` of each image is its mean gradient magnitude (detached),
    so noise-level gradients count less than edges. With ``model.align_ngf`` it scores
    the warped CT against the histology: a registration signal that does not depend on
    the generator's appearance errors.
    """
    a, b = _grey_gradient(moving), _grey_gradient(fixed)
    na, nb = a.pow(2).sum(1), b.pow(2).sum(1)                     # (B, H-1, W-1)
    eps_a = na.sqrt().mean(dim=(-2, -1), keepdim=True).detach().pow(2) + 1e-12
    eps_b = nb.sqrt().mean(dim=(-2, -1), keepdim=True).detach().pow(2) + 1e-12
    misfit = 1 - (a * b).sum(1).pow(2) / ((na + eps_a) * (nb + eps_b))
    if mask is None:
        return misfit.mean()
    w = mask.float()[:, 0, :-1, :-1]
    return (misfit * w).sum() / w.sum().clamp_min(1.0)


def build_registration(channels: int, width: int = 16,
                       generator: torch.Generator | None = None) -> RegistrationNet:
    """The registration net of ``model.align`` for images of ``channels`` channels.

    Hidden convolutions get Kaiming-normal weights (for LeakyReLU 0.2) drawn from
    ``generator`` (the same weights on every rank), zero biases; the output stays zero.
    """
    net = RegistrationNet(channels, width)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m is not net.flow:
            nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu",
                                    generator=generator)
            nn.init.zeros_(m.bias)
    return net
