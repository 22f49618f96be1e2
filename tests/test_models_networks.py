"""Networks of §2.6: parameter counts, shapes, receptive field, norms, initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcstain.config import ModelConfig
from hpcstain.errors import ConfigError, InputError
from hpcstain.models.networks import (
    PatchDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    build_generator,
    count_parameters,
    freeze_inert_biases,
    inert_biases,
    init_weights,
)

torch.set_num_threads(1)


def test_paper_resnet_generator_has_11378179_parameters() -> None:
    net = ResnetGenerator(3, 3, ngf=64, n_blocks=9, norm="instance", upsampling="transpose")
    assert count_parameters(net) == 11_378_179


def test_paper_patchgan_has_2764737_parameters() -> None:
    net = PatchDiscriminator(3, ndf=64, n_layers=3, norm="instance")
    assert count_parameters(net) == 2_764_737


def test_resize_upsampling_keeps_shape_and_parameter_count() -> None:
    transpose = ResnetGenerator(3, 3, ngf=8, n_blocks=2, upsampling="transpose")
    resize = ResnetGenerator(3, 3, ngf=8, n_blocks=2, upsampling="resize")
    assert count_parameters(resize) == count_parameters(transpose)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in resize.modules())
    assert any(isinstance(m, nn.Upsample) for m in resize.modules())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = resize(x)
    assert y.shape == (2, 3, 32, 32)
    assert y.abs().max() <= 1.0  # tanh output


def test_resnet_generator_maps_channels() -> None:
    net = ResnetGenerator(1, 3, ngf=4, n_blocks=1)
    assert net(torch.zeros(1, 1, 16, 24)).shape == (1, 3, 16, 24)


def test_instance_norm_has_no_affine_parameters_or_running_stats() -> None:
    net = ResnetGenerator(3, 3, ngf=4, n_blocks=1, norm="instance")
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.weight is None and m.running_mean is None for m in norms)
    assert list(net.buffers()) == []


def test_batch_norm_variant_drops_conv_bias_before_norm() -> None:
    inst = ResnetGenerator(3, 3, ngf=4, n_blocks=1, norm="instance")
    batch = ResnetGenerator(3, 3, ngf=4, n_blocks=1, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    # every normed conv trades its bias for the norm's (weight, bias): +1 per channel
    normed_channels = sum(m.num_features for m in batch.modules()
                          if isinstance(m, nn.BatchNorm2d))
    assert count_parameters(batch) == count_parameters(inst) + normed_channels


def test_unknown_norm_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.norm"):
        ResnetGenerator(3, 3, ngf=4, n_blocks=1, norm="group")


def test_unet256_maps_256_to_256() -> None:
    net = UnetGenerator(3, 3, ngf=2, use_dropout=True)
    y = net(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert y.shape == (1, 3, 256, 256)
    assert y.abs().max() <= 1.0


def test_unet256_dropout_only_in_three_inner_up_blocks() -> None:
    with_dropout = UnetGenerator(3, 3, ngf=2, use_dropout=True)
    without = UnetGenerator(3, 3, ngf=2, use_dropout=False)
    levels = [i for i, up in enumerate(with_dropout.ups)
              if any(isinstance(m, nn.Dropout) for m in up)]
    assert levels == [4, 5, 6]
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())
    assert len(with_dropout.downs) == 8


def test_unet256_rejects_patches_not_multiple_of_256() -> None:
    with pytest.raises(InputError, match="multiple of 256"):
        UnetGenerator(3, 3, ngf=2)(torch.zeros(1, 3, 128, 128))


def test_patchgan_receptive_field_is_70_pixels() -> None:
    torch.manual_seed(0)
    net = init_weights(PatchDiscriminator(3, ndf=4, n_layers=3, norm="batch")).eval()
    x = torch.zeros(1, 3, 128, 128, requires_grad=True)
    out = net(x)
    assert out.shape == (1, 1, 14, 14)
    out[0, 0, 7, 7].backward()
    seen = x.grad.abs().sum(dim=(0, 1)) > 0
    rows = seen.any(dim=1).nonzero().flatten()
    cols = seen.any(dim=0).nonzero().flatten()
    assert int(rows[-1] - rows[0]) + 1 == 70
    assert int(cols[-1] - cols[0]) + 1 == 70


def test_init_uses_gain_for_conv_weights_and_zero_biases() -> None:
    net = ResnetGenerator(3, 3, ngf=32, n_blocks=1, norm="batch")
    init_weights(net, gain=0.05, generator=torch.Generator().manual_seed(1))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    weights = torch.cat([m.weight.detach().flatten() for m in convs])
    assert float(weights.mean().abs()) < 0.002
    assert float(weights.std()) == pytest.approx(0.05, rel=0.02)
    assert all(m.bias is None or bool((m.bias == 0).all()) for m in convs)
    bn = torch.cat([m.weight.detach() for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    assert float(bn.mean()) == pytest.approx(1.0, abs=0.02)
    assert 0.02 < float(bn.std()) < 0.08


def test_init_is_deterministic_given_a_generator() -> None:
    def make() -> nn.Module:
        return init_weights(PatchDiscriminator(3, ndf=4), 0.02,
                            torch.Generator().manual_seed(5))

    a, b = make(), make()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_build_generator_follows_config() -> None:
    assert isinstance(build_generator(ModelConfig(generator="unet256", ngf=2), 3, 3),
                      UnetGenerator)
    net = build_generator(ModelConfig(ngf=4, n_blocks=3, upsampling="resize"), 1, 3)
    assert isinstance(net, ResnetGenerator) and len(net.blocks) == 3


def test_inert_biases_change_no_output_and_get_no_gradient() -> None:
    net = init_weights(ResnetGenerator(3, 3, ngf=4, n_blocks=1),
                       generator=torch.Generator().manual_seed(0))
    biases = inert_biases(net)
    assert len(biases) == 2 * 2 + 2 * 1 + 1  # stem, 2 down, 2 per block, 2 up
    # Structural claim (the norm's mean subtraction cancels these biases exactly), so it is
    # checked in float64: the only difference left is round-off of the cancellation, about
    # eps64 x (shift / activation spread ~1e2) x depth ~ 1e-13 here. float32 would leave
    # ~1e-5 that varies with vector width and thread count (a 1e-5 atol failed on another
    # machine). The tolerance (1e6 eps x output scale) keeps > 1e3 of margin over that
    # round-off and is still ~1e10 below the effect of a live bias (checked last).
    net = net.double()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    before = net(x)
    tol = 1e6 * torch.finfo(torch.float64).eps * float(before.detach().abs().max())
    with torch.no_grad():
        for b in biases:
            b.add_(1.5)
    torch.testing.assert_close(net(x), before, atol=tol, rtol=0)
    freeze_inert_biases(net)
    net(x).square().mean().backward()
    assert all(bool((b.grad == 0).all()) for b in biases)
    final = net.decoder[-2]
    assert all(final.bias is not b for b in biases) and final.bias.grad.abs().sum() > 0
    with torch.no_grad():
        final.bias.add_(1.5)  # a bias the norm does not cancel moves the output by >> tol
        assert float((net(x) - before).abs().max()) > 1e6 * tol
    assert len(inert_biases(PatchDiscriminator(3, ndf=4))) == 3
    assert inert_biases(ResnetGenerator(3, 3, ngf=4, n_blocks=1, norm="batch")) == []
