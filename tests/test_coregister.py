"""Co-registration of pairs (`hpcstain register`): the mutual-information fit recovers a known
warp, leaves an aligned pair alone, and writes a complete, readable manifest (or nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from hpcstain.cli import main
from hpcstain.data.coregister import (
    apply_field,
    fit_histology_warp,
    min_max_scaled,
    mutual_information,
    register_pairs,
)
from hpcstain.data.manifest import read_manifest, read_pair
from hpcstain.phantom import write_pairs

PALETTE = np.array([[235, 225, 240], [120, 60, 160], [230, 150, 190], [40, 30, 40]], np.float32)


def scene(size: int = 96, seed: int = 0) -> np.ndarray:
    """(H, W) labels 0-3: background, soft tissue, bone blobs, an implant bar."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    lab = np.zeros((size, size), np.int64)
    lab[(y - size / 2) ** 2 + (x - size / 2) ** 2 < (0.42 * size) ** 2] = 1
    blobs = ndimage.gaussian_filter(rng.standard_normal((size, size)), 4) > 0.08
    lab[blobs & (lab == 1)] = 2
    lab[(abs(x - size / 2) < size / 12) & (abs(y - size / 2) < size / 3)] = 3
    return lab


def pair_with_shift(shift: tuple[float, float], size: int = 96,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CT grey values of the scene, and its stained histology showing CT position p + shift."""
    lab = scene(size, seed)
    rng = np.random.default_rng(seed + 1)
    ct = np.array([0.1, 0.35, 0.7, 1.0], np.float32)[lab] + rng.normal(0, 0.03, lab.shape)
    rgb = PALETTE[lab]
    moved = np.stack([ndimage.shift(rgb[..., c], (-shift[0], -shift[1]), order=1,
                                    mode="nearest") for c in range(3)], -1)
    hist = np.clip(moved + rng.normal(0, 4, moved.shape), 0, 255).astype(np.float32)
    return ct.astype(np.float32), hist


def test_mutual_information_is_highest_for_the_matching_image() -> None:
    ct, hist = pair_with_shift((0.0, 0.0))
    a = min_max_scaled(torch.from_numpy(ct)[None, None])
    b = min_max_scaled(torch.from_numpy(np.moveaxis(hist, -1, 0))[None])
    _, moved = pair_with_shift((4.0, 0.0))
    c = min_max_scaled(torch.from_numpy(np.moveaxis(moved, -1, 0))[None])
    noise = torch.rand(1, 3, *ct.shape, generator=torch.Generator().manual_seed(0))
    mi_match, mi_moved, mi_noise = (float(mutual_information(a, x)[0]) for x in (b, c, noise))
    assert mi_match > mi_moved + 0.2 > mi_noise + 0.2
    assert mi_noise < 0.05  # independent images share (almost) no information


def test_fit_recovers_a_known_shift() -> None:
    shift = (3.0, -2.0)
    ct, hist = pair_with_shift(shift)
    fit = fit_histology_warp(ct, hist)
    assert fit.accepted and fit.mi_after > fit.mi_before + 0.2
    inside = scene() > 0
    # registered(p) = hist(p + e(p)) shows the CT at p + e + shift: e should be -shift
    err = np.hypot(fit.field[0] + shift[0], fit.field[1] + shift[1])[inside].mean()
    assert err < 0.75, err
    _, aligned = pair_with_shift((0.0, 0.0))
    before = np.abs(hist - aligned)[inside].mean()
    after = np.abs(apply_field(hist, fit.field) - aligned)[inside].mean()
    assert after < 0.5 * before, (before, after)


def test_fit_leaves_an_aligned_pair_almost_alone() -> None:
    ct, hist = pair_with_shift((0.0, 0.0), seed=3)
    fit = fit_histology_warp(ct, hist)
    inside = scene(seed=3) > 0
    shift = np.hypot(*fit.field)[inside].mean()
    assert shift < 0.5, shift


def test_apply_field_moves_by_the_field_and_keeps_the_dtype() -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    img[5, 7] = 200
    field = np.zeros((2, 20, 20), np.float32)
    field[0], field[1] = 2.0, -3.0      # out(p) = img(p + (2, -3))
    out = apply_field(img, field)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert out[3, 10, 0] == 200 and out.sum() == 600
    mask = np.zeros((20, 20), bool)
    mask[5:8, 7:9] = True
    moved = apply_field(mask, field, "nearest")
    assert moved.dtype == bool and moved[3:6, 10:12].all() and moved.sum() == mask.sum()


def test_register_pairs_writes_a_manifest_that_trains(tmp_path) -> None:
    src = write_pairs(tmp_path / "pairs", 2, seed=5, size=(96, 96), misalignment=3)
    out = register_pairs(src, tmp_path / "reg")
    pairs, originals = read_manifest(out), read_manifest(src)
    assert [p.id for p in pairs] == [p.id for p in originals]
    report = json.loads((tmp_path / "reg" / "register.json").read_text())
    for new, old in zip(pairs, originals, strict=True):
        assert new.ct == old.ct and new.truth == old.truth      # the CT is never moved
        field = np.load(tmp_path / "reg" / "fields" / f"{new.id}.npy")
        assert field.shape == (2, 96, 96) and field.dtype == np.float32
        entry = report["pairs"][new.id]
        assert entry["accepted"] and entry["mi_after"] > entry["mi_before"]
        assert entry["mean_shift_px"] > 1.0     # strength 3 moves the slide by several px
        a, b = read_pair(old, with_truth=True), read_pair(new)
        assert b.mask is not None and b.mask.shape == a.mask.shape
        # the registered slide is closer to the exact stain in the CT's geometry
        inside = a.mask & b.mask
        d_before = np.abs(a.histology - a.truth)[inside].mean()
        d_after = np.abs(b.histology - a.truth)[inside].mean()
        assert d_after < d_before, (d_before, d_after)


def test_register_cli_refuses_to_overwrite_and_bad_input(tmp_path, capsys) -> None:
    src = write_pairs(tmp_path / "pairs", 1, seed=6, size=(64, 64), misalignment=1)
    (tmp_path / "reg").mkdir()
    assert main(["register", str(src), "--out", str(tmp_path / "reg")]) == 2
    assert "exists" in capsys.readouterr().err and not any((tmp_path / "reg").iterdir())
    bad = tmp_path / "bad.csv"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "grey.png")
    bad.write_text(f"id,material,ct,histology\na,mg,{read_manifest(src)[0].ct},grey.png\n")
    assert main(["register", str(bad), "--out", str(tmp_path / "reg2")]) != 0
    err = capsys.readouterr().err
    assert "grey.png" in err and not (tmp_path / "reg2").exists()
    assert main(["register", str(src), "--out", str(tmp_path / "reg3"), "--quiet"]) == 0
    assert (tmp_path / "reg3" / "manifest.csv").is_file()


def test_fit_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same H, W"):
        fit_histology_warp(np.zeros((32, 32), np.float32), np.zeros((32, 30, 3), np.float32))


def test_fit_at_reduced_working_resolution_returns_a_full_size_field() -> None:
    shift = (4.0, -2.0)
    ct, hist = pair_with_shift(shift, size=97)      # odd: the cropped margin is padded
    fit = fit_histology_warp(ct, hist, max_side=48)  # fitted on 48², upsampled ×2
    assert fit.field.shape == (2, 97, 97) and fit.accepted
    inside = scene(97) > 0
    err = np.hypot(fit.field[0] + shift[0], fit.field[1] + shift[1])[inside].mean()
    assert err < 1.0, err


def test_register_pairs_names_files_safely_and_keeps_odd_columns(tmp_path) -> None:
    """Ids with path separators, a YAML manifest, ROIs, extra masks and unknown columns."""
    import yaml

    src = write_pairs(tmp_path / "pairs", 2, seed=8, size=(64, 96), misalignment=1)
    base = read_manifest(src)
    Image.fromarray(np.full((64, 96), 255, np.uint8)).save(tmp_path / "extra.png")
    rows = [{"id": ["a/b", "a_b"][i], "material": p.material, "ct": p.ct,
             "histology": p.histology, "extra_masks": ["extra.png"],
             "bone_roi": "10:20,10:20", "scanner": f"s{i}"} for i, p in enumerate(base)]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"pairs": rows}))
    out = register_pairs(tmp_path / "m.yaml", tmp_path / "reg")
    pairs = read_manifest(out)
    assert [p.id for p in pairs] == ["a/b", "a_b"]
    assert len({p.histology for p in pairs}) == 2              # two files, no clash
    assert all(p.histology.startswith(str(tmp_path / "reg" / "histology")) for p in pairs)
    assert [p.extra["scanner"] for p in pairs] == ["s0", "s1"]
    assert all(p.bone_roi == ((10, 20, 10, 20),) for p in pairs)
    for p in pairs:
        im = read_pair(p)
        assert im.histology.shape == (64, 96, 3) and len(im.extra_masks) == 1
    report = json.loads((tmp_path / "reg" / "register.json").read_text())
    assert {report["pairs"][p]["field"] for p in ("a/b", "a_b")} == {"fields/a_b.npy",
                                                                     "fields/a_b-1.npy"}
