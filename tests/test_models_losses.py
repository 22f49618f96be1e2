"""Loss terms (Eqs. 1–10) on hand-made tensors; the correspondence mask on every ℓ1 term."""

from __future__ import annotations

import math

import pytest
import torch

from hpcstain.errors import ConfigError
from hpcstain.models.losses import discriminator_loss, gan_loss, greyscale_loss, masked_l1

torch.set_num_threads(1)

U32 = torch.finfo(torch.float32).eps / 2  # unit round-off of float32


def f32_mean_rel(n: int) -> float:
    """Relative error bound of a float32 mean of ``n`` non-negative terms, in any order.

    Summing non-negative terms in any order (scalar, SIMD lanes, threads) errs by at most
    (n - 1) u relative; a few divisions add u each. The losses are float32 whatever the
    input, so identities between them are checked against float64 within this bound.
    """
    return (n + 4) * U32


def masked_l1_f64(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Eq. 9 in float64: per-patch mean over masked pixels and channels, batch-averaged."""
    d = (a.double() - b.double()).abs()
    m = mask.double().expand_as(d)
    return float(((d * m).flatten(1).sum(1) / m.flatten(1).sum(1)).mean())


def _pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.zeros(1, 2, 2, 2)
    b = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    return a, b, mask


def test_masked_l1_averages_over_masked_pixels_and_channels() -> None:
    a, b, mask = _pair()
    # masked |a-b|: channel 0 → 1 + 4, channel 1 → 1 + 2; 2 pixels × 2 channels
    assert masked_l1(a, b, mask).item() == pytest.approx(8.0 / 4.0)


def test_l1_without_mask_is_the_plain_mean() -> None:
    a, b, _ = _pair()
    assert masked_l1(a, b).item() == pytest.approx(13.0 / 8.0)


def test_masked_l1_equals_mean_over_masked_pixels_of_each_patch() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    per_patch = [(a[i].double() - b[i].double()).abs()[mask[i].bool().expand(3, -1, -1)].mean()
                 for i in range(3)]
    expected = torch.stack(per_patch).mean()
    assert masked_l1(a, b, mask).item() == pytest.approx(expected.item(), rel=f32_mean_rel(192))


def test_batch_loss_is_the_mean_of_its_halves() -> None:
    """What DDP needs: mean over ranks of per-rank losses == loss of the global batch."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    mask = torch.zeros(4, 1, 8, 8)
    mask[0, :, :2] = 1
    mask[1:, :, 3:] = 1  # patches with very different coverage
    # Both sides equal the same exact value; each is a float32 mean (bound per side).
    rel = f32_mean_rel(3 * 8 * 8)
    exact = masked_l1_f64(a, b, mask)
    halves = [masked_l1(a[s], b[s], mask[s]) for s in (slice(0, 2), slice(2, 4))]
    assert masked_l1(a, b, mask).item() == pytest.approx(exact, rel=rel)
    assert sum(halves).item() / 2 == pytest.approx(exact, rel=rel)
    grey = [greyscale_loss(a[s], mask[s]) for s in (slice(0, 2), slice(2, 4))]
    a64 = a.double()
    spread = sum((a64[:, i] - a64[:, j]).abs() for i, j in ((0, 1), (0, 2), (1, 2)))
    grey_exact = masked_l1_f64(spread[:, None], torch.zeros_like(spread[:, None]), mask)
    assert greyscale_loss(a, mask).item() == pytest.approx(grey_exact, rel=rel)
    assert sum(grey).item() / 2 == pytest.approx(grey_exact, rel=rel)


def test_pixels_outside_mask_do_not_change_l1_terms() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:7] = 1
    outside = (1 - mask).bool().expand(-1, 3, -1, -1)
    a2, b2 = a.clone(), b.clone()
    a2[outside] = 5.0
    b2[outside] = -7.0
    assert masked_l1(a2, b2, mask).item() == pytest.approx(masked_l1(a, b, mask).item())
    assert greyscale_loss(a2, mask).item() == pytest.approx(greyscale_loss(a, mask).item())
    assert masked_l1(a2, b2).item() != pytest.approx(masked_l1(a, b).item())


def test_empty_mask_gives_zero_not_nan() -> None:
    a, b, _ = _pair()
    assert masked_l1(a, b, torch.zeros(1, 1, 2, 2)).item() == 0.0


def test_l1_reduces_in_float32() -> None:
    a = torch.ones(1, 3, 4, 4, dtype=torch.bfloat16)
    out = masked_l1(a, torch.zeros_like(a), torch.ones(1, 1, 4, 4))
    assert out.dtype == torch.float32 and out.item() == 1.0


def test_greyscale_loss_value_on_a_coloured_pixel() -> None:
    img = torch.tensor([0.5, 0.2, -0.1]).view(1, 3, 1, 1)
    # |R−G| + |R−B| + |G−B| = 0.3 + 0.6 + 0.3
    assert greyscale_loss(img).item() == pytest.approx(1.2)


def test_greyscale_loss_is_zero_for_grey_and_positive_otherwise() -> None:
    grey = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).expand(2, 3, 4, 4)
    assert greyscale_loss(grey).item() == 0.0
    tinted = grey.clone()
    tinted[:, 2] += 0.1
    assert greyscale_loss(tinted).item() == pytest.approx(0.2)


def test_greyscale_loss_respects_the_mask() -> None:
    img = torch.zeros(1, 3, 1, 2)
    img[0, :, 0, 1] = torch.tensor([0.5, 0.2, -0.1])  # pixel 1 coloured, pixel 0 grey
    assert greyscale_loss(img).item() == pytest.approx(0.6)
    assert greyscale_loss(img, torch.tensor([[[[1.0, 0.0]]]])).item() == 0.0
    assert greyscale_loss(img, torch.tensor([[[[0.0, 1.0]]]])).item() == pytest.approx(1.2)


def test_greyscale_loss_needs_three_channels() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        greyscale_loss(torch.zeros(1, 1, 2, 2))


def test_lsgan_loss_is_mse_to_one_or_zero() -> None:
    pred = torch.tensor([[0.5, 2.0]])
    assert gan_loss(pred, True, "lsgan").item() == pytest.approx((0.25 + 1.0) / 2)
    assert gan_loss(pred, False, "lsgan").item() == pytest.approx((0.25 + 4.0) / 2)


def test_vanilla_loss_is_bce_with_logits() -> None:
    assert gan_loss(torch.zeros(1, 1, 2, 2), True, "vanilla").item() == pytest.approx(
        math.log(2))
    assert gan_loss(torch.full((1, 1), 3.0), False, "vanilla").item() == pytest.approx(
        math.log1p(math.exp(3.0)))


def test_discriminator_loss_is_half_real_plus_half_fake() -> None:
    ones, zeros = torch.ones(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)
    assert discriminator_loss(ones, zeros).item() == 0.0
    assert discriminator_loss(zeros, ones).item() == pytest.approx(1.0)


def test_unknown_gan_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"loss\.gan_mode"):
        gan_loss(torch.zeros(1), True, "wgan")
