"""CT levels from the CT alone (hpcstain.ct.levels): metal of any size, cupping, errors, CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from hpcstain.cli import main
from hpcstain.ct.levels import (
    AMBIGUOUS,
    estimate_ct_levels,
    require_confident,
    volume_levels,
)
from hpcstain.data.normalise import ct_levels, find_ct_rois
from hpcstain.errors import InputError, UsageError
from hpcstain.phantom import LABELS, make_volume, render_pair
from hpcstain.phantom import render as phantom_render
from hpcstain.volume.io import estimate_levels

SHAPE = (24, 160, 160)   # small, but the anatomy still spans several voxels
BONE = (LABELS["cortical_bone"], LABELS["trabecular_bone"])


class ArraySource:
    """The VolumeSource interface over an in-memory array."""

    def __init__(self, ct: np.ndarray) -> None:
        self.ct, self.shape, self.spec = ct, ct.shape, "array"

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return self.ct[region]


def label_medians(ct: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    c = ct.astype(np.float64)
    return float(np.median(c[np.isin(labels, BONE)])), float(np.median(c[labels == 0]))


def phantom(material: str, seed: int, screw_scale: float = 1.0, cupping: float | None = None):
    old = phantom_render.CUPPING
    if cupping is not None:
        phantom_render.CUPPING = cupping
    try:
        return make_volume(SHAPE, material, seed, screw_scale=screw_scale)
    finally:
        phantom_render.CUPPING = old


@pytest.mark.parametrize(("material", "scale", "cupping"), [
    ("ti", 1.0, None), ("ti", 1.6, 0.15), ("mg", 1.0, None), ("mg", 1.6, 0.15),
    ("peek", 1.6, None), ("peek", 1.0, 0.15)])
def test_volume_levels_match_the_label_medians(material: str, scale: float,
                                               cupping: float | None) -> None:
    v = phantom(material, 5, scale, cupping)
    bone_ref, bg_ref = label_medians(v.ct, v.labels)
    bone, background = estimate_levels(ArraySource(v.ct))   # what `stain` uses
    assert bone == pytest.approx(bone_ref, rel=0.05)
    assert background == pytest.approx(bg_ref, rel=0.05)


def test_a_large_titanium_screw_is_metal_not_bone() -> None:
    """The issue's case: the screw is a big part of the bright voxels."""
    v = phantom("ti", 8, 1.6)
    screw = float(np.median(v.ct[v.labels == LABELS["screw"]]))
    est = volume_levels(ArraySource(v.ct))
    assert not est.ambiguous and est.confidence >= AMBIGUOUS
    metal = [c for c in est.classes if c.name == "metal"]
    assert metal and metal[0].excluded and metal[0].level == pytest.approx(screw, rel=0.03)
    assert est.bone < 0.6 * screw and "metal_lo" in est.thresholds
    assert any(line.startswith("levels: bone") for line in est.lines())


def test_phantom_screw_scale_knob() -> None:
    small, large = (make_volume((8, 64, 64), "ti", 2, screw_scale=s) for s in (1.0, 1.6))
    default = make_volume((8, 64, 64), "ti", 2)
    assert hashlib.sha256(small.ct.tobytes()).digest() == \
        hashlib.sha256(default.ct.tobytes()).digest()
    screw = LABELS["screw"]
    assert (large.labels == screw).sum() > 1.4 * (small.labels == screw).sum()
    with pytest.raises(UsageError, match="screw scale"):
        make_volume((8, 64, 64), "ti", 2, screw_scale=5)


def test_constant_volume_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="constant CT"):
        estimate_levels(ArraySource(np.full((8, 32, 32), 1234, np.uint16)))


