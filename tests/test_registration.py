"""Learned alignment (model.align): the registration net, the warp, paired training with it,
and the phantom's misalignment knob."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from micro import StopAfter, micro_config
from PIL import Image
from scipy import ndimage

from hpcstain.checkpoint import load_checkpoint
from hpcstain.config import LossConfig, ModelConfig
from hpcstain.errors import ConfigError, UsageError
from hpcstain.inference import load_generator
from hpcstain.models import build_model
from hpcstain.models.gans import REGISTRATION
from hpcstain.models.registration import build_registration, edge_misfit, smoothness, warp
from hpcstain.phantom import write_pairs
from hpcstain.phantom.pairs import SUPERSAMPLE, _warp
from hpcstain.predict import predict_files
from hpcstain.tiles import Tiling
from hpcstain.train.logs import read_losses
from hpcstain.train.trainer import train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def smooth_image(seed: int, size: int = 48, channels: int = 3) -> np.ndarray:
    """A smooth random (C, H, W) image in about [-1, 1]: blobs a few pixels wide."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal((channels, size, size)), (0, 2.5, 2.5),
                                mode="wrap")
    return (a / np.abs(a).max()).astype(np.float32)


# --------------------------------------------------------------------------- warp and net


def test_zero_field_is_the_identity_warp() -> None:
    img = torch.from_numpy(smooth_image(0))[None]
    out = warp(img, torch.zeros(1, 2, 48, 48))
    assert torch.allclose(out, img, atol=1e-6)


def test_a_constant_field_samples_that_many_pixels_away() -> None:
    img = torch.from_numpy(smooth_image(1))[None]
    d = torch.zeros(1, 2, 48, 48)
    d[:, 0], d[:, 1] = 2.0, -3.0            # out(y, x) = img(y + 2, x - 3)
    out = warp(img, d)
    assert torch.allclose(out[..., 5:40, 5:40], img[..., 7:42, 2:37], atol=1e-5)


def test_registration_net_starts_at_zero_displacement() -> None:
    net = build_registration(3, 8, torch.Generator().manual_seed(0))
    a, b = (torch.from_numpy(smooth_image(s))[None] for s in (2, 3))
    disp = net(a, b)
    assert disp.shape == (1, 2, 48, 48)
    assert torch.count_nonzero(disp) == 0
    assert torch.equal(warp(a, disp), warp(a, torch.zeros_like(disp)))
    # not a dead net: the hidden layers are initialised, only the output conv is zero
    assert all(p.abs().sum() > 0 for n, p in net.named_parameters()
               if n.endswith("weight") and not n.startswith("flow"))


def test_smoothness_is_zero_for_a_constant_field_and_grows_with_its_gradient() -> None:
    const = torch.full((2, 2, 16, 16), 1.5)
    assert smoothness(const).item() == 0.0
    ramp = torch.arange(16.0).expand(2, 2, 16, 16)      # slope 1 px/px along x
    assert smoothness(ramp).item() == pytest.approx(1.0)
    assert smoothness(2 * ramp).item() == pytest.approx(4.0)


