"""Instance-norm statistics shared across neighbouring slices of a stack (stripes at the source).

A generator trained with instance norm normalises every slice by that slice's own feature
statistics. Staining a volume slice by slice, neighbouring slices get slightly different
statistics, and the stack shows stripes along the stacking axis. :class:`StackNorm` is a
drop-in for ``nn.InstanceNorm2d(affine=False)`` that, at inference, smooths the per-slice
statistics along the batch axis with a Gaussian of ``sigma`` slices before normalising:
a batch must then hold consecutive slices of one stack, in order.

The mean and the second moment are smoothed (not mean and variance), so the smoothed variance
is the variance of the pooled neighbourhood. ``sigma`` 0 is plain instance norm. No weights
change: any instance-norm checkpoint can be used this way without retraining.

Every norm layer mixes neighbours, so the output of slice ``s`` depends on the slices within
``n_norms × radius`` of it; :func:`dependency_radius` gives that number (the context a
chunked engine would need for exact chunk invariance).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


def gaussian_weights(n: int, sigma: float, truncate: float = 2.0) -> Tensor:
    """(n, n) row-normalised Gaussian mixing matrix along a stack of ``n`` slices.

    Rows are renormalised at the ends of the stack (no padding). ``sigma`` 0 is the identity.
    """
    if sigma <= 0 or n == 1:
        return torch.eye(n)
    radius = math.ceil(truncate * sigma)
    idx = torch.arange(n, dtype=torch.float64)
    dist = (idx[:, None] - idx[None, :]).abs()
    w = torch.exp(-0.5 * (dist / sigma) ** 2) * (dist <= radius)
    return (w / w.sum(dim=1, keepdim=True)).float()


def kernel_radius(sigma: float, truncate: float = 2.0) -> int:
    return math.ceil(truncate * sigma) if sigma > 0 else 0


class StackNorm(nn.Module):
    """Instance norm whose per-sample statistics are averaged over neighbouring samples."""

    def __init__(self, eps: float = 1e-5, sigma: float = 0.0, truncate: float = 2.0) -> None:
        super().__init__()
        self.eps = eps
        self.sigma = sigma
        self.truncate = truncate

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        mean = xf.mean(dim=(2, 3))  # (N, C)
        second = (xf * xf).mean(dim=(2, 3))
        if self.sigma > 0 and x.shape[0] > 1:
            w = gaussian_weights(x.shape[0], self.sigma, self.truncate).to(x.device)
            mean, second = w @ mean, w @ second
        var = (second - mean * mean).clamp_min(0.0)
        out = (xf - mean[..., None, None]) * torch.rsqrt(var[..., None, None] + self.eps)
        return out.to(x.dtype)


def n_instance_norms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.InstanceNorm2d | StackNorm) for m in net.modules())


def dependency_radius(net: nn.Module, sigma: float, truncate: float = 2.0) -> int:
    """Slices on each side that can influence one slice's output through shared statistics."""
    return n_instance_norms(net) * kernel_radius(sigma, truncate)


def share_statistics(net: nn.Module, sigma: float, truncate: float = 2.0) -> nn.Module:
    """A copy of ``net`` whose non-affine instance norms share statistics along the batch."""
    out = copy.deepcopy(net)
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.InstanceNorm2d) and not child.affine \
                    and not child.track_running_stats:
                setattr(module, child_name, StackNorm(child.eps, sigma, truncate))
        del name
    return out
