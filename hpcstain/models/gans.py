"""GAN variants of §2.6, one training step each: paired CycleGAN (Eqs. 4/7), Pix2Pix (Eq. 10).

A :class:`GanModel` owns raw networks, the nets used for backward (the same modules,
possibly wrapped by DDP or ``torch.compile`` through :meth:`GanModel.wrap`), and the
image pools. The trainer owns optimisers, AMP and the loop; ``train_step`` does one
generator update then one discriminator update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from hpcstain.config import LossConfig, ModelConfig, build
from hpcstain.errors import ConfigError, HpcstainError, InputError, UsageError
from hpcstain.models.losses import discriminator_loss, gan_loss, greyscale_loss, masked_l1
from hpcstain.models.networks import (
    build_discriminator,
    build_generator,
    freeze_inert_biases,
    init_weights,
)
from hpcstain.models.pool import ImagePool, pool_seed
from hpcstain.models.registration import build_registration, edge_misfit, smoothness, warp

AutocastFactory = Callable[[], AbstractContextManager[Any]]

ARCHITECTURE_KEYS = ("variant", "generator", "ct_channels", "histology_channels", "ngf", "ndf",
                     "n_blocks", "n_layers_d", "upsampling", "norm", "use_dropout")
CYCLEGAN_VARIANTS = ("modcyclegan", "cyclegan")
STATE_PARTS = ("generators", "discriminators", "pools")
REGISTRATION = "registration"  # model.align's net, kept with the generators (training only)


def architecture_of(cfg: ModelConfig) -> dict[str, Any]:
    """The keys of ``cfg`` that fix the networks' shapes (saved in every checkpoint).

    ``context_slices`` is recorded only when it is not 1 (older checkpoints, which lack
    it, read as 1; a k = 1 checkpoint stays as it was).
    """
    arch = {k: getattr(cfg, k) for k in ARCHITECTURE_KEYS}
    if cfg.context_slices != 1:
        arch["context_slices"] = cfg.context_slices
    return arch


def generator_in_channels(cfg: ModelConfig) -> int:
    """Input channels of the CT→histology generator: the k planes of a 2.5D model
    (``model.context_slices`` > 1), else ``model.ct_channels`` copies of the one slice."""
    return cfg.context_slices if cfg.context_slices > 1 else cfg.ct_channels


def set_requires_grad(nets: Iterable[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


class GanModel:
    """Shared plumbing of both families: nets, pools, optimiser steps, state, inference."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig,
                 device: str | torch.device, seed: int = 0, rank: int = 0) -> None:
        self.model_cfg = model_cfg
        self.loss_cfg = loss_cfg
        self.device = torch.device(device)
        self._init_rng = torch.Generator().manual_seed(seed)  # same weights on every rank
        self.generators: dict[str, nn.Module] = {}
        self.discriminators: dict[str, nn.Module] = {}
        self.pools: dict[str, ImagePool] = {}
        self._seed, self._rank = seed, rank
        self.steps_done = 0  # train_step calls so far; the trainer sets it on resume

    # -- construction helpers
    def _new_net(self, net: nn.Module) -> nn.Module:
        net = init_weights(net, self.model_cfg.init_gain, self._init_rng).to(self.device)
        return freeze_inert_biases(net)

    def _new_pool(self, index: int) -> ImagePool:
        return ImagePool(self.model_cfg.pool_size, pool_seed(self._seed, self._rank, index))

    def _add_registration(self, supervised: bool, what: str) -> None:
        """With ``model.align``, add the registration net as ``generators["registration"]``.

        It is optimised with the generators (``opt_g``), wrapped and saved with them;
        inference builds only ``ct2hist``/``hist2ct`` and never needs it. ``supervised``
        says whether the paired pixel loss ``what`` it serves is on.
        """
        if not self.model_cfg.align:
            return
        if not supervised:
            raise ConfigError(f"model.align: aligns the paired pixel loss, but {what} is 0 "
                              f"(set {what} > 0 or model.align=false)")
        start = self.model_cfg.align_start
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"model.align_start: must be an integer >= 0 (training steps "
                              f"before the warp is switched on), got {start!r}")
        if self.model_cfg.align_ngf < 0:
            raise ConfigError(f"model.align_ngf: must be >= 0, got {self.model_cfg.align_ngf}")
        if self.model_cfg.align_by not in ("pixel", "edges"):
            raise ConfigError(f"model.align_by: must be 'pixel' or 'edges', got "
                              f"{self.model_cfg.align_by!r}")
        if self.model_cfg.align_by == "edges" and self.model_cfg.align_ngf <= 0:
            raise ConfigError("model.align_by=edges: the edge term trains the registration "
                              "net alone, so model.align_ngf must be > 0")
        net = build_registration(self.model_cfg.histology_channels, self.model_cfg.align_width,
                                 self._init_rng)
        self.generators[REGISTRATION] = net.to(self.device)

    @property
    def aligning(self) -> bool:
        """Whether this step warps: ``model.align`` on and ``model.align_start`` steps done.

        Before the start (warm start) the pixel loss compares the unwarped output, exactly
        as without alignment, and the registration net is not run, so it gets no gradient
        and Adam leaves it (and its moments) untouched.
        """
        return bool(self.model_cfg.align) and self.steps_done >= self.model_cfg.align_start

    def _register(self, out: dict[str, Tensor], hist: Tensor) -> None:
        """``out["disp"]``: the field warping ``out["fake_hist"]`` onto ``hist`` (align on).

        The registration net sees the generator's output detached: the generator learns
        only through the warped pixel loss, never by steering the field.
        """
        if REGISTRATION in self._run_g and self.aligning:
            out["disp"] = self._run_g[REGISTRATION](out["fake_hist"].detach(), hist)

    def _align_terms(self, batch: dict[str, Tensor], disp: Tensor | None) -> dict[str, Tensor]:
        """The field's own loss terms (align on): smoothness, and with ``model.align_ngf``
        the edge term of the warped CT against the histology (:func:`edge_misfit`).

        Before ``model.align_start`` (no field yet) they are logged as 0, the values of
        the identity field, so every step of a run writes the same loss columns.
        """
        if disp is None:
            zero = torch.zeros((), device=self.device)
            return {k: zero for k in self._align_weights()}
        terms = {"align_smooth": smoothness(disp)}
        if self.model_cfg.align_ngf > 0:
            terms["align_ngf"] = edge_misfit(warp(batch["ct"], disp), batch["histology"],
                                             batch.get("mask"))
        return terms

    def _pixel_field(self, disp: Tensor) -> Tensor:
        """The field the pixel terms warp with: ``disp`` itself, or with ``model.align_by:
        edges`` detached, so the pixel loss still compares aligned images but only the edge
        term (and smoothness) trains the registration net: it cannot explain away the
        generator's appearance errors."""
        return disp.detach() if self.model_cfg.align_by == "edges" else disp

    def _align_weights(self) -> dict[str, float]:
        if not self.model_cfg.align:
            return {}
        weights = {"align_smooth": float(self.model_cfg.align_smooth)}
        if self.model_cfg.align_ngf > 0:
            weights["align_ngf"] = float(self.model_cfg.align_ngf)
        return weights

    def _finish_init(self) -> None:
        """Nets used for backward start as the raw nets; :meth:`wrap` replaces them."""
        self._run_g: dict[str, nn.Module] = dict(self.generators)
        self._run_d: dict[str, nn.Module] = dict(self.discriminators)

    # -- trainer interface
    def parameters_g(self) -> list[nn.Parameter]:
        return [p for net in self.generators.values() for p in net.parameters()]

    def parameters_d(self) -> list[nn.Parameter]:
        return [p for net in self.discriminators.values() for p in net.parameters()]

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Run ``fn(net)`` (DDP, torch.compile) in place of every net used for backward.

        Raw modules stay in ``generators``/``discriminators``; wrapping twice composes.
        """
        self._run_g = {k: fn(v) for k, v in self._run_g.items()}
        self._run_d = {k: fn(v) for k, v in self._run_d.items()}

    def train(self, mode: bool = True) -> GanModel:
        for net in [*self.generators.values(), *self.discriminators.values()]:
            net.train(mode)
        return self

    def eval(self) -> GanModel:
        return self.train(False)

    def _lam(self, name: str) -> float:
        """The loss weight ``loss.<name>``."""
        return float(getattr(self.loss_cfg, name))

    def train_step(self, batch: dict[str, Tensor], opt_g: torch.optim.Optimizer,
                   opt_d: torch.optim.Optimizer, autocast: AutocastFactory = nullcontext,
                   scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
        """One generator update, then one discriminator update; every loss as a float.

        Generator components are unweighted; ``G_total`` is the weighted sum that was
        back-propagated; ``D_*`` are the discriminator losses (½ real + ½ fake).
        """
        self.train()
        batch = self._check_batch(batch)
        discriminators = list(self.discriminators.values())

        set_requires_grad(discriminators, False)  # D runs raw here, never through DDP
        opt_g.zero_grad(set_to_none=True)
        with autocast():
            fakes = self._forward_generators(batch)
            g_terms = self._generator_losses(batch, fakes)
        g_total = self._weighted_total(g_terms)
        backward_step(g_total, opt_g, scaler)

        d_terms: dict[str, Tensor] = {}
        if self.adversarial:
            set_requires_grad(discriminators, True)
            opt_d.zero_grad(set_to_none=True)
            with autocast():
                d_terms = self._discriminator_losses(batch, fakes)
            backward_step(sum(d_terms.values()), opt_d, scaler)
        else:
            opt_d.step()  # no gradients: changes nothing, keeps the LR scheduler's order quiet
        if scaler is not None:
            scaler.update()

        self.steps_done += 1
        terms = {**g_terms, "G_total": g_total, **d_terms}
        values = torch.stack([t.detach().float() for t in terms.values()]).tolist()
        return dict(zip(terms, values, strict=True))

    # -- inference
    @torch.no_grad()
    def stain(self, ct: Tensor) -> Tensor:
        """CT → histology with the raw generator in eval mode (no dropout), no grad.

        ``ct`` is the generator's input: the k-plane slab of a 2.5D model (a batch's
        ``ct_context``), else the one slice (``ct``); :func:`generator_input` picks it.
        """
        self._check_channels(ct, generator_in_channels(self.model_cfg), "CT")
        return _run_eval(self.generators["ct2hist"], ct)

    def _g_input(self, x: Tensor) -> Tensor:
        """An image without neighbouring planes (a fake CT, the identity term's histology)
        as the CT→histology generator's input: unchanged when its channels fit (always
        for k = 1, and for k = 3 with 3-channel images), else its channel mean repeated k
        times, a slab constant along the stacking axis."""
        k = self.model_cfg.context_slices
        if k == 1 or x.shape[1] == k:
            return x
        return x.mean(1, keepdim=True).expand(-1, k, -1, -1)

    def unstain(self, hist: Tensor) -> Tensor:
        raise NotImplementedError

    # -- state
    def state_dict(self, include: Iterable[str] = STATE_PARTS) -> dict[str, Any]:
        """Raw nets and image pools as tensors and plain containers (weights_only-safe).

        ``include`` picks the parts (``generators``, ``discriminators``, ``pools``): the
        trainer's ``latest.pt`` keeps the nets here and every rank's pools apart, the
        ``min-*.pt`` files only the generators (:meth:`generator_state_dict`).
        """
        parts = tuple(include)
        unknown = sorted(set(parts) - set(STATE_PARTS))
        if unknown:
            raise UsageError(f"model state: unknown parts {unknown} (choose from "
                             f"{', '.join(STATE_PARTS)})")
        out: dict[str, Any] = {}
        if "generators" in parts:
            out["generators"] = {k: dict(n.state_dict()) for k, n in self.generators.items()}
        if "discriminators" in parts:
            out["discriminators"] = {k: dict(n.state_dict())
                                     for k, n in self.discriminators.items()}
        if "pools" in parts:
            out["pools"] = {k: p.state_dict() for k, p in self.pools.items()}
        return out

    def generator_state_dict(self) -> dict[str, Any]:
        """Only the generators: all inference needs (``min-*.pt``, pinned generators)."""
        return self.state_dict(include=("generators",))

    def load_state_dict(self, state: dict[str, Any], generators_only: bool = False) -> None:
        """Load what :meth:`state_dict` wrote; a missing or misshapen net is an InputError.

        ``generators_only`` loads just the generators (inference) and ignores
        discriminators and pools, present or not. Otherwise the discriminators are required
        too, and pools are loaded when the state has them (the trainer keeps them in
        ``pools_by_rank``).
        """
        groups = [("generators", self.generators)]
        if not generators_only:
            groups.append(("discriminators", self.discriminators))
        for group, nets in groups:
            saved = state.get(group, {})
            for name, net in nets.items():
                if name not in saved:
                    raise InputError(f"model state: no {group[:-1]} {name!r} "
                                     f"(has {sorted(saved)})")
                try:
                    net.load_state_dict(saved[name])
                except RuntimeError as exc:
                    detail = " ".join(line.strip() for line in str(exc).splitlines())
                    raise InputError(f"model state: {group[:-1]} {name!r} does not fit the "
                                     f"architecture: {detail[:400]}") from None
        if generators_only:
            return
        for name, pool in self.pools.items():
            if name in state.get("pools", {}):
                pool.load_state_dict(state["pools"][name])

    def architecture(self) -> dict[str, Any]:
        return architecture_of(self.model_cfg)

    # -- per-family pieces
    def _forward_generators(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _generator_losses(self, batch: dict[str, Tensor],
                          fakes: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _generator_weights(self) -> dict[str, float]:
        raise NotImplementedError

    def _discriminator_losses(self, batch: dict[str, Tensor],
                              fakes: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    @property
    def adversarial(self) -> bool:
        """False when ``loss.lambda_gan`` is 0 for the whole run (the tissue recipe): the
        discriminators are then neither run nor trained. Their terms would be weighted 0,
        so the generator's update is the same; only their cost goes (and their log rows)."""
        return float(getattr(self.loss_cfg, "lambda_gan", 1.0)) != 0.0

    def _gan_weight(self) -> float:
        """``loss.lambda_gan``, 0 for the first ``loss.gan_start`` steps (pixel warm-up)."""
        if self.steps_done < int(getattr(self.loss_cfg, "gan_start", 0)):
            return 0.0
        return float(getattr(self.loss_cfg, "lambda_gan", 1.0))

    def _weighted_total(self, terms: dict[str, Tensor]) -> Tensor:
        weights = dict(self._generator_weights())
        gan = self._gan_weight()
        if gan != 1.0:
            weights.update({k: gan * w for k, w in weights.items() if k.startswith("G_gan")})
        return sum((weights[k] * v for k, v in terms.items()), torch.zeros((), device=self.device))

    # -- checks
    def _check_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        for key in ("ct", "histology"):
            if key not in batch:
                raise InputError(f"training batch: no {key!r} entry (has {sorted(batch)})")
        self._check_channels(batch["ct"], self.model_cfg.ct_channels, "CT")
        self._check_channels(batch["histology"], self.model_cfg.histology_channels, "histology")
        k = self.model_cfg.context_slices
        if k > 1:
            if "ct_context" not in batch:
                raise InputError(f"training batch: model.context_slices={k} needs the CT "
                                 "slab ('ct_context'); the pairs need a ct_slab column")
            self._check_channels(batch["ct_context"], k, "CT slab")
        return batch

    def _check_channels(self, x: Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"{what} batch: expected (B, {channels}, H, W), "
                             f"got {tuple(x.shape)}")
        multiple = getattr(self.generators["ct2hist"], "size_multiple", 1)
        h, w = x.shape[-2:]
        if h % multiple or w % multiple:
            raise InputError(f"{what} batch: patch {h}×{w} is not a multiple of {multiple} "
                             f"pixels ({self.model_cfg.generator} generator)")