def test_registration_recovers_a_known_shift() -> None:
    """fixed(p) = moving(p + u): a few Adam steps on this one pair drive the field to u."""
    torch.manual_seed(0)
    u = (1.5, -1.0)
    moving_np = smooth_image(4)
    fixed_np = ndimage.shift(moving_np, (0, -u[0], -u[1]), order=3, mode="wrap")
    moving, fixed = torch.from_numpy(moving_np)[None], torch.from_numpy(fixed_np)[None]
    net = build_registration(3, 8, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    inner = (..., slice(8, 40), slice(8, 40))          # away from the border padding

    def error() -> float:
        with torch.no_grad():
            return (warp(moving, net(moving, fixed)) - fixed)[inner].abs().mean().item()

    before = error()
    for _ in range(25):
        opt.zero_grad()
        disp = net(moving, fixed)
        loss = (warp(moving, disp) - fixed)[inner].abs().mean() + 0.1 * smoothness(disp)
        loss.backward()
        opt.step()
    after = error()
    with torch.no_grad():
        mean = net(moving, fixed)[inner].mean(dim=(-2, -1))[0]
    assert after < 0.25 * before, (before, after)
    assert mean[0].item() == pytest.approx(u[0], abs=0.3)
    assert mean[1].item() == pytest.approx(u[1], abs=0.3)


# --------------------------------------------------------------------------- in the GANs


def tiny_cfg(variant: str = "modcyclegan", **kw: object) -> ModelConfig:
    kw = {"align": True, **kw}
    return ModelConfig(variant=variant, generator="resnet", ngf=4, ndf=4, n_blocks=1,  # type: ignore[arg-type]
                       align_width=8, **kw)  # type: ignore[arg-type]


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ct": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
            "histology": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
            "mask": torch.ones(2, 1, 32, 32)}


@pytest.mark.parametrize("variant", ["modcyclegan", "pix2pix"])
def test_align_step_trains_the_registration_net_with_the_generators(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(variant), LossConfig(), "cpu", seed=0)
    reg = model.generators[REGISTRATION]
    assert {id(p) for p in reg.parameters()} <= {id(p) for p in model.parameters_g()}
    opt_g = torch.optim.Adam(model.parameters_g(), lr=1e-3)
    opt_d = torch.optim.Adam(model.parameters_d(), lr=1e-3)
    losses = model.train_step(batch(), opt_g, opt_d)
    assert losses["align_smooth"] == 0.0                 # identity field at the first step
    assert reg.flow.weight.abs().sum() > 0               # ... but the net received gradient
    losses = model.train_step(batch(1), opt_g, opt_d)
    assert losses["align_smooth"] > 0.0
    assert all(np.isfinite(v) for v in losses.values())


def test_align_without_the_pixel_loss_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.align.*lambda_px"):
        build_model(tiny_cfg(), LossConfig(lambda_px=0.0, lambda_gs=0.0), "cpu")


def test_align_off_builds_no_registration_net() -> None:
    model = build_model(ModelConfig(ngf=4, ndf=4, n_blocks=1), LossConfig(), "cpu")
    assert REGISTRATION not in model.generators


