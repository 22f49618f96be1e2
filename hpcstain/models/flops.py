"""Cost of a generator: floating-point operations per output pixel and parameter count.

FLOPs are counted by torch's own :class:`torch.utils.flop_counter.FlopCounterMode` on one
``1 × C × size × size`` forward pass and divided by ``size²``; a multiply-add counts as
2 FLOP (convolutions and matmuls only; norms, activations and padding are not counted, as
FlopCounterMode does not count them). For the fully convolutional generators here the
result is independent of ``size`` once ``size`` is a multiple of the network's stride
(4 for the ResNet, 256 for the U-Net-256), so 256 is the default.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def flops_per_pixel(generator: nn.Module, in_channels: int, size: int = 256) -> float:
    """FLOP per output pixel of one forward pass of ``generator`` (multiply-add = 2 FLOP).

    The network is run on zeros in inference mode on its own device and dtype; its
    train/eval mode is left as it was.
    """
    if size < 1 or in_channels < 1:
        raise ValueError(f"flops_per_pixel: size and in_channels must be positive, got "
                         f"{size} and {in_channels}")
    param = next(generator.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(1, in_channels, size, size, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        generator(x)
    return counter.get_total_flops() / float(size * size)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (trainable or frozen) of ``module``."""
    return sum(p.numel() for p in module.parameters())
