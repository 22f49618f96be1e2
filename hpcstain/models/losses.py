"""Loss terms of Eqs. 1–10, as pure functions reduced in float32.

Every ℓ1 term is restricted to the correspondence mask (§2.8) and averaged over the
masked pixels of each patch, ``sum(|a − b|·m) / max(sum(m)·C, eps)``, then over the batch:
a patch half outside the mask weighs its valid half like a whole patch, and a patch's
loss never depends on the other patches of its batch (so DDP's mean over ranks of
per-rank losses equals the loss of the global batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hpcstain.errors import ConfigError

GAN_MODES = ("lsgan", "vanilla")
EPS = 1e-8


def masked_mean(values: Tensor, mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Per-patch mean of (B, C, H, W) ``values`` where ``mask`` (B, 1, H, W) is 1, batch-averaged.

    A patch with an empty mask contributes 0.
    """
    values = values.float()
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype).expand_as(values)
    per_patch = (values * m).flatten(1).sum(1) / torch.clamp(m.flatten(1).sum(1), min=eps)
    return per_patch.mean()


def masked_l1(a: Tensor, b: Tensor, mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """ℓ1 distance averaged over masked pixels and channels (Eqs. 1, 3, 5, 9)."""
    return masked_mean((a.float() - b.float()).abs(), mask, eps)


def greyscale_loss(img: Tensor, mask: Tensor | None = None, eps: float = EPS) -> Tensor:
    """Eq. 6: mean over (masked) pixels of |R−G| + |R−B| + |G−B|; 0 for a grey image."""
    if img.shape[1] != 3:
        raise ValueError(f"greyscale loss needs 3 channels, got {img.shape[1]}")
    r, g, b = img.float().unbind(dim=1)
    spread = ((r - g).abs() + (r - b).abs() + (g - b).abs()).unsqueeze(1)
    return masked_mean(spread, mask, eps)


def gan_loss(pred: Tensor, real: bool, mode: str = "lsgan") -> Tensor:
    """Adversarial loss against an all-real (1) or all-fake (0) target.

    ``lsgan``: mean squared error (Eqs. 2, 8); ``vanilla``: BCE on logits.
    """
    pred = pred.float()
    target = torch.ones_like(pred) if real else torch.zeros_like(pred)
    if mode == "lsgan":
        return F.mse_loss(pred, target)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred, target)
    raise ConfigError(f"loss.gan_mode: must be one of {list(GAN_MODES)}, got {mode!r}")


def discriminator_loss(pred_real: Tensor, pred_fake: Tensor, mode: str = "lsgan") -> Tensor:
    """½ (loss(real → 1) + loss(fake → 0)), halved as in CycleGAN to slow D down."""
    return 0.5 * (gan_loss(pred_real, True, mode) + gan_loss(pred_fake, False, mode))