def test_volume_without_bone_is_a_clear_error() -> None:
    """Air, a tube wall and soft tissue only: no class far above the background."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:96, :96]
    r = np.hypot(y - 48, x - 48)
    ct = np.full((12, 96, 96), 10000.0)
    ct[:, (r > 40) & (r < 43)] = 12400.0
    ct[:, r < 30] = 13400.0
    ct = ndimage.gaussian_filter(ct + rng.normal(0, 700, ct.shape), 0.8)
    with pytest.raises(InputError, match="no bone found"):
        estimate_levels(ArraySource(ct.astype(np.uint16)))


def test_ambiguous_estimate_names_both_readings_in_one_line() -> None:
    """A narrow class at twice the contrast of a broad one: metal over bone, or bone?"""
    rng = np.random.default_rng(0)
    ct = rng.normal(10000, 300, (4, 128, 128))
    ct[:, 20:70, 20:110] = rng.normal(20000, 1500, (4, 50, 90))   # broad: bone?
    ct[:, 80:110, 30:100] = rng.normal(30500, 300, (4, 30, 70))   # narrow, 2.05×: metal?
    est = estimate_ct_levels(ct, "ambiguous.zarr")
    assert est.ambiguous and est.alternative is not None
    with pytest.raises(InputError) as info:
        require_confident(est)
    text = str(info.value)
    assert "\n" not in text and "AMBIGUOUS" in text and text.count("--bone-level") == 2


def test_slide_rois_from_ct_alone_skip_the_titanium_screw() -> None:
    """2D path (`predict`): find_ct_rois uses the same estimator."""
    pair = render_pair("ti", 12, (256, 256), 1, 0)
    bone_ref, bg_ref = label_medians(pair.ct, pair.labels)
    rois = find_ct_rois(pair.ct)
    bone, background = ct_levels(pair.ct.astype(np.float64), rois)
    assert bone == pytest.approx(bone_ref, rel=0.05)
    assert background == pytest.approx(bg_ref, rel=0.05)
    assert not (rois.bone & (pair.labels == LABELS["screw"])).any()
    est = estimate_ct_levels(pair.ct)
    assert bone == pytest.approx(est.bone, rel=0.01)         # ROI means = the estimate
    assert background == pytest.approx(est.background, rel=0.01)


def test_levels_verb_prints_classes_and_writes_the_histogram(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hpcstain.phantom import write_volume_file

    vol = write_volume_file(tmp_path / "ti.zarr", (16, 128, 128), "ti", 4, chunk=16,
                            screw_scale=1.6)
    png = tmp_path / "levels.png"
    assert main(["levels", str(vol), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("levels: bone ") and "flags:  --bone-level" in out
    assert "metal" in out and "confidence" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["levels", str(tmp_path / "missing.zarr")]) == 2


def test_stain_plan_only_prints_the_same_levels_and_refuses_ambiguity(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hpcstain.checkpoint import save_checkpoint
    from hpcstain.config import Config, to_dict
    from hpcstain.models import architecture_of, build_model
    from hpcstain.phantom import write_volume_file

    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = 4, 4, 1
    ckpt = save_checkpoint(tmp_path / "g.pt", {
        "architecture": architecture_of(cfg.model), "config": to_dict(cfg),
        "model": build_model(cfg.model, cfg.loss, "cpu", seed=0).generator_state_dict()})
    vol = write_volume_file(tmp_path / "ti.zarr", (16, 128, 128), "ti", 4, chunk=16)
    assert main(["levels", str(vol)]) == 0
    levels_out = capsys.readouterr().out.splitlines()
    assert main(["stain", str(vol), "--checkpoint", str(ckpt), "--out", str(tmp_path / "run"),
                 "--plan-only", "--no-progress"]) == 0
    stain_out = capsys.readouterr().out.splitlines()
    assert stain_out[:len(levels_out)] == levels_out   # the same report, then the plan
    assert any(line.startswith("plan: ") for line in stain_out)

    rng = np.random.default_rng(0)   # the ambiguous volume of the test above, as a file
    ct = rng.normal(10000, 300, (4, 128, 128))
    ct[:, 20:70, 20:110] = rng.normal(20000, 1500, (4, 50, 90))
    ct[:, 80:110, 30:100] = rng.normal(30500, 300, (4, 30, 70))
    import zarr

    zarr.create_array(str(tmp_path / "amb.zarr"), data=ct.astype(np.uint16))
    assert main(["stain", str(tmp_path / "amb.zarr"), "--checkpoint", str(ckpt), "--out",
                 str(tmp_path / "run2"), "--plan-only", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AMBIGUOUS" in err[0] and "--bone-level" in err[0]
    assert not (tmp_path / "run2").exists()