def test_aligned_training_checkpoint_loads_for_predict(tmp_path: Path) -> None:
    manifest = write_pairs(tmp_path / "pairs", n=2, seed=5, size=(64, 64), misalignment=3.0)
    cfg = micro_config(manifest, "train.max_steps=2", "train.checkpoint_every=0",
                       "model.align=true", "model.align_width=8")
    result = train(cfg, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    assert REGISTRATION in ckpt["model"]["generators"]   # training state keeps it (resume)
    assert "align" not in ckpt["architecture"]           # inference never needs it
    stainer = load_generator(result.checkpoint)          # the generator alone
    out = stainer.fn(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    ct = Path(manifest).parent / "ct" / "pair_000.tif"
    paths = predict_files([str(ct)], result.checkpoint, tmp_path / "out",
                          tiling=Tiling(32, 16, "hann"))
    with Image.open(paths[0]) as img:
        assert np.asarray(img).shape == (64, 64, 3)


# --------------------------------------------------------------------------- warm start


def _copy(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("variant", ["modcyclegan", "pix2pix"])
def test_before_align_start_training_is_align_off_and_r_gets_no_gradient(variant: str) -> None:
    """Warm start: the first align_start steps are the unaligned recipe bit for bit (the
    registration net is built after the other nets, so they start from the same weights),
    with R untouched; at the start step R receives gradient and the field moves."""
    models = {on: build_model(tiny_cfg(variant, align=on, align_start=2), LossConfig(), "cpu",
                              seed=0) for on in (True, False)}
    opts = {on: (torch.optim.Adam(m.parameters_g(), lr=1e-3),
                 torch.optim.Adam(m.parameters_d(), lr=1e-3)) for on, m in models.items()}
    reg = models[True].generators[REGISTRATION]
    r0 = _copy(reg)
    for step in range(2):
        assert not models[True].aligning
        losses = {on: m.train_step(batch(step), *opts[on]) for on, m in models.items()}
        assert losses[True].pop("align_smooth") == 0.0        # logged: the identity field
        assert losses[True] == losses[False]
        assert all(p.grad is None for p in reg.parameters())
    for name in ("ct2hist", "hist2ct"):
        if name in models[False].generators:
            a, b = (_copy(models[on].generators[name]) for on in (True, False))
            assert all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(v, r0[k]) for k, v in reg.state_dict().items())
    assert not any(id(p) in {id(q) for q in reg.parameters()} for p in opts[True][0].state)
    assert models[True].aligning                               # step 3: the warp is on
    models[True].train_step(batch(2), *opts[True])
    assert reg.flow.weight.abs().sum() > 0
    assert models[True].train_step(batch(3), *opts[True])["align_smooth"] > 0.0


@pytest.mark.parametrize("variant", ["modcyclegan", "pix2pix"])
def test_align_by_edges_keeps_the_pixel_loss_out_of_the_registration_net(variant: str) -> None:
    """With model.align_by=edges the registration net's first update is the same whatever
    the pixel loss weighs (only the edge and smoothness terms reach it); with the default
    (pixel) it is not."""
    px = "lambda_px" if variant == "modcyclegan" else "lambda_l1"

    def first_update(align_by: str, weight: float) -> dict[str, torch.Tensor]:
        model = build_model(tiny_cfg(variant, align_ngf=1.0, align_by=align_by),
                            LossConfig(**{px: weight}), "cpu", seed=0)
        opt_g = torch.optim.SGD(model.parameters_g(), lr=1e-2)
        opt_d = torch.optim.SGD(model.parameters_d(), lr=1e-2)
        model.train_step(batch(), opt_g, opt_d)
        return _copy(model.generators[REGISTRATION])

    for align_by, same in (("edges", True), ("pixel", False)):
        a, b = first_update(align_by, 1.0), first_update(align_by, 50.0)
        assert all(torch.equal(a[k], b[k]) for k in a) is same, align_by


def test_align_by_edges_needs_the_edge_term() -> None:
    with pytest.raises(ConfigError, match="align_ngf"):
        build_model(tiny_cfg(align_by="edges"), LossConfig(), "cpu")
    with pytest.raises(ConfigError, match="align_by"):
        build_model(tiny_cfg(align_by="warp", align_ngf=1.0), LossConfig(), "cpu")


def test_a_bad_align_start_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.align_start"):
        build_model(tiny_cfg(align_start=-1), LossConfig(), "cpu")


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "m3", n=2, seed=5, size=(64, 64),
                       misalignment=3.0)


@pytest.mark.parametrize("extra", [[], ["model.align_ngf=1.0"]])
def test_resume_across_align_start_equals_the_uninterrupted_run(
        misaligned: Path, tmp_path: Path, extra: list[str]) -> None:
    """Stopped before the start step and resumed, the run switches the warp on at the same
    step as the run that never stopped (the trainer restores the step count)."""
    cfg = micro_config(misaligned, "train.epochs=2", "train.checkpoint_every=0",
                       "model.align=true", "model.align_width=8", "model.align_start=3",
                       *extra)
    straight = train(cfg, tmp_path / "a", progress=False)
    first = train(cfg, tmp_path / "b", stop=StopAfter(2), progress=False)
    assert first.status == "preempted" and first.step == 2
    second = train(cfg, tmp_path / "b", progress=False)
    assert second.step == straight.step > 3
    la, lb = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    # R first runs at step 4 (identity output: its last layer starts at zero), moved by 5
    assert [r["align_smooth"] for r in la[:4]] == [0.0] * 4 and la[4]["align_smooth"] > 0
    keys = [k for k in la[0] if k not in ("data_wait_s", "step_s")]
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb]
    wa, wb = (load_checkpoint(t / "checkpoints" / "latest.pt")["model"]["generators"]
              for t in (tmp_path / "a", tmp_path / "b"))
    for net in wa:
        assert all(torch.equal(wa[net][k], wb[net][k]) for k in wa[net]), net


