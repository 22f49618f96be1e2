"""§2.8 correspondence masks: intersected convex hulls, extra masks, manifest masks, cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from skimage.morphology import convex_hull_image

from hpcstain.data import masks
from hpcstain.data.manifest import PairImages, read_manifest, read_pair
from hpcstain.data.masks import correspondence_mask, load_or_compute_mask, segment_ct
from hpcstain.data.normalise import find_pair_rois
from hpcstain.data.toy import png_bytes, toy_pair, write_toy_manifest
from hpcstain.errors import InputError


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    return np.hypot(y - cy, x - cx) <= r


def test_mask_is_the_intersection_of_the_two_hulls_and_extras() -> None:
    shape = (64, 64)
    ct_seg = disc(shape, 30, 24, 6) | disc(shape, 30, 44, 6)      # two blobs: hull = capsule
    hist_seg = disc(shape, 20, 34, 4) | disc(shape, 44, 34, 4)
    extra = np.ones(shape, dtype=bool)
    extra[:, :30] = False
    got = correspondence_mask(ct_seg, hist_seg, [extra])
    expected = convex_hull_image(ct_seg) & convex_hull_image(hist_seg) & extra
    assert np.array_equal(got, expected)
    assert got[30, 34] and not ct_seg[30, 34] and not hist_seg[30, 34]  # hull fills the gap
    assert not got[30, 26]                                             # removed by the extra


def test_pair_mask_keeps_bone_and_screw_drops_the_ct_only_tube_wall() -> None:
    toy = toy_pair(128, "ti", seed=0)
    ct, rgb = toy.ct.astype(np.float32), toy.histology.astype(np.float32)
    rois = find_pair_rois(ct, rgb)
    assert segment_ct(ct, rois)[toy.wall].mean() > 0.9     # the wall is bright in CT ...
    mask = masks.pair_mask(PairImages(ct, rgb, None, []), rois)
    assert not mask[toy.wall].any()                          # ... but not in the mask
    assert mask[toy.bone].mean() > 0.97 and mask[toy.screw].all()
    assert mask[toy.background].mean() < 0.1


def test_manifest_mask_is_used_and_anded_with_extras(tmp_path: Path) -> None:
    path = write_toy_manifest(tmp_path, ("mg",), size=48)
    given = np.zeros((48, 48), dtype=np.uint8)
    given[5:40, 5:40] = 255
    extra = np.full((48, 48), 255, dtype=np.uint8)
    extra[:, :20] = 0
    (tmp_path / "m.png").write_bytes(png_bytes(given))
    (tmp_path / "e.png").write_bytes(png_bytes(extra))
    rows = path.read_text().splitlines()
    rows[0] += ",extra_masks"
    rows[1] = rows[1].replace(",,", ",m.png,") + ",e.png"
    path.write_text("\n".join(rows) + "\n")
    (pair,) = read_manifest(path)
    images = read_pair(pair)
    mask = load_or_compute_mask(pair, images, find_pair_rois(images.ct, images.histology), None)
    assert np.array_equal(mask, (given > 0) & (extra > 0))


def test_mask_is_cached_and_recomputed_when_an_input_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_toy_manifest(tmp_path / "d", ("peek",), size=64)
    (pair,) = read_manifest(path)
    images = read_pair(pair)
    rois = find_pair_rois(images.ct, images.histology)
    cache = tmp_path / "cache"
    first = load_or_compute_mask(pair, images, rois, cache)
    assert len(list(cache.glob("mask-toy_00-*.npz"))) == 1

    def boom(*_a: object, **_k: object) -> np.ndarray:
        raise AssertionError("recomputed despite a cache entry")

    monkeypatch.setattr(masks, "pair_mask", boom)
    assert np.array_equal(load_or_compute_mask(pair, images, rois, cache), first)
    monkeypatch.undo()
    ct_file = Path(pair.ct)
    st = ct_file.stat()
    os.utime(ct_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # input touched
    load_or_compute_mask(pair, images, rois, cache)
    assert len(list(cache.glob("mask-toy_00-*.npz"))) == 2


def test_nothing_segmented_is_a_clear_error() -> None:
    empty = np.zeros((16, 16), dtype=bool)
    with pytest.raises(InputError, match="p7 CT: nothing segmented"):
        correspondence_mask(empty, ~empty, what="p7")
