"""The distillation student (model variant ``distill``; docs/distillation.md).

A student ``ct2hist`` generator (a small student net of :mod:`.students`, or a plain ResNet /
U-Net) learns a teacher's CT→stain map from teacher-labelled planes
(:mod:`hpcstain.train.teacher`): ℓ1 to the label inside the sample, optionally plus a
conditional patch-GAN term. Its checkpoint has the usual layout, so inference reads it like
any other.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from hpcstain.config import LossConfig, ModelConfig
from hpcstain.errors import UsageError
from hpcstain.models.gans import (
    AutocastFactory,
    GanModel,
    Pix2Pix,
    backward_step,
    generator_in_channels,
    generator_input,
)
from hpcstain.models.losses import gan_loss, masked_l1
from hpcstain.models.networks import PatchDiscriminator, build_generator, freeze_inert_biases
from hpcstain.models.students import STUDENT_GENERATORS, init_student


class DistillModel(GanModel):
    """Student ``ct2hist`` + a conditional PatchGAN (used only when ``lambda_kd_gan`` > 0).

    Batches are ``{"ct", "histology": the teacher's label, "mask"}`` (plus ``"ct_context"``,
    the K CT planes the generator sees, for a 2.5D student); loss terms:
    ``distill_l1`` (weight ``loss.lambda_l1``) and ``G_gan_ct2hist`` (``loss.lambda_kd_gan``).
    The checkpoint has the usual layout (``generators.ct2hist``), so inference reads it
    like any other.
    """

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig,
                 device: str | torch.device, seed: int = 0, rank: int = 0) -> None:
        super().__init__(model_cfg, loss_cfg, device, seed, rank)
        c_ct, c_hist = model_cfg.ct_channels, model_cfg.histology_channels
        # a 2.5D student (model.context_slices K > 1, its teacher's) takes the K CT planes
        # as its channels, exactly as a trained 2.5D generator and `stain` feed them
        student = build_generator(model_cfg, generator_in_channels(model_cfg), c_hist)
        if model_cfg.generator in STUDENT_GENERATORS:
            student = freeze_inert_biases(init_student(student, self._init_rng).to(self.device))
        else:  # a plain ResNet / U-Net student
            student = self._new_net(student)
        d_norm = model_cfg.norm if model_cfg.norm != "none" else "instance"
        self.generators = {"ct2hist": student}
        self.discriminators = {"hist": self._new_net(PatchDiscriminator(
            c_ct + c_hist, model_cfg.ndf, model_cfg.n_layers_d, d_norm))}
        self.pools = {"hist": self._new_pool(0)}
        self._finish_init()

    @property
    def adversarial(self) -> bool:
        return self._lam("lambda_kd_gan") > 0

    def unstain(self, hist: Tensor) -> Tensor:
        raise UsageError("a distilled student has no histology→CT generator")

    def train_step(self, batch: dict[str, Tensor], opt_g: torch.optim.Optimizer,
                   opt_d: torch.optim.Optimizer, autocast: AutocastFactory = nullcontext,
                   scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
        """ℓ1 only: one student update (no discriminator step); else the GAN step."""
        if self.adversarial:
            return super().train_step(batch, opt_g, opt_d, autocast, scaler)
        self.train()
        batch = self._check_batch(batch)
        opt_g.zero_grad(set_to_none=True)
        with autocast():
            fakes = self._forward_generators(batch)
            terms = self._generator_losses(batch, fakes)
        total = self._weighted_total(terms)
        backward_step(total, opt_g, scaler)
        opt_d.step()  # no gradients: changes nothing, keeps the LR scheduler's order check quiet
        if scaler is not None:
            scaler.update()
        out = {**terms, "G_total": total}
        values = torch.stack([t.detach().float() for t in out.values()]).tolist()
        return dict(zip(out, values, strict=True))

    def _generator_weights(self) -> dict[str, float]:
        return {"distill_l1": self._lam("lambda_l1"), "G_gan_ct2hist": self._lam("lambda_kd_gan")}

    def _forward_generators(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"fake_hist": self._run_g["ct2hist"](generator_input(batch))}

    def _generator_losses(self, batch: dict[str, Tensor],
                          fakes: dict[str, Tensor]) -> dict[str, Tensor]:
        fake = fakes["fake_hist"]
        terms = {"distill_l1": masked_l1(fake, batch["histology"], batch.get("mask"))}
        if self.adversarial:
            pair = torch.cat([batch["ct"].to(fake.dtype), fake], dim=1)
            terms["G_gan_ct2hist"] = gan_loss(self.discriminators["hist"](pair), True,
                                              self.loss_cfg.gan_mode)
        return terms

    # the optional patch-GAN term: Pix2Pix's conditional (CT, stain) discriminator loss
    _discriminator_losses = Pix2Pix._discriminator_losses
