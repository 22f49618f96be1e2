"""Volume scoring (hpcstain/metrics/volume.py, `hpcstain score`): §2.5-normalised truth,
masked SSIM/PSNR per plane family, stripe ratios per axis, outputs of the verb."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from hpcstain.cli import main
from hpcstain.metrics import volume as mv
from hpcstain.metrics.similarity import ssim_batch
from hpcstain.phantom import BONE_LABELS, LABELS, make_volume, write_volume_file

SHAPE = (12, 40, 40)


@pytest.fixture(scope="module")
def phantom():
    return make_volume(SHAPE, "mg", seed=3)


@pytest.fixture(scope="module")
def ref(phantom):
    return mv.prepare_reference(SHAPE, phantom.stain, labels=phantom.labels, ct=phantom.ct)


def z_stripes(rgb: np.ndarray, amplitude: int = 20) -> np.ndarray:
    off = np.where(np.arange(rgb.shape[0]) % 2, amplitude, -amplitude).reshape(-1, 1, 1, 1)
    return np.clip(rgb.astype(np.int16) + off, 0, 255).astype(np.uint8)


def test_labels_constants_match_the_phantom() -> None:
    assert mv.BONE_LABELS == BONE_LABELS
    assert set(mv.OUTSIDE_LABELS) == {LABELS["background"], LABELS["tube"]}


def test_reference_is_normalised_and_mask_from_labels(phantom, ref) -> None:
    assert ref.info["normalised"] and ref.info["rois"] == "labels" and ref.info["mask"] == "labels"
    assert np.array_equal(ref.mask, ~np.isin(phantom.labels, [0, 1]))
    # §2.5: the background becomes (near) white, unlike the raw truth's (243, 241, 236)
    bg = phantom.labels == LABELS["background"]
    assert ref.rgb[bg].mean(axis=0).min() > 250
    assert not np.array_equal(ref.rgb, phantom.stain)


def test_truth_scores_perfectly(ref) -> None:
    s = mv.score_volume(ref.rgb, ref).summary
    assert s["stripe_ratio"] == {"z": 1.0, "y": 1.0, "x": 1.0}
    assert s["psnr"] == "inf"
    for fam, _ in mv.FAMILIES:
        assert s["planes"][fam]["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert s["planes"][fam]["psnr"] == mv.PSNR_CAP


def test_z_offsets_raise_the_z_stripe_ratio_only(ref) -> None:
    s = mv.score_volume(z_stripes(ref.rgb), ref).summary
    assert s["stripe_ratio"]["z"] > 1.5
    assert abs(s["stripe_ratio"]["y"] - 1) < 0.1 and abs(s["stripe_ratio"]["x"] - 1) < 0.1
    assert s["planes"]["xz"]["ssim"] < s["planes"]["xy"]["ssim"] < 1.0


def test_without_reference_ratio_against_ct_anisotropy(phantom) -> None:
    pred = mv.prepare_reference(SHAPE, phantom.stain, labels=phantom.labels).rgb
    clean = mv.score_volume(pred, None, labels=phantom.labels, ct=phantom.ct).summary
    striped = mv.score_volume(z_stripes(pred), None, labels=phantom.labels,
                              ct=phantom.ct).summary
    assert clean["stripe_ratio_against"] == "ct anisotropy"
    assert striped["stripe_ratio"]["z"] > 1.5 * clean["stripe_ratio"]["z"]
    # the anisotropy is scale-free: any linear map of the CT gives the same ratios
    scaled = mv.score_volume(pred, None, labels=phantom.labels,
                             ct=phantom.ct.astype(np.float32) * 3.5 - 1000).summary
    for a in mv.AXES:
        assert scaled["stripe_ratio"][a] == pytest.approx(clean["stripe_ratio"][a], rel=1e-5)


def test_changes_outside_the_mask_do_not_change_scores(ref) -> None:
    pred = z_stripes(ref.rgb, 10)
    other = pred.copy()
    rng = np.random.default_rng(0)
    other[~ref.mask] = rng.integers(0, 256, size=(int((~ref.mask).sum()), 3), dtype=np.uint8)
    assert mv.score_volume(pred, ref).summary == mv.score_volume(other, ref).summary
    inside = pred.copy()
    inside[ref.mask] = 255 - inside[ref.mask]
    assert mv.score_volume(inside, ref).summary != mv.score_volume(pred, ref).summary


def test_unmasked_ssim_equals_the_skimage_exact_slice_mean(ref) -> None:
    pred = z_stripes(ref.rgb, 10)
    mask = np.ones(SHAPE, dtype=bool)
    for fam, axis in mv.FAMILIES:
        got = mv.family_scores(pred, ref.rgb, mask, (255, 255, 255), axis)["ssim"]
        want = ssim_batch(np.moveaxis(pred, axis, 0), np.moveaxis(ref.rgb, axis, 0)).mean()
        assert got == pytest.approx(want, rel=1e-12), fam


def test_channel_first_rgba_and_mask_from_ct(phantom, ref) -> None:
    rgba = np.concatenate([ref.rgb, np.full((*SHAPE, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(mv.as_rgb_volume(np.moveaxis(rgba, -1, 0)), ref.rgb)
    mask, how = mv.sample_mask(SHAPE, ct=phantom.ct)
    assert how.startswith("fuse's outside test") and 0.1 < mask.mean() < 0.9
    # the air/resin around the sample is outside, bone inside
    assert not mask[phantom.labels == LABELS["background"]].mean() > 0.5
    assert mask[np.isin(phantom.labels, [LABELS["cortical_bone"]])].mean() > 0.9
    assert mv.sample_mask(SHAPE)[0].all()
    mask, how = mv.sample_mask(SHAPE, ct=phantom.ct, ct_threshold=12000)
    assert how == "ct > 12000" and np.array_equal(mask, phantom.ct > 12000)


def test_cli_writes_table_summary_and_profiles(tmp_path: Path, phantom, ref, capsys) -> None:
    vol = write_volume_file(tmp_path / "vol.zarr", SHAPE, "mg", seed=3, chunk=8)
    pred = tmp_path / "pred.npy"
    np.save(pred, np.moveaxis(z_stripes(ref.rgb), -1, 0))     # channel-first
    out = tmp_path / "score"
    assert main(["score", str(pred), "--reference", str(vol), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "stripe ratio" in table and "XZ (y-slices)" in table
    assert (out / "table.md").read_text() in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["labels"] == "from reference" and summary["mask"] == "labels"
    assert summary["stripe_ratio"]["z"] > 1.5
    assert math.isfinite(summary["psnr"]) and 0 < summary["planes"]["xy"]["ssim"] < 1
    assert (out / "profiles.png").stat().st_size > 1000
    # existing report refused; without a reference: ratios against the CT's anisotropy
    assert main(["score", str(pred), "--reference", str(vol), "--out", str(out)]) == 2
    out2 = tmp_path / "score-ct"
    assert main(["score", str(pred), "--ct", f"{vol}:ct", "--out", str(out2)]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["stripe_ratio_against"] == "ct anisotropy"
    assert s2["mask"].startswith("fuse's outside test")
    assert (out2 / "profiles.png").is_file()


def test_calibrated_psnr_forgives_a_colour_cast_but_not_structure(ref) -> None:
    """A per-channel gain/offset cast costs plain PSNR but not the calibrated one; a
    structural error (one tissue painted another colour) costs both."""
    m = ref.mask
    cast = np.clip(ref.rgb.astype(np.float64) * [0.8, 0.9, 0.7] + [10, 5, 30], 0, 255)
    cast = np.rint(cast).astype(np.uint8)
    s = mv.score_volume(cast, ref).summary
    assert s["psnr"] < 30
    # the only residual is the uint8 rounding of the cast (|e| ≤ 0.5 / gain ≤ 0.72 levels)
    assert s["psnr_calibrated"] > 45
    assert s["colour_calibration"]["gain"] == pytest.approx([1 / 0.8, 1 / 0.9, 1 / 0.7], rel=0.01)
    swapped = ref.rgb.copy()
    bone = m & (ref.rgb.mean(axis=-1) < np.median(ref.rgb[m].mean(axis=-1)))
    swapped[bone] = ref.rgb[m].max(axis=0)
    s2 = mv.score_volume(swapped, ref).summary
    assert s2["psnr_calibrated"] < 25
    assert s2["psnr_calibrated"] >= s2["psnr"] - 1e-9  # least squares never loses to identity


def test_a_runs_score_mask_is_what_fuse_kept(tmp_path: Path) -> None:
    """[issue 23] Without labels, scoring a stained run takes its sample from fuse's own
    outside test on the run's CT (levels and cupping of the plan), not a multi-Otsu
    threshold; it agrees with the phantom's labels where the CT threshold need not."""
    from micro import untrained_generator_checkpoint

    from hpcstain.ct.outside import OUTSIDE_TEST, outside_of_sample
    from hpcstain.metrics.volume import OUTSIDE_LABELS
    from hpcstain.score import run_sample_mask, score_files

    vol = write_volume_file(tmp_path / "vol.zarr", (16, 40, 40), "mg", seed=5, chunk=16)
    ckpt = untrained_generator_checkpoint(tmp_path / "gen.pt")
    run = tmp_path / "run"
    assert main(["stain", str(vol), "--checkpoint", str(ckpt), "--out", str(run), "--chunk",
                 "16", "--tile", "16", "--step", "8", "--device", "cpu", "--no-progress",
                 "--fuse"]) == 0
    import zarr

    group = zarr.open_group(str(vol), mode="r")
    ct, labels = group["ct"][...], group["labels"][...]
    mask, how = run_sample_mask(run / "fused.ome.zarr", ct)
    assert OUTSIDE_TEST in how
    whole = tuple(slice(0, n) for n in ct.shape)
    from hpcstain.volume.plan import load_plan

    plan = load_plan(run)
    assert np.array_equal(mask, ~outside_of_sample(ct, whole, whole,
                                                   (plan.bone_level, plan.background_level)))
    inside = ~np.isin(labels, OUTSIDE_LABELS)
    assert (mask == inside).mean() > 0.95
    report = score_files(run / "fused.ome.zarr", tmp_path / "score")
    assert report.score.summary["mask"] == how
    assert report.score.summary["mask_fraction"] == float(mask.mean())