class CycleGAN(GanModel):
    """Paired CycleGAN: G = ct2hist, F = hist2ct, D_hist, D_ct (Eq. 7; Eq. 4 when λpx=λgs=0).

    Loss terms (each ℓ1 masked): GAN both ways (Eq. 2), cycle (Eq. 1), identity (Eq. 3),
    pixelwise supervision both ways (Eq. 5), greyscale of F(hist) (Eq. 6, 3-channel CT).
    With ``model.align`` the pixel terms compare outputs warped by the registration net.
    """

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig,
                 device: str | torch.device, seed: int = 0, rank: int = 0) -> None:
        super().__init__(model_cfg, loss_cfg, device, seed, rank)
        c_ct, c_hist = model_cfg.ct_channels, model_cfg.histology_channels
        if loss_cfg.lambda_id > 0 and c_ct != c_hist:
            raise ConfigError(f"loss.lambda_id: the identity loss needs model.ct_channels "
                              f"({c_ct}) == model.histology_channels ({c_hist}); set "
                              "loss.lambda_id=0")
        c_in = generator_in_channels(model_cfg)
        self.generators = {"ct2hist": self._new_net(build_generator(model_cfg, c_in, c_hist)),
                           "hist2ct": self._new_net(build_generator(model_cfg, c_hist, c_ct))}
        self.discriminators = {"hist": self._new_net(build_discriminator(model_cfg, c_hist)),
                               "ct": self._new_net(build_discriminator(model_cfg, c_ct))}
        self.pools = {"hist": self._new_pool(0), "ct": self._new_pool(1)}
        self._add_registration(loss_cfg.lambda_px > 0, "loss.lambda_px")
        self._finish_init()

    @torch.no_grad()
    def unstain(self, hist: Tensor) -> Tensor:
        """Histology → CT with the raw generator in eval mode, no grad."""
        self._check_channels(hist, self.model_cfg.histology_channels, "histology")
        return _run_eval(self.generators["hist2ct"], hist)

    def _generator_weights(self) -> dict[str, float]:
        lam = self._lam
        return {"G_gan_ct2hist": 1.0, "G_gan_hist2ct": 1.0,
                "cycle_ct": lam("lambda_cyc"), "cycle_hist": lam("lambda_cyc"),
                "identity_ct": lam("lambda_id"), "identity_hist": lam("lambda_id"),
                "pixel_ct2hist": lam("lambda_px"), "pixel_hist2ct": lam("lambda_px"),
                "greyscale": lam("lambda_gs"), **self._align_weights()}

    def _forward_generators(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        g, f = self._run_g["ct2hist"], self._run_g["hist2ct"]
        ct, hist = batch["ct"], batch["histology"]
        out = {"fake_hist": g(generator_input(batch)), "fake_ct": f(hist)}
        if self._lam("lambda_cyc") > 0:
            out["rec_ct"] = f(out["fake_hist"])
            out["rec_hist"] = g(self._g_input(out["fake_ct"]))
        if self._lam("lambda_id") > 0:
            out["idt_ct"] = f(ct)
            out["idt_hist"] = g(self._g_input(hist))
        if self._lam("lambda_px") > 0:
            self._register(out, hist)
        return out

    def _generator_losses(self, batch: dict[str, Tensor],
                          fakes: dict[str, Tensor]) -> dict[str, Tensor]:
        ct, hist, m = batch["ct"], batch["histology"], batch.get("mask")
        mode, lam = self.loss_cfg.gan_mode, self._lam
        terms = {
            "G_gan_ct2hist": gan_loss(self.discriminators["hist"](fakes["fake_hist"]), True, mode),
            "G_gan_hist2ct": gan_loss(self.discriminators["ct"](fakes["fake_ct"]), True, mode),
        } if self.adversarial else {}
        if lam("lambda_cyc") > 0:
            terms["cycle_ct"] = masked_l1(fakes["rec_ct"], ct, m)
            terms["cycle_hist"] = masked_l1(fakes["rec_hist"], hist, m)
        if lam("lambda_id") > 0:
            terms["identity_ct"] = masked_l1(fakes["idt_ct"], ct, m)
            terms["identity_hist"] = masked_l1(fakes["idt_hist"], hist, m)
        if lam("lambda_px") > 0:
            fake_hist, fake_ct = fakes["fake_hist"], fakes["fake_ct"]
            if "disp" in fakes:  # model.align: G(ct) onto the histology, F(hist) back
                d = self._pixel_field(fakes["disp"])
                fake_hist, fake_ct = warp(fake_hist, d), warp(fake_ct, -d)
            if self.model_cfg.align:
                terms.update(self._align_terms(batch, fakes.get("disp")))
            terms["pixel_ct2hist"] = masked_l1(fake_hist, hist, m)
            terms["pixel_hist2ct"] = masked_l1(fake_ct, ct, m)
        if lam("lambda_gs") > 0 and self.model_cfg.ct_channels == 3:
            terms["greyscale"] = greyscale_loss(fakes["fake_ct"], m)
        return terms

    def _discriminator_losses(self, batch: dict[str, Tensor],
                              fakes: dict[str, Tensor]) -> dict[str, Tensor]:
        mode = self.loss_cfg.gan_mode
        d_hist, d_ct = self._run_d["hist"], self._run_d["ct"]
        old_hist = self.pools["hist"].query(fakes["fake_hist"])
        old_ct = self.pools["ct"].query(fakes["fake_ct"])
        return {
            "D_hist": discriminator_loss(d_hist(batch["histology"]), d_hist(old_hist), mode),
            "D_ct": discriminator_loss(d_ct(batch["ct"]), d_ct(old_ct), mode),
        }


class Pix2Pix(GanModel):
    """Pix2Pix (Eq. 10): G = ct2hist, conditional PatchGAN on (CT, histology) channel pairs.

    The pool (``model.pool_size``; canonical pix2pix uses 0) stores whole (CT, fake) pairs.
    """

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig,
                 device: str | torch.device, seed: int = 0, rank: int = 0) -> None:
        super().__init__(model_cfg, loss_cfg, device, seed, rank)
        c_ct, c_hist = model_cfg.ct_channels, model_cfg.histology_channels
        c_in = generator_in_channels(model_cfg)
        self.generators = {"ct2hist": self._new_net(build_generator(model_cfg, c_in, c_hist))}
        self.discriminators = {"hist": self._new_net(build_discriminator(model_cfg,
                                                                         c_ct + c_hist))}
        self.pools = {"hist": self._new_pool(0)}
        self._add_registration(loss_cfg.lambda_l1 > 0, "loss.lambda_l1")
        self._finish_init()

    def unstain(self, hist: Tensor) -> Tensor:
        raise UsageError("pix2pix has no histology→CT generator: unstain needs a CycleGAN "
                         "(modcyclegan/cyclegan) checkpoint")

    def _generator_weights(self) -> dict[str, float]:
        return {"G_gan_ct2hist": 1.0, "pixel_ct2hist": self._lam("lambda_l1"),
                **self._align_weights()}

    def _forward_generators(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {"fake_hist": self._run_g["ct2hist"](generator_input(batch))}
        if self._lam("lambda_l1") > 0:
            self._register(out, batch["histology"])
        return out

    def _generator_losses(self, batch: dict[str, Tensor],
                          fakes: dict[str, Tensor]) -> dict[str, Tensor]:
        ct, fake = batch["ct"], fakes["fake_hist"]
        terms: dict[str, Tensor] = {}
        if self.adversarial:
            pair = torch.cat([ct.to(fake.dtype), fake], dim=1)
            terms["G_gan_ct2hist"] = gan_loss(self.discriminators["hist"](pair), True,
                                              self.loss_cfg.gan_mode)
        if self._lam("lambda_l1") > 0:
            if self.model_cfg.align:
                terms.update(self._align_terms(batch, fakes.get("disp")))
            if "disp" in fakes:  # model.align: the output warped onto the histology
                fake = warp(fake, self._pixel_field(fakes["disp"]))
            terms["pixel_ct2hist"] = masked_l1(fake, batch["histology"], batch.get("mask"))
        return terms

    def _discriminator_losses(self, batch: dict[str, Tensor],
                              fakes: dict[str, Tensor]) -> dict[str, Tensor]:
        d = self._run_d["hist"]
        ct = batch["ct"]
        real = torch.cat([ct, batch["histology"]], dim=1)
        fake = self.pools["hist"].query(torch.cat([ct.float(), fakes["fake_hist"].float()], 1))
        return {"D_hist": discriminator_loss(d(real), d(fake), self.loss_cfg.gan_mode)}


# --------------------------------------------------------------------------- building


def check_architecture(saved: dict[str, Any], model_cfg: ModelConfig,
                       source: str = "checkpoint") -> None:
    """Raise InputError naming every architecture key where ``saved`` and the config differ."""
    expected = {**architecture_of(model_cfg), "context_slices": model_cfg.context_slices}
    saved = {"context_slices": 1, **saved}  # older checkpoints: one slice
    diffs = [f"{k}: {source} has {saved.get(k, '<missing>')!r}, config has {v!r}"
             for k, v in expected.items() if saved.get(k, "<missing>") != v]
    if diffs:
        raise InputError(f"{source}: architecture differs from model config: "
                         + "; ".join(diffs))


def model_config_of(arch: dict[str, Any], source: str = "checkpoint") -> ModelConfig:
    """The :class:`ModelConfig` a saved :meth:`GanModel.architecture` describes."""
    missing = [k for k in ARCHITECTURE_KEYS if k not in arch]
    if missing:
        raise InputError(f"{source}: architecture lacks {missing}")
    known = {f.name for f in fields(ModelConfig)}
    try:
        return build(ModelConfig, {k: (v, source) for k, v in arch.items() if k in known})
    except HpcstainError as exc:
        raise InputError(f"{source}: unusable architecture: {exc}") from None


# --------------------------------------------------------------------------- helpers


def generator_input(batch: dict[str, Tensor]) -> Tensor:
    """What the CT→histology generator sees of a batch: the k-plane slab ``ct_context``
    of a 2.5D model when the batch has one, else the slice ``ct``."""
    return batch["ct_context"] if "ct_context" in batch else batch["ct"]


def backward_step(loss: Tensor, opt: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None) -> None:
    """Backward + step, through the GradScaler when fp16 needs one."""
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)


def _run_eval(net: nn.Module, x: Tensor) -> Tensor:
    """Forward in eval mode, restoring the net's previous mode."""
    was_training = net.training
    net.eval()
    try:
        return net(x)
    finally:
        net.train(was_training)
