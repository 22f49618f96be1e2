"""GAN variants: one training step, loss bookkeeping, state round trip, wrap(), inference."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from torch import nn

from hpcstain.config import LossConfig, ModelConfig
from hpcstain.errors import ConfigError, InputError, UsageError
from hpcstain.models import (
    CycleGAN,
    Pix2Pix,
    build_model,
    build_model_from_architecture,
    check_architecture,
)
from hpcstain.models.networks import inert_biases

torch.set_num_threads(1)

TINY = ModelConfig(ngf=8, ndf=8, n_blocks=2)
PAPER_WEIGHTS = LossConfig()  # λcyc 6, λid 3, λpx 6, λgs 1
STANDARD_WEIGHTS = LossConfig(lambda_px=0.0, lambda_gs=0.0)  # Eq. 4
ALL_CYCLEGAN_TERMS = {"G_gan_ct2hist", "G_gan_hist2ct", "cycle_ct", "cycle_hist",
                      "identity_ct", "identity_hist", "pixel_ct2hist", "pixel_hist2ct",
                      "greyscale", "G_total", "D_hist", "D_ct"}


def paired_batch(batch: int = 2, size: int = 32) -> dict[str, torch.Tensor]:
    """A smooth greyscale CT and a fixed colour mapping of it as 'histology'."""
    y, x = torch.meshgrid(torch.linspace(0, 6.28, size), torch.linspace(0, 6.28, size),
                          indexing="ij")
    grey = torch.stack([torch.sin(x) * torch.cos(y), torch.sin(2 * x + y)])[:batch] * 0.8
    ct = grey[:, None].expand(batch, 3, size, size).contiguous()
    hist = torch.stack([-0.6 * grey + 0.1, -0.9 * grey - 0.2, 0.3 * grey + 0.5], dim=1)
    mask = torch.ones(batch, 1, size, size)
    mask[..., : size // 5] = 0
    return {"ct": ct, "histology": hist, "mask": mask}


def optimisers(model, lr: float = 2e-3) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    return (torch.optim.Adam(model.parameters_g(), lr, betas=(0.5, 0.999)),
            torch.optim.Adam(model.parameters_d(), lr, betas=(0.5, 0.999)))


def test_build_model_dispatches_on_variant() -> None:
    for variant in ("modcyclegan", "cyclegan"):
        model = build_model(replace(TINY, variant=variant), PAPER_WEIGHTS, "cpu")
        assert isinstance(model, CycleGAN)
        assert set(model.generators) == {"ct2hist", "hist2ct"}
        assert set(model.discriminators) == {"hist", "ct"}
    p2p = build_model(replace(TINY, variant="pix2pix", generator="unet256", ngf=2),
                      PAPER_WEIGHTS, "cpu")
    assert isinstance(p2p, Pix2Pix)
    assert set(p2p.generators) == {"ct2hist"} and set(p2p.discriminators) == {"hist"}
    first_conv = next(m for m in p2p.discriminators["hist"].modules()
                      if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 6  # conditional: CT + histology channels


def test_same_seed_same_weights_on_every_rank() -> None:
    a = build_model(TINY, PAPER_WEIGHTS, "cpu", seed=3, rank=0)
    b = build_model(TINY, PAPER_WEIGHTS, "cpu", seed=3, rank=1)
    c = build_model(TINY, PAPER_WEIGHTS, "cpu", seed=4)
    pa, pb, pc = a.parameters_g(), b.parameters_g(), c.parameters_g()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert not all(torch.equal(x, z) for x, z in zip(pa, pc, strict=True))


def test_training_steps_reduce_the_pixel_loss() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, PAPER_WEIGHTS, "cpu")
    opt_g, opt_d = optimisers(model)
    batch = paired_batch()
    history = [model.train_step(batch, opt_g, opt_d)["pixel_ct2hist"] for _ in range(15)]
    assert history[-1] < 0.5 * history[0]


def test_modified_cyclegan_returns_every_term_and_weights_its_total() -> None:
    model = build_model(TINY, PAPER_WEIGHTS, "cpu")
    losses = model.train_step(paired_batch(), *optimisers(model))
    assert set(losses) == ALL_CYCLEGAN_TERMS
    weighted = (losses["G_gan_ct2hist"] + losses["G_gan_hist2ct"]
                + 6 * (losses["cycle_ct"] + losses["cycle_hist"])
                + 3 * (losses["identity_ct"] + losses["identity_hist"])
                + 6 * (losses["pixel_ct2hist"] + losses["pixel_hist2ct"])
                + 1 * losses["greyscale"])
    assert losses["G_total"] == pytest.approx(weighted, rel=1e-5)
    assert all(isinstance(v, float) for v in losses.values())


def test_zero_weighted_terms_are_absent() -> None:
    model = build_model(replace(TINY, variant="cyclegan"), STANDARD_WEIGHTS, "cpu")
    losses = model.train_step(paired_batch(), *optimisers(model))
    assert set(losses) == ALL_CYCLEGAN_TERMS - {"pixel_ct2hist", "pixel_hist2ct", "greyscale"}
    no_id = build_model(TINY, replace(PAPER_WEIGHTS, lambda_id=0.0, lambda_cyc=0.0), "cpu")
    losses = no_id.train_step(paired_batch(), *optimisers(no_id))
    assert not {"identity_ct", "identity_hist", "cycle_ct", "cycle_hist"} & set(losses)


def test_greyscale_term_only_for_three_channel_ct() -> None:
    model = build_model(replace(TINY, ct_channels=1), replace(PAPER_WEIGHTS, lambda_id=0.0),
                        "cpu")
    batch = paired_batch()
    batch["ct"] = batch["ct"][:, :1]
    losses = model.train_step(batch, *optimisers(model))
    assert "greyscale" not in losses and "pixel_hist2ct" in losses


def test_identity_loss_with_unequal_channels_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"loss\.lambda_id"):
        build_model(replace(TINY, ct_channels=1), PAPER_WEIGHTS, "cpu")


def test_every_l1_term_ignores_pixels_outside_the_mask() -> None:
    model = build_model(TINY, PAPER_WEIGHTS, "cpu")
    batch = paired_batch()
    with torch.no_grad():
        fakes = model._forward_generators(batch)
        before = model._generator_losses(batch, fakes)
        outside = (batch["mask"] == 0).expand(-1, 3, -1, -1)
        changed = {k: v.masked_fill(outside, 0.7) for k, v in batch.items() if k != "mask"}
        changed["mask"] = batch["mask"]
        after = model._generator_losses(changed, {k: v.masked_fill(outside, -0.3)
                                                  for k, v in fakes.items()})
    l1_terms = [k for k in before if not k.startswith("G_gan")]
    assert len(l1_terms) == 7
    for k in l1_terms:
        assert after[k].item() == pytest.approx(before[k].item(), rel=1e-6), k


def test_pix2pix_step_returns_gan_l1_and_total() -> None:
    cfg = replace(TINY, variant="pix2pix", generator="unet256", ngf=2, ndf=2,
                  use_dropout=True, pool_size=0)
    model = build_model(cfg, LossConfig(lambda_l1=20.0), "cpu")
    losses = model.train_step(paired_batch(batch=1, size=256), *optimisers(model))
    assert set(losses) == {"G_gan_ct2hist", "pixel_ct2hist", "G_total", "D_hist"}
    assert losses["G_total"] == pytest.approx(
        losses["G_gan_ct2hist"] + 20 * losses["pixel_ct2hist"], rel=1e-5)


def test_pix2pix_has_no_unstain() -> None:
    model = build_model(replace(TINY, variant="pix2pix", generator="unet256", ngf=2),
                        PAPER_WEIGHTS, "cpu")
    with pytest.raises(UsageError, match="pix2pix"):
        model.unstain(torch.zeros(1, 3, 256, 256))


def test_stain_is_deterministic_and_keeps_training_mode() -> None:
    model = build_model(replace(TINY, use_dropout=True), PAPER_WEIGHTS, "cpu")
    ct = paired_batch()["ct"]
    a, b = model.stain(ct), model.stain(ct)
    assert torch.equal(a, b) and not a.requires_grad
    assert a.shape == (2, 3, 32, 32)
    assert model.generators["ct2hist"].training
    assert model.unstain(paired_batch()["histology"]).shape == (2, 3, 32, 32)


def test_bad_batches_are_input_errors() -> None:
    model = build_model(TINY, PAPER_WEIGHTS, "cpu")
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        model.stain(torch.zeros(1, 1, 32, 32))
    with pytest.raises(InputError, match="multiple of 4"):
        model.stain(torch.zeros(1, 3, 30, 32))


def test_state_dict_round_trips_through_weights_only_load() -> None:
    model = build_model(TINY, PAPER_WEIGHTS, "cpu", seed=0)
    opt_g, opt_d = optimisers(model)
    batch = paired_batch()
    for _ in range(2):
        model.train_step(batch, opt_g, opt_d)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restored = build_model(TINY, PAPER_WEIGHTS, "cpu", seed=1, rank=3)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(model.stain(batch["ct"]), restored.stain(batch["ct"]))
    assert torch.equal(model.unstain(batch["histology"]), restored.unstain(batch["histology"]))
    for name in ("hist", "ct"):
        fakes = torch.rand(4, 3, 32, 32)
        assert torch.equal(model.pools[name].query(fakes), restored.pools[name].query(fakes))


def test_load_state_dict_of_another_architecture_is_an_input_error() -> None:
    state = build_model(TINY, PAPER_WEIGHTS, "cpu").state_dict()
    other = build_model(replace(TINY, ngf=4), PAPER_WEIGHTS, "cpu")
    with pytest.raises(InputError, match="ct2hist"):
        other.load_state_dict(state)


def test_check_architecture_names_the_differing_keys() -> None:
    saved = build_model(TINY, PAPER_WEIGHTS, "cpu").architecture()
    check_architecture(saved, TINY)  # same config: no error
    with pytest.raises(InputError, match=r"ngf.*n_blocks") as err:
        check_architecture(saved, replace(TINY, ngf=16, n_blocks=9), source="run/latest.pt")
    assert "run/latest.pt" in str(err.value) and "ndf" not in str(err.value)


def test_architecture_rebuilds_the_model_alone() -> None:
    cfg = replace(TINY, upsampling="resize", norm="batch")
    model = build_model(cfg, PAPER_WEIGHTS, "cpu")
    arch = model.architecture()
    assert all(isinstance(v, str | int | bool) for v in arch.values())
    rebuilt = build_model_from_architecture(arch, "cpu")
    rebuilt.load_state_dict(model.state_dict())
    ct = paired_batch()["ct"]
    assert torch.equal(model.stain(ct), rebuilt.stain(ct))
    with pytest.raises(InputError, match="lacks"):
        build_model_from_architecture({k: v for k, v in arch.items() if k != "ngf"}, "cpu")
    with pytest.raises(InputError, match="norm"):
        build_model_from_architecture({**arch, "norm": "group"}, "cpu")


class Counting(nn.Module):
    """An identity-like wrapper (as DDP is) that records each call."""

    def __init__(self, module: nn.Module, calls: list[tuple[int, bool]]) -> None:
        super().__init__()
        self.module = module
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((id(self.module), all(p.requires_grad
                                                for p in self.module.parameters())))
        return self.module(x)


def test_wrap_routes_backward_nets_through_the_wrapper_and_still_trains() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, PAPER_WEIGHTS, "cpu")
    opt_g, opt_d = optimisers(model)
    calls: list[tuple[int, bool]] = []
    model.wrap(lambda net: Counting(net, calls))
    before = [p.detach().clone() for p in model.parameters_g() + model.parameters_d()]
    batch = paired_batch()
    first = model.train_step(batch, opt_g, opt_d)
    g_ids = {id(n) for n in model.generators.values()}
    d_calls = [c for c in calls if c[0] not in g_ids]
    assert sum(c[0] in g_ids for c in calls) == 6  # fake, cycle, identity per direction
    assert len(d_calls) == 4 and all(trainable for _, trainable in d_calls)  # D step only
    after = model.parameters_g() + model.parameters_d()
    inert = {id(b) for net in [*model.generators.values(), *model.discriminators.values()]
             for b in inert_biases(net)}
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new) == (id(new) in inert)  # only the inert biases stay put
    for _ in range(14):
        last = model.train_step(batch, opt_g, opt_d)
    assert last["pixel_ct2hist"] < 0.5 * first["pixel_ct2hist"]
    assert isinstance(model.generators["ct2hist"], nn.Module)
    assert not isinstance(model.generators["ct2hist"], Counting)  # raw nets kept


def test_vanilla_gan_mode_trains() -> None:
    model = build_model(TINY, replace(PAPER_WEIGHTS, gan_mode="vanilla"), "cpu")
    losses = model.train_step(paired_batch(), *optimisers(model))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses["D_hist"] == pytest.approx(losses["D_hist"])  # not NaN


def test_fp16_style_scaler_path_runs_on_cpu() -> None:
    model = build_model(TINY, PAPER_WEIGHTS, "cpu")
    opt_g, opt_d = optimisers(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters_g()]
    losses = model.train_step(paired_batch(), opt_g, opt_d, scaler=scaler)
    assert "G_total" in losses
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters_g(), strict=True))


def test_bf16_autocast_step_reports_float32_losses() -> None:
    model = build_model(TINY, PAPER_WEIGHTS, "cpu")
    opt_g, opt_d = optimisers(model)

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    losses = model.train_step(paired_batch(), opt_g, opt_d, autocast)
    assert set(losses) == ALL_CYCLEGAN_TERMS
    assert all(v == v and abs(v) < 1e4 for v in losses.values())  # finite, not NaN
    assert all(p.dtype == torch.float32 for p in model.parameters_g())
