"""§2.5 normalisation: CT bone/background targets, white balance, shared contrast stretch."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hpcstain.ct.signed import ct16_to_signed, ct_to_signed, normalise_ct, signed_to_ct16
from hpcstain.data.normalise import (
    Rois,
    apply_stretch,
    boxes_to_mask,
    ct_levels,
    find_ct_rois,
    find_pair_rois,
    histology_stretch,
    normalise_histology,
    signed_to_rgb8,
)
from hpcstain.data.toy import toy_pair
from hpcstain.errors import InputError


def inner(region: np.ndarray) -> np.ndarray:
    return ndimage.binary_erosion(region, iterations=2)


@pytest.mark.parametrize("material", ["mg", "ti", "peek"])
def test_auto_rois_put_bone_and_background_on_target_within_1pct(material: str) -> None:
    toy = toy_pair(128, material, seed=3)
    ct = toy.ct.astype(np.float32)
    rois = find_pair_rois(ct, toy.histology.astype(np.float32))
    bone, background = ct_levels(ct, rois)
    ct16 = normalise_ct(ct, bone, background, 30000.0, 10000.0)
    # judged on the true regions: the screw (Ti far brighter) and tube wall stayed out
    assert ct16[inner(toy.bone)].mean() == pytest.approx(30000.0, rel=0.01)
    assert ct16[toy.background].mean() == pytest.approx(10000.0, rel=0.01)
    assert not (rois.bone & (toy.screw | toy.wall)).any()
    assert not (rois.background & (toy.wall | toy.bone)).any()


def test_ct_only_rois_skip_a_titanium_screw() -> None:
    toy = toy_pair(128, "ti", seed=1)
    ct = toy.ct.astype(np.float32)
    rois = find_ct_rois(ct)
    ct16 = normalise_ct(ct, *ct_levels(ct, rois))
    assert ct16[inner(toy.bone)].mean() == pytest.approx(30000.0, rel=0.01)
    assert ct16[toy.background].mean() == pytest.approx(10000.0, rel=0.01)


def test_ct_signed_mapping_and_inverse() -> None:
    ct16 = np.array([-5.0, 0.0, 10000.0, 30000.0, 65535.0, 70000.0], dtype=np.float32)
    unit = ct16_to_signed(ct16)
    assert unit.min() == -1.0 and unit.max() == 1.0
    assert unit[3] == pytest.approx(30000 / 65535 * 2 - 1)
    assert np.array_equal(signed_to_ct16(unit)[1:5], [0, 10000, 30000, 65535])
    rois = Rois(boxes_to_mask(((0, 1, 0, 1),), (1, 2)), boxes_to_mask(((0, 1, 1, 2),), (1, 2)))
    ct = np.array([[500.0, 100.0]])
    got = ct_to_signed(ct, ct_levels(ct, rois))
    assert np.allclose(got, [[30000 / 65535 * 2 - 1, 10000 / 65535 * 2 - 1]], atol=1e-6)
    with pytest.raises(InputError, match="cannot normalise"):
        normalise_ct(np.ones((2, 2)), 5.0, 5.0)


def test_histology_white_balance_and_stretch_bounds() -> None:
    toy = toy_pair(128, "mg", seed=2, cast=(1.0, 0.9, 0.75))
    rgb = toy.histology.astype(np.float32)
    rois = Rois(inner(toy.bone), inner(toy.background))
    unit, s = normalise_histology(rgb, rois)
    balanced = rgb * np.asarray(s.gains, dtype=np.float32)
    mu = balanced[rois.background].mean(axis=0)
    assert mu.max() - mu.min() < 0.01 * mu.mean()           # µR = µG = µB
    assert s.f_min == pytest.approx(np.percentile(balanced[rois.bone], 1, axis=0).min(),
                                    rel=1e-4)
    assert s.f_max == pytest.approx(np.percentile(balanced[rois.background], 99, axis=0).max(),
                                    rel=1e-4)
    # f_min → -1, f_max → +1, and the background comes out neutral grey near white
    assert np.percentile(unit[rois.bone], 1, axis=0).min() == pytest.approx(-1.0, abs=0.01)
    assert np.percentile(unit[rois.background], 99, axis=0).max() == pytest.approx(1.0, abs=0.01)
    bg = unit[rois.background].mean(axis=0)
    assert np.ptp(bg) < 0.01 and bg.mean() > 0.8


def test_stretch_constants_clamp_and_preserve_rgb_ratios() -> None:
    toy = toy_pair(96, "ti", seed=4)
    rgb = toy.histology.astype(np.float32)
    rois = Rois(inner(toy.bone), inner(toy.background))
    s = histology_stretch(rgb, rois, c=500.0, c_prime=500.0)
    assert (s.f_min, s.f_max) == (10.0, 255.0)
    s = histology_stretch(rgb, rois, c=5.0, c_prime=2.0)
    unit = apply_stretch(rgb, s)
    balanced = rgb * np.asarray(s.gains, dtype=np.float32)
    ok = ((unit > -1) & (unit < 1)).all(axis=-1) & (balanced.min(axis=-1) > s.f_min + 5)
    before = balanced[ok] - s.f_min
    after = (unit[ok] + 1.0) / 2.0
    # one map for every channel: ratios from the black point f_min are unchanged ...
    ratios_before = before / before.sum(axis=-1, keepdims=True)
    ratios_after = after / after.sum(axis=-1, keepdims=True)
    assert np.allclose(ratios_before, ratios_after, atol=1e-4)
    # ... and so is the hue direction (R-G : G-B)
    d_before = before[:, :2] - before[:, 1:]
    d_after = after[:, :2] - after[:, 1:]
    scale = 2.0 / (s.f_max - s.f_min) / 2.0
    assert np.allclose(d_after, d_before * scale, atol=1e-4)


def test_signed_to_rgb8_inverts_the_network_range() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 7)).astype(np.uint8)
    unit = rgb.astype(np.float32) / 127.5 - 1.0
    out = signed_to_rgb8(unit, channel_axis=0)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.moveaxis(rgb, 0, -1))


def test_stretch_refuses_bone_not_darker_than_background() -> None:
    rgb = np.full((10, 10, 3), 200.0, dtype=np.float32)
    rois = Rois(boxes_to_mask(((0, 5, 0, 10),), (10, 10)),
                boxes_to_mask(((5, 10, 0, 10),), (10, 10)))
    with pytest.raises(InputError, match="f_min"):
        histology_stretch(rgb, rois)
