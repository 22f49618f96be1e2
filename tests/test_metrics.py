"""SSIM/PSNR agree with scikit-image; FRC; the §2.10 patch protocol and §2.8 masking."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hpcstain.errors import InputError, UsageError
from hpcstain.metrics.frc import frc, frc_threshold
from hpcstain.metrics.patches import (
    apply_mask,
    evaluate_patches,
    mask_coverage,
    medians,
    patch_grid,
)
from hpcstain.metrics.similarity import psnr, psnr_batch, ssim, ssim_batch

RNG = np.random.default_rng(11)


def noisy_copy(a: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(a + RNG.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)


def structured_rgb(shape=(96, 80)) -> np.ndarray:
    """Smooth blobs, a hard edge and flat areas (where SSIM's constants matter)."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    base = gaussian_filter(RNG.random(shape), 4) * 255
    base[:, : shape[1] // 3] = 200.0
    base[y > x] *= 0.4
    rgb = np.stack([base, base[::-1] * 0.7, np.full(shape, 30.0)], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


CASES = [
    ("random", RNG.integers(0, 256, (64, 72, 3), dtype=np.uint8), None),
    ("structured", structured_rgb(), None),
]


@pytest.mark.parametrize("name,a,_", CASES)
def test_ssim_and_psnr_agree_with_scikit_image(name, a, _):
    for sigma in (3.0, 25.0):
        b = noisy_copy(a, sigma)
        want = structural_similarity(a, b, channel_axis=-1, data_range=255)
        assert abs(ssim(a, b) - want) < 1e-6
        assert abs(psnr(a, b) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-6
    grey_b = noisy_copy(a[..., 0], 10.0)
    assert abs(ssim(a[..., 0], grey_b)
               - structural_similarity(a[..., 0], grey_b, data_range=255)) < 1e-6


def test_batched_ssim_psnr_match_per_patch_scikit_image():
    a = np.stack([structured_rgb((40, 40)) for _ in range(5)]
                 + [RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(36)])
    b = noisy_copy(a, 12.0)
    got_s, got_p = ssim_batch(a, b), psnr_batch(a, b)
    assert got_s.shape == got_p.shape == (41,)
    for i in range(len(a)):
        assert abs(got_s[i] - structural_similarity(a[i], b[i], channel_axis=-1,
                                                    data_range=255)) < 1e-6
        assert abs(got_p[i] - peak_signal_noise_ratio(a[i], b[i], data_range=255)) < 1e-6


def test_float_images_use_the_given_data_range():
    a = RNG.random((50, 50))
    b = np.clip(a + RNG.normal(0, 0.05, a.shape), 0, 1)
    assert abs(ssim(a, b, data_range=1.0) - structural_similarity(a, b, data_range=1.0)) < 1e-6
    assert abs(psnr(a, b, 1.0) - peak_signal_noise_ratio(a, b, data_range=1.0)) < 1e-6


def test_identical_images_score_one_and_infinite_psnr_and_bad_shapes_fail():
    a = structured_rgb()
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert psnr(a, a) == np.inf
    with pytest.raises(InputError, match="shapes"):
        ssim(a, a[:-1])
    with pytest.raises(InputError, match="at least 7"):
        ssim(a[:5, :5], a[:5, :5])


# ------------------------------------------------------------------ FRC


def scene(n: int = 256) -> np.ndarray:
    return gaussian_filter(RNG.random((n, n)), 1.0) * 200


def test_frc_blurred_copy_has_lower_resolution_than_a_noisy_copy():
    truth = scene()

    def noise():
        return RNG.normal(0, 1.0, truth.shape)

    sharp = frc(truth + noise(), truth + noise())
    blurred = frc(truth + noise(), gaussian_filter(truth, 2.0) + noise())
    assert sharp.frc[0] > 0.99 and blurred.frc[0] > 0.9
    assert blurred.resolution_px > sharp.resolution_px + 1.0  # worse = more pixels
    assert not blurred.at_nyquist
    assert len(sharp.frequencies) == 128 and sharp.frequencies[-1] == pytest.approx(0.5)


def test_frc_identical_images_reach_nyquist_and_pixel_size_scales():
    truth = scene()
    same = frc(truth, truth)
    assert same.at_nyquist and same.resolution_px == 2.0
    blurred = frc(truth + RNG.normal(0, 1, truth.shape), gaussian_filter(truth, 2.0)
                  + RNG.normal(0, 1, truth.shape), pixel_size_um=5.0)
    assert blurred.resolution_um == pytest.approx(5.0 * blurred.resolution_px)


def test_frc_thresholds():
    sizes = np.array([8, 100, 10**8])
    half_bit = frc_threshold("half-bit", sizes)
    assert np.all(np.diff(half_bit) < 0) and half_bit[-1] == pytest.approx(0.1716, abs=2e-3)
    assert np.all(frc_threshold("1/7", sizes) == pytest.approx(1 / 7))
    with pytest.raises(UsageError, match="threshold"):
        frc_threshold("3-sigma", sizes)
    rgb = np.repeat(scene(64)[..., None], 3, axis=-1)
    assert frc(rgb, rgb, "half-bit").at_nyquist


# ------------------------------------------------------------------ patch protocol


def test_patch_grid_is_non_overlapping_and_drops_partial_patches():
    grid = patch_grid((600, 530), 256)
    assert [(p[0].start, p[1].start) for p in grid] == [(0, 0), (0, 256), (256, 0), (256, 256)]


def test_patches_under_half_mask_coverage_are_excluded():
    ref = RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    out = noisy_copy(ref, 20.0)
    mask = np.zeros((512, 512), bool)
    mask[:256, :256] = True            # patch (0, 0): 100 %
    mask[:128, 256:] = True            # patch (0, 256): exactly 50 % → kept
    mask[256:383, :256] = True         # patch (256, 0): 127/256 < 50 % → excluded
    np.testing.assert_allclose(mask_coverage(mask, patch_grid(mask.shape)),
                               [1.0, 0.5, 127 / 256, 0.0])
    scores = evaluate_patches(out, ref, mask)
    assert [(s.row, s.col) for s in scores] == [(0, 0), (0, 256)]
    assert [s.coverage for s in scores] == [1.0, 0.5]
    s0 = scores[0]
    assert s0.ssim == pytest.approx(structural_similarity(
        out[:256, :256], ref[:256, :256], channel_axis=-1, data_range=255), abs=1e-6)
    assert s0.psnr == pytest.approx(peak_signal_noise_ratio(
        ref[:256, :256], out[:256, :256], data_range=255), abs=1e-6)
    assert s0.lpips is None and s0.frc_px is None
    assert evaluate_patches(out, ref, np.zeros((512, 512), bool)) == []


def test_masking_sets_outside_pixels_to_the_background_before_scoring():
    ref = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = ref.copy()
    out[200:] = 0                      # differs only outside the mask
    mask = np.zeros((256, 256), bool)
    mask[:200] = True
    masked = apply_mask(out, mask, (231.6, 228.2, 240.0))
    assert masked.dtype == np.uint8 and masked[255, 0].tolist() == [232, 228, 240]
    assert (masked[:200] == out[:200]).all()
    [score] = evaluate_patches(out, ref, mask, background_rgb=(231.6, 228.2, 240.0))
    assert score.psnr == np.inf and score.ssim == pytest.approx(1.0)
    [unmasked] = evaluate_patches(out, ref, mask)
    assert unmasked.psnr < 20
    with pytest.raises(InputError, match="mask"):
        apply_mask(out, mask[:10], (0, 0, 0))


def test_frc_and_medians_in_the_patch_protocol():
    ref = np.clip(np.repeat(scene(512)[..., None], 3, axis=-1), 0, 255).astype(np.uint8)
    out = noisy_copy(ref, 5.0)
    scores = evaluate_patches(out, ref, with_frc=True, pixel_size_um=5.0)
    assert len(scores) == 4 and all(s.frc_px is not None and s.frc_px >= 2 for s in scores)
    assert all(s.frc_um == pytest.approx(5 * s.frc_px) for s in scores)
    med = medians(scores)
    assert med["ssim"] == pytest.approx(np.median([s.ssim for s in scores]))
    assert med["lpips"] is None and med["patches"] == 4
