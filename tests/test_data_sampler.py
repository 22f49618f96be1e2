"""§2.7 patch sampler: aligned augmentation, jitter, reproducible per-index/per-rank RNG."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, DistributedSampler

from hpcstain.config import DataConfig
from hpcstain.data.augment import draw_geometry, jitter_histology
from hpcstain.data.manifest import read_manifest
from hpcstain.data.sampler import PairedPatchDataset, Slide, load_slides
from hpcstain.data.toy import write_toy_manifest
from hpcstain.errors import InputError

GAIN = np.array([0.5, -0.3, 0.2], dtype=np.float32)
OFFSET = np.array([0.1, 0.2, -0.1], dtype=np.float32)
STILL = DataConfig(patch_size=32, patches_per_pair=8, brightness_jitter=0.0,
                   contrast_jitter=0.0)


def related_slide(size: int = 80, seed: int = 0) -> Slide:
    """Histology channel c = GAIN[c] * CT + OFFSET[c] everywhere; mask = CT > 0."""
    f = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 4)
    ct = (0.8 * f / np.abs(f).max()).astype(np.float32)
    hist = GAIN[:, None, None] * ct + OFFSET[:, None, None]
    return Slide(f"s{seed}", "mg", np.concatenate([ct[None], hist]), ct > 0)


def check_related(item: dict) -> None:
    ct, hist = item["ct"][0], item["histology"]
    expected = torch.from_numpy(GAIN)[:, None, None] * ct + torch.from_numpy(OFFSET)[:, None,
                                                                                      None]
    torch.testing.assert_close(hist, expected, atol=1e-5, rtol=0)


def test_items_have_the_documented_shapes_ranges_and_length(tmp_path: Path) -> None:
    pairs = read_manifest(write_toy_manifest(tmp_path, ("mg", "ti"), size=64))
    cfg = replace(DataConfig(), patch_size=32, patches_per_pair=5)
    ds = PairedPatchDataset(load_slides(pairs, cfg, tmp_path / "cache"), cfg, ct_channels=3)
    assert len(ds) == 10
    item = ds[3]
    assert item["ct"].shape == (3, 32, 32) and item["ct"].dtype == torch.float32
    assert item["histology"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    for key in ("ct", "histology"):
        assert item[key].min() >= -1 and item[key].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["pair"] == 1 and ds[4]["pair"] == 0
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["ct"].shape == (4, 3, 32, 32) and batch["pair"].tolist() == [0, 1, 0, 1]
    with pytest.raises(IndexError):
        ds[10]


def test_augmentation_keeps_ct_histology_and_mask_aligned() -> None:
    ds = PairedPatchDataset([related_slide()], STILL, ct_channels=1, seed=1)
    agree = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            check_related(item)                       # pixelwise relation survives
            agree.append(float(((item["ct"][0] > 0) == (item["mask"][0] > 0)).float().mean()))
    assert min(agree) > 0.9 and np.mean(agree) > 0.97  # nearest vs bilinear at edges only
    exact = PairedPatchDataset([related_slide()], replace(STILL, rescale_min=1.0,
                                                          rescale_max=1.0), ct_channels=1)
    for i in range(len(exact)):
        item = exact[i]
        assert torch.equal(item["ct"][0] > 0, item["mask"][0] > 0)


def test_geometry_spans_90_to_110_percent_and_both_flips() -> None:
    draws = [draw_geometry(np.random.default_rng([0, i]), (500, 400), 256, (0.9, 1.1), True)
             for i in range(300)]
    sizes = [g.size for g in draws]
    assert min(sizes) >= round(256 / 1.1) and max(sizes) <= round(256 / 0.9)
    assert max(sizes) - min(sizes) > 40
    assert {g.flip_h for g in draws} == {True, False} == {g.flip_v for g in draws}
    assert all(g.y0 + g.size <= 500 and g.x0 + g.size <= 400 for g in draws)


def test_histology_jitter_changes_lightness_but_keeps_rgb_ratios() -> None:
    rgb = torch.rand(3, 16, 16) * 1.1 - 0.9  # in [-0.9, 0.2]: none black or saturated
    for b, k in ((1.1, 0.9), (0.9, 1.1), (1.05, 1.05)):
        out = jitter_histology(rgb, b, k)
        u, v = (rgb + 1) / 2, (out + 1) / 2
        torch.testing.assert_close(v / v.sum(0), u / u.sum(0), atol=1e-5, rtol=1e-4)
        assert v.mean() / u.mean() == pytest.approx(b, rel=1e-4)  # brightness: mean level
        ratio = v.mean(0).std() / u.mean(0).std()
        assert ratio == pytest.approx(k, rel=1e-3)  # contrast: spread of the lightness


def test_ct_jitter_is_bounded_and_separate_from_histology() -> None:
    cfg = replace(STILL, brightness_jitter=0.1, contrast_jitter=0.1)
    plain = PairedPatchDataset([related_slide()], STILL, ct_channels=1, seed=4)
    jit = PairedPatchDataset([related_slide()], cfg, ct_channels=1, seed=4)
    ratios = []
    for i in range(len(jit)):
        a, b = plain[i], jit[i]
        ua, ub = (a["ct"] + 1) / 2, (b["ct"] + 1) / 2
        ratios.append(float(ub.mean() / ua.mean()))
        assert torch.equal(a["mask"], b["mask"])  # same geometry, intensity only
    assert all(0.9 - 1e-4 <= r <= 1.1 + 1e-4 for r in ratios) and np.ptp(ratios) > 0.01


def test_ct_channels_are_replicated_and_inverted_ct_is_negated() -> None:
    slide = related_slide()
    ds = PairedPatchDataset([slide], STILL, ct_channels=3, seed=2)
    inv = PairedPatchDataset([slide], replace(STILL, invert_ct=True), ct_channels=3, seed=2)
    a, b = ds[5], inv[5]
    assert torch.equal(a["ct"][0], a["ct"][2]) and a["ct"].shape[0] == 3
    assert torch.equal(b["ct"], -a["ct"]) and torch.equal(b["histology"], a["histology"])


def test_same_seed_epoch_index_give_the_same_patch_whatever_the_workers() -> None:
    slides = [related_slide(seed=s) for s in range(2)]
    ds = PairedPatchDataset(slides, STILL, ct_channels=1, seed=7)
    ds.set_epoch(3)
    one = torch.cat([b["histology"] for b in DataLoader(ds, batch_size=4, num_workers=0)])
    two = torch.cat([b["histology"] for b in DataLoader(ds, batch_size=4, num_workers=2)])
    assert torch.equal(one, two)
    ds.set_epoch(4)
    assert not torch.equal(ds[0]["histology"], one[0])      # new augmentation per epoch
    val = PairedPatchDataset(slides, STILL, ct_channels=1, seed=7, augment=False)
    first = val[0]["histology"]
    val.set_epoch(9)
    assert torch.equal(val[0]["histology"], first)          # validation patches are fixed


def test_ranks_draw_different_patches_and_repeat_with_the_same_seed() -> None:
    slides = [related_slide(seed=s) for s in range(3)]

    def rank_patches(rank: int, seed: int) -> torch.Tensor:
        ds = PairedPatchDataset(slides, STILL, ct_channels=1, seed=seed)
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        return torch.stack([ds[i]["ct"] for i in sampler])

    r0, r1 = rank_patches(0, seed=11), rank_patches(1, seed=11)
    assert r0.shape == r1.shape == (12, 1, 32, 32)
    assert not any(torch.equal(a, b) for a in r0 for b in r1)
    assert torch.equal(rank_patches(0, seed=11), r0)
    assert not torch.equal(rank_patches(0, seed=12), r0)


def test_min_mask_coverage_rejects_patches_with_little_mask() -> None:
    slide = related_slide(size=96)
    slide.mask[:] = False
    slide.mask[:, :60] = True
    cfg = replace(STILL, min_mask_coverage=0.9, rescale_min=1.0, rescale_max=1.0, flips=False)
    loose = PairedPatchDataset([slide], replace(cfg, min_mask_coverage=0.0), ct_channels=1)
    strict = PairedPatchDataset([slide], cfg, ct_channels=1)
    cov_loose = [float(loose[i]["mask"].mean()) for i in range(len(loose))]
    cov_strict = [float(strict[i]["mask"].mean()) for i in range(len(strict))]
    assert min(cov_strict) >= 0.9 and min(cov_loose) < 0.9


def test_slides_smaller_than_the_patch_are_refused() -> None:
    with pytest.raises(InputError, match=r"smaller than the 32×32 patch size: s0 \(20×20\)"):
        PairedPatchDataset([related_slide(size=20)], STILL)


def test_phantom_manifest_loads_end_to_end(tmp_path: Path) -> None:
    phantom = pytest.importorskip("hpcstain.phantom")
    manifest = phantom.write_pairs(tmp_path / "pairs", n=3, seed=1, size=(96, 96))
    pairs = read_manifest(manifest)
    cfg = replace(DataConfig(), patch_size=64, patches_per_pair=4, min_mask_coverage=0.3)
    slides = load_slides(pairs, cfg, tmp_path / "cache")
    assert {s.material for s in slides} <= {"mg", "ti", "peek"}
    for s in slides:
        assert s.roi_method == "auto-pair"
        assert 0.05 < s.mask.mean() < 0.95
        assert abs(s.histology[:, ~s.mask].mean() - s.histology.max()) < 0.5  # light outside
    ds = PairedPatchDataset(slides, cfg, ct_channels=3, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["ct"].shape == (4, 3, 64, 64) and torch.isfinite(batch["histology"]).all()


def test_manifest_rois_override_automatic_ones(tmp_path: Path) -> None:
    path = write_toy_manifest(tmp_path, ("ti",), size=64)
    rows = path.read_text().splitlines()
    rows[0] += ",bone_roi"
    rows[1] += ',"30:34,30:34"'  # deliberately the Ti screw: it becomes the "bone" level
    path.write_text("\n".join(rows) + "\n")
    (slide,) = load_slides(read_manifest(path), DataConfig())
    assert slide.roi_method == "manifest+auto"
    ct16 = (slide.ct + 1) / 2 * 65535
    assert float(ct16[30:34, 30:34].mean()) == pytest.approx(30000, rel=1e-3)


# --------------------------------------------------------------------------- scanned CT


def _levels() -> tuple[float, float]:
    from hpcstain.ct.signed import ct16_to_signed

    return (float(ct16_to_signed(np.float32(30000))), float(ct16_to_signed(np.float32(10000))))


def test_scan_augment_zero_leaves_every_item_as_before() -> None:
    """scan_augment 0 (every shipped recipe) draws nothing more: the same items bit for bit."""
    slides = [related_slide(80, s) for s in range(2)]
    a = PairedPatchDataset(slides, STILL, seed=4)
    b = PairedPatchDataset(slides, replace(STILL, scan_augment=0.0), seed=4)
    for i in range(len(a)):
        assert torch.equal(a[i]["ct"], b[i]["ct"])


def test_scanned_ct_keeps_the_histology_and_changes_the_ct_within_bounds() -> None:
    slides = [related_slide(80, s) for s in range(2)]
    plain = PairedPatchDataset(slides, STILL, seed=4)
    scanned = PairedPatchDataset(slides, replace(STILL, scan_augment=1.0), seed=4)
    changed = 0
    for i in range(len(plain)):
        p, s = plain[i], scanned[i]
        assert torch.equal(p["histology"], s["histology"]) and torch.equal(p["mask"], s["mask"])
        assert s["ct"].min() >= -1 and s["ct"].max() <= 1
        diff = (s["ct"] - p["ct"]).abs()
        changed += int(diff.mean() > 1e-3)
        assert diff.mean() < 0.25          # the same section, re-imaged: not another image
        assert torch.equal(scanned[i]["ct"], s["ct"])   # one draw per (seed, epoch, index)
    assert changed == len(plain)


def test_scan_draw_parts_do_what_they_say() -> None:
    from hpcstain.data.augment import ScanDraw, scan_ct

    bone, bg = _levels()
    gap = bone - bg
    u = torch.linspace(-0.2, 1.2, 64)
    planes = (bg + gap * u).expand(3, 64, 64).clone()
    none = ScanDraw(curve=0.0, gain=1.0, offset=0.0, noise=0.0, highpass=False, rings=(),
                    centre=(0.0, 0.0), streaks=(), burst=(), blur=0.0, seed=0)
    torch.testing.assert_close(scan_ct(planes, none, bone, bg), planes)
    # the tissue curve moves grey values between the levels only, and monotonically
    curved = scan_ct(planes, replace(none, curve=0.6), bone, bg)[0, 0]
    inside = (u > 0) & (u < 1)
    mid = (u > 0.1) & (u < 0.9)
    assert torch.all(curved[inside] >= planes[0, 0][inside] - 1e-6)
    assert torch.all(curved[mid] > planes[0, 0][mid] + 0.03 * gap)
    torch.testing.assert_close(curved[~inside], planes[0, 0][~inside])
    assert torch.all(curved[1:] >= curved[:-1])
    # levels read off: the gap scales about the background level
    gained = scan_ct(planes, replace(none, gain=1.1), bone, bg)[0, 0]
    torch.testing.assert_close(gained - bg, (planes[0, 0] - bg) * 1.1)
    # noise: independent per plane, about the σ asked, high-passed or not
    for hp in (False, True):
        noisy = scan_ct(planes, replace(none, noise=0.02, highpass=hp), bone, bg) - planes
        assert 0.016 < float(noisy.std()) < 0.024
        assert not torch.equal(noisy[0], noisy[1])
    # a ring is a circle about its centre; rings and streaks are the same in every plane
    ringed = scan_ct(planes, replace(none, rings=((20.0, 0.04),), centre=(32.0, 32.0)),
                     bone, bg) - planes
    assert torch.equal(ringed[0], ringed[2])
    assert ringed[0, 32, 52] == pytest.approx(0.04, abs=1e-3)
    assert abs(float(ringed[0, 32, 32])) < 1e-6
    # the burst crosses at the metal and is absent without one
    metal = planes.clone()
    metal[:, 30:34, 40:44] = bg + 3 * gap
    burst = replace(none, burst=((0.0, 0.1),))
    assert torch.equal(scan_ct(planes, burst, bone, bg), planes)
    streaked = scan_ct(metal, burst, bone, bg) - metal
    assert float(streaked[0, 31, 5]) > 0.05       # along the metal's row (angle 0)
    assert abs(float(streaked[0, 5, 5])) < 1e-3


def test_scanned_ct_of_a_2_5d_item_keeps_the_slice_the_slab_centre() -> None:
    rng = np.random.default_rng(0)
    ct = ndimage.gaussian_filter(rng.normal(size=(5, 64, 64)), (0, 3, 3)).astype(np.float32)
    ct = 0.6 * ct / np.abs(ct).max()
    hist = np.concatenate([ct[2:3]] * 3)
    slide = Slide("s", "mg", np.concatenate([ct[2:3], hist]), ct[2] > 0, context=ct)
    cfg = replace(STILL, scan_augment=1.0)
    ds = PairedPatchDataset([slide], cfg, seed=2, context_slices=5, ct_channels=1)
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["ct"][0], item["ct_context"][2])
        assert not torch.equal(item["ct_context"][1], item["ct_context"][3])
