"""Networks, losses and GAN variants of §2.6 (see docs/models.md)."""

from hpcstain.models.build import build_model, build_model_from_architecture
from hpcstain.models.gans import (
    CycleGAN,
    GanModel,
    Pix2Pix,
    architecture_of,
    check_architecture,
)
from hpcstain.models.pool import ImagePool

__all__ = [
    "CycleGAN",
    "GanModel",
    "ImagePool",
    "Pix2Pix",
    "architecture_of",
    "build_model",
    "build_model_from_architecture",
    "check_architecture",
]
