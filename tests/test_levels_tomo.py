"""CT levels on physically scanned phantoms (``--physics tomo``): a broad, beam-hardened Ti
screw is metal, not bone; where the histogram cannot tell, the reading is refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hpcstain.ct.levels import LevelEstimate, estimate_ct_levels, require_confident
from hpcstain.errors import InputError
from hpcstain.metrics.volume import OUTSIDE_LABELS, ct_sample_mask
from hpcstain.phantom import LABELS, make_volume, write_volume_file
from hpcstain.phantom.tomo import TomoParams
from hpcstain.volume.io import level_sample

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


def _read_as_stain_does(tmp_path, material: str, seed: int, shape: tuple[int, int, int],
                        flux: float) -> tuple[LevelEstimate, float]:
    """(the levels `hpcstain levels` / `stain` read, median of the bone labels) of a scan."""
    path = tmp_path / f"{material}{seed}.zarr"
    write_volume_file(path, shape, material, seed, tomo=TomoParams(flux=flux))
    group = zarr.open_group(str(path), mode="r")
    ct, labels = group["ct"][...], group["labels"][...]
    raw, smoothed, stride, name = level_sample(f"{path}:ct")
    est = estimate_ct_levels(raw, name, stride=stride, smoothed=smoothed)
    return est, float(np.median(ct[np.isin(labels, BONE)]))


def test_a_broad_ti_screw_missed_at_one_smoothing_is_found_at_the_next(tmp_path):
    """[issue 23] At 1 px smoothing this scan's screw is the only mode above the background
    (bone and soft tissue one unresolved shoulder): the reading took the screw for bone,
    3.7× the bone labels' median, with confidence 1.00. At 2 px the bone is resolved below
    the screw, which is then metal; that reading is the one returned."""
    est, bone = _read_as_stain_does(tmp_path, "ti", 3, (64, 128, 128), 1e4)
    assert not est.ambiguous
    assert [c.name for c in est.classes if c.excluded] == ["metal"]
    assert est.bone == pytest.approx(bone, rel=0.05)
    assert any("read as bone" in n for n in est.notes)


@pytest.mark.parametrize("seed, shape, flux", [(11, (32, 96, 96), 1e3),
                                              (11, (48, 160, 160), 1e3)])
def test_a_screw_that_may_be_bone_or_metal_is_refused(tmp_path, seed, shape, flux):
    """[issue 23] Screw-heavy scans at low flux (the screw 11–12 % of the voxels) read the
    screw as bone with confidence 1.00 (3.6× the bone labels' median). On the small one
    only one smoothing is tried and the class below the screw is a smear of partial
    volumes, so the unresolved tissue shoulder (10.3 half widths above the background)
    must be tried as the bone-like reference too; on the flat one 1 px smoothing misses
    the metal and 2 px cannot decide. Nothing stains on either: the reading is ambiguous
    and its refusal offers the bone below the screw."""
    est, bone = _read_as_stain_does(tmp_path, "ti", seed, shape, flux)
    assert est.ambiguous and est.alternative is not None
    assert min(abs(est.bone - bone), abs(est.alternative[0] - bone)) < 0.2 * bone
    with pytest.raises(InputError, match="AMBIGUOUS.*--bone-level"):
        require_confident(est)
