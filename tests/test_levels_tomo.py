"""CT levels on physically scanned phantoms (``--physics tomo``): a broad, beam-hardened Ti
screw is metal, not bone; where the histogram cannot tell, the reading is refused."""

from __future__ import annotations

import numpy as np
import pytest

from hpcstain.ct.levels import estimate_ct_levels, require_confident
from hpcstain.errors import InputError
from hpcstain.metrics.volume import OUTSIDE_LABELS, ct_sample_mask
from hpcstain.phantom import LABELS, make_volume
from hpcstain.phantom.tomo import TomoParams

SHAPE = (24, 96, 96)
BONE = (LABELS["cortical_bone"], LABELS["trabecular_bone"])


def scanned(material: str, seed: int, flux: float) -> tuple[np.ndarray, float, float]:
    """(CT, median of the bone labels, median of the air label) of a tomo phantom."""
    v = make_volume(SHAPE, material, seed, tomo=TomoParams(flux=flux))
    ct, labels = np.asarray(v.ct, np.float64), np.asarray(v.labels)
    return ct, float(np.median(ct[np.isin(labels, BONE)])), \
        float(np.median(ct[labels == LABELS["background"]]))


@pytest.mark.parametrize("seed", [3, 7])
def test_a_beam_hardened_ti_screw_is_metal_and_bone_is_read_within_5_percent(seed):
    ct, bone, air = scanned("ti", seed, 1e4)
    est = require_confident(estimate_ct_levels(ct, "ti"))
    assert [c.name for c in est.classes if c.excluded] == ["metal"]
    assert est.bone == pytest.approx(bone, rel=0.05)
    assert est.background == pytest.approx(air, rel=0.05)


def test_a_starved_ti_scan_is_refused_with_both_readings():
    ct, bone, _ = scanned("ti", 7, 1e3)
    est = estimate_ct_levels(ct, "ti")
    assert est.ambiguous and est.alternative is not None
    # one of the two readings offered is the bone (roughly: starved streaks lift it)
    assert min(abs(est.bone - bone), abs(est.alternative[0] - bone)) < 0.15 * bone
    with pytest.raises(InputError, match="AMBIGUOUS.*--bone-level"):
        require_confident(est)


def _multi_otsu_mask(ct: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_multiotsu

    s = ct[::2, ::2, ::2].astype(np.float64)
    lo, hi = np.percentile(s, [0.5, 99.5])
    return ct > threshold_multiotsu(np.clip(s, lo, hi), classes=3)[0]


@pytest.mark.parametrize("seed", [3, 5])
def test_the_score_mask_of_a_scanned_ct_alone_is_fuse_outside_test(seed):
    """[issue 23] A low-flux Mg scan given to ``score --ct`` alone: the sample is what fuse
    would keep at the CT's own levels (≥ 97 % voxel agreement with the labels), where the
    multi-Otsu threshold it replaced lands in the noise (86–90 % on these scans)."""
    v = make_volume(SHAPE, "mg", seed, tomo=TomoParams(flux=1e3))
    ct, truth = np.asarray(v.ct), ~np.isin(np.asarray(v.labels), OUTSIDE_LABELS)
    mask, how = ct_sample_mask(ct)
    assert how.startswith("fuse's outside test")
    assert np.mean(mask == truth) >= 0.97
    assert np.mean(mask == truth) > np.mean(_multi_otsu_mask(ct) == truth) + 0.05


def test_the_score_mask_says_when_the_levels_cannot_be_read():
    ct, _, _ = scanned("ti", 7, 1e3)      # refused above: no outside test at a guess
    mask, how = ct_sample_mask(ct)
    assert "multi-Otsu; levels ambiguous" in how
    assert np.array_equal(mask, _multi_otsu_mask(ct))


def test_a_mg_screw_and_its_degradation_zone_are_left_out_of_the_bone_level():
    """Mg sits inside the bone range, below cortical bone, wrapped in a degradation layer
    and new bone (≈ 55 % of the gap): read with them, bone came out 14 % (21 % of the gap)
    low on this volume. The implant is found and left out with a shell of 1.5× its radius."""
    ct, bone, air = scanned("mg", 5, 1e4)
    est = require_confident(estimate_ct_levels(ct, "mg"))
    assert [c.name for c in est.classes if c.excluded] == ["implant"]
    assert abs(est.bone - bone) < 0.05 * (bone - air)
    assert est.background == pytest.approx(air, rel=0.05)