# --------------------------------------------------------------------------- edge term


def test_edge_misfit_ignores_contrast_and_sees_a_shift() -> None:
    img = torch.from_numpy(smooth_image(5))[None]
    other = -0.5 * img.flip(1) + 0.2                # another rendering of the same edges
    shifted = torch.roll(other, 3, dims=-1)
    same, moved = edge_misfit(img, other).item(), edge_misfit(img, shifted).item()
    assert same == pytest.approx(edge_misfit(img, img).item(), abs=1e-5)  # contrast-blind
    # not 0 for equal images (ε damps weak gradients); 3 px off is 0.13 worse here
    assert moved > same + 0.1, (same, moved)
    assert edge_misfit(torch.zeros(1, 3, 16, 16), img[..., :16, :16]).item() == \
        pytest.approx(1.0)                            # a flat image: no edges to match


def test_edge_misfit_registers_a_known_shift_across_modalities() -> None:
    """fixed = a contrast-inverted, recoloured moving, displaced by u: R trained on the edge
    term alone finds u (the photometric ℓ1 could not: the intensities disagree)."""
    torch.manual_seed(0)
    u = (1.5, -1.0)
    moving_np = smooth_image(6)
    fixed_np = ndimage.shift(-0.7 * moving_np[::-1] + 0.1, (0, -u[0], -u[1]), order=3,
                             mode="wrap").astype(np.float32)
    moving, fixed = torch.from_numpy(moving_np)[None], torch.from_numpy(fixed_np)[None]
    net = build_registration(3, 8, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    inner = (..., slice(8, 40), slice(8, 40))
    for _ in range(40):
        opt.zero_grad()
        disp = net(moving, fixed)
        loss = edge_misfit(warp(moving, disp)[inner], fixed[inner]) + 0.1 * smoothness(disp)
        loss.backward()
        opt.step()
    with torch.no_grad():
        mean = net(moving, fixed)[inner].mean(dim=(-2, -1))[0]
    assert mean[0].item() == pytest.approx(u[0], abs=0.3)
    assert mean[1].item() == pytest.approx(u[1], abs=0.3)


# --------------------------------------------------------------------------- phantom knob


def warp_displacement(strength: float) -> np.ndarray:
    labels = np.zeros((64, 64), np.uint8)
    src_r, src_c = _warp(np.random.default_rng(7), labels, 64 / 512, strength)
    grid = (np.arange(64 * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE - 0.5
    r, c = np.meshgrid(grid, grid, indexing="ij")
    return np.hypot(src_r - r, src_c - c)


def test_misalignment_zero_is_no_warp_and_the_warp_grows_with_strength() -> None:
    assert np.abs(warp_displacement(0.0)).max() < 1e-4
    one, three = warp_displacement(1.0).mean(), warp_displacement(3.0).mean()
    assert one > 0.05
    assert three == pytest.approx(3 * one, rel=0.05)   # linear but for the rotation's sine


def test_misalignment_is_recorded_and_bad_values_are_refused(tmp_path: Path) -> None:
    write_pairs(tmp_path / "m3", n=1, seed=2, size=(32, 32), misalignment=3)
    assert json.loads((tmp_path / "m3" / "phantom.json").read_text())["misalignment"] == 3.0
    write_pairs(tmp_path / "m1", n=1, seed=2, size=(32, 32))
    assert "misalignment" not in json.loads((tmp_path / "m1" / "phantom.json").read_text())
    with pytest.raises(UsageError, match="misalignment"):
        write_pairs(tmp_path / "bad", n=1, seed=2, size=(32, 32), misalignment=-1)
    assert not (tmp_path / "bad").exists()
