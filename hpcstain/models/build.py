"""A model from its config or from a checkpoint's architecture record: the variants' registry."""

from __future__ import annotations

from typing import Any

import torch

from hpcstain.config import LossConfig, ModelConfig
from hpcstain.errors import ConfigError, HpcstainError, InputError
from hpcstain.models.distill import DistillModel
from hpcstain.models.gans import CYCLEGAN_VARIANTS, CycleGAN, GanModel, Pix2Pix, model_config_of


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig, device: str | torch.device,
                seed: int = 0, rank: int = 0) -> GanModel:
    """The GAN of ``model_cfg.variant``, initialised from ``seed`` (pools also from ``rank``)."""
    if model_cfg.variant in CYCLEGAN_VARIANTS:
        return CycleGAN(model_cfg, loss_cfg, device, seed, rank)
    if model_cfg.variant == "pix2pix":
        return Pix2Pix(model_cfg, loss_cfg, device, seed, rank)
    if model_cfg.variant == "distill":  # a student learning a teacher (models/distill.py)
        return DistillModel(model_cfg, loss_cfg, device, seed, rank)
    raise ConfigError(f"model.variant: must be one of "
                      f"{[*CYCLEGAN_VARIANTS, 'pix2pix', 'distill']}, "
                      f"got {model_cfg.variant!r}")


def build_model_from_architecture(arch: dict[str, Any], device: str | torch.device,
                                  source: str = "checkpoint") -> GanModel:
    """A model for inference (stain/unstain) from a saved :meth:`GanModel.architecture`."""
    model_cfg = model_config_of(arch, source)
    try:
        return build_model(model_cfg, LossConfig(lambda_id=0.0), device)
    except HpcstainError as exc:
        raise InputError(f"{source}: unusable architecture: {exc}") from None
