"""Fuse's outside-the-sample test drops thin walls detached from the sample (the sample
tube), keeps every voxel of the sample, and does not depend on the chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage

from hpcstain.ct.outside import (
    OUTSIDE_ERODE,
    OUTSIDE_KEEP,
    OUTSIDE_REACH,
    outside_mask,
    outside_of_sample,
    thick_inside,
)
from hpcstain.errors import UsageError
from hpcstain.executors import run_stain
from hpcstain.metrics.volume import sample_mask
from hpcstain.phantom import write_volume_file
from hpcstain.phantom.sample import LABELS
from hpcstain.volume import fuse_run, init_run, make_plan, open_volume
from hpcstain.volume.fuse import background_rgba

LEVELS = (30000.0, 10000.0)  # threshold 11600


def whole(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def reference(ct: np.ndarray) -> np.ndarray:
    """The rule on the whole volume with scipy's filters: box-mean inside, eroded by a
    7³ cube, dilated by a 17³ cube, both mirrored at the border (scipy's "reflect")."""
    inside = ~outside_mask(ct, whole(ct.shape), whole(ct.shape), LEVELS)
    core = ndimage.minimum_filter(inside.view(np.uint8), size=2 * OUTSIDE_ERODE + 1,
                                  mode="reflect")
    near = ndimage.maximum_filter(core, size=2 * OUTSIDE_KEEP + 1, mode="reflect")
    return ~(inside & near.astype(bool))


def tube_and_block(shape: tuple[int, int, int] = (20, 40, 44)) -> np.ndarray:
    """Resin (9500) with a dense block and, 10 voxels away, a 2-voxel wall at 16000."""
    ct = np.full(shape, 9500, np.uint16)
    ct[3:17, 4:24, 8:30] = 16000   # the sample: thick
    ct[:, 34:36, :] = 16000        # the wall: thin, detached (10 voxels of resin between)
    return ct


def grow_clip(inner: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - OUTSIDE_REACH), min(n, s.stop + OUTSIDE_REACH))
                 for s, n in zip(inner, shape, strict=True))


def test_thin_detached_wall_is_outside_and_the_thick_block_whole():
    ct = tube_and_block()
    box = whole(ct.shape)
    plain = outside_mask(ct, box, box, LEVELS)
    opened = outside_of_sample(ct, box, box, LEVELS)
    wall = np.zeros(ct.shape, bool)
    wall[:, 34:36, :] = True
    block = np.zeros(ct.shape, bool)
    block[3:17, 4:24, 8:30] = True
    assert not plain[wall].all()          # the box mean alone keeps (part of) the wall …
    assert opened[wall].all()             # … the opening paints all of it
    # every block voxel the box mean keeps stays inside, its edges and corners too
    np.testing.assert_array_equal(opened[block], plain[block])
    assert plain[block].mean() < 0.1
    assert (opened | ~plain).all() and (opened >= plain).all()  # only ever adds outside


def test_outside_of_sample_is_the_whole_volume_rule_in_any_box():
    rng = np.random.default_rng(5)
    ct = tube_and_block((18, 40, 44)).astype(np.int32)
    ct[2:16, 0:14, 40:44] = 16000  # 4 voxels thin, against the border: 8 once mirrored
    ct = np.clip(ct + rng.integers(-4000, 4000, ct.shape), 0, 65535).astype(np.uint16)
    expected = reference(ct)
    np.testing.assert_array_equal(outside_of_sample(ct, whole(ct.shape), whole(ct.shape),
                                                 LEVELS), expected)
    assert 0.1 < expected.mean() < 0.9
    plain = outside_mask(ct, whole(ct.shape), whole(ct.shape), LEVELS)
    assert (expected & ~plain).sum() > 1000  # the opening paints the wall …
    assert not expected[4:14, 0:12, 41:44].any()  # … not what the border cuts thin
    for inner in [(slice(0, 5), slice(0, 7), slice(0, 9)),      # a corner of the volume
                  (slice(6, 11), slice(10, 21), slice(12, 19)),  # deep inside
                  (slice(13, 18), slice(30, 40), slice(1, 44)),  # the wall, far faces
                  (slice(0, 18), slice(24, 35), slice(20, 30)),  # block edge to wall
                  (slice(2, 3), slice(0, 40), slice(43, 44))]:   # one-voxel thin
        grown = grow_clip(inner, ct.shape)
        got = outside_of_sample(ct[grown], inner, grown, LEVELS)
        np.testing.assert_array_equal(got, expected[inner], err_msg=str(inner))


def test_thick_inside_keeps_thick_shapes_whole():
    inside = np.zeros((30, 30, 30), bool)
    z, y, x = np.ogrid[:30, :30, :30]
    inside[(z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 64] = True  # a ball, r = 8
    pad = OUTSIDE_ERODE + OUTSIDE_KEEP
    kept = thick_inside(np.pad(inside, pad, mode="symmetric"))
    assert kept.shape == inside.shape
    assert kept[inside].all()  # keep (8) >= erode (3): the rim the erosion took comes back


def colour_map(batch: torch.Tensor) -> torch.Tensor:
    g = batch[:, :1]
    return torch.cat([-0.2 - 0.6 * g, -0.5 - 0.4 * g, 0.3 - 0.3 * g], dim=1).clamp(-1, 1)


def test_phantom_tube_gets_the_background_and_chunking_does_not_matter(tmp_path):
    """A small phantom (its tube wall ~2 voxels): fuse with two chunk sizes gives the same
    bytes; most of the tube is painted (the box mean alone paints 37 %), and no sample
    voxel is painted that the box mean alone keeps."""
    path = write_volume_file(tmp_path / "ph.zarr", (24, 128, 128), "mg", 11)
    group = zarr.open_group(str(path), mode="r")
    labels, ct = group["labels"][...], group["ct"][...]
    images = []
    for chunk in ((24, 64, 64), (8, 48, 40)):
        plan = make_plan(open_volume(f"{path}:ct"), chunk=chunk, axes="z", tile=128,
                         step=96, sigma=0.0)
        run = init_run(tmp_path / f"run-{chunk[1]}", plan)
        run_stain(run, colour_map, progress=False)
        fuse_run(run, method="mean")
        images.append(np.asarray(zarr.open_group(str(run / "fused.ome.zarr"),
                                                 mode="r")["0"][...]))
    np.testing.assert_array_equal(images[0], images[1])
    painted = (np.moveaxis(images[0], 0, -1) == background_rgba()).all(-1)
    tube = labels == LABELS["tube"]
    sample, _ = sample_mask(labels.shape, labels=labels)
    plain = outside_mask(ct, whole(ct.shape), whole(ct.shape),
                         (plan.bone_level, plan.background_level))
    assert plain[tube].mean() < 0.45          # measured 0.37: the box mean keeps the wall
    assert painted[tube].mean() > 0.7         # measured 0.79 (the rest touches the sample)
    assert not (painted & sample & ~plain).any()  # no sample voxel lost to the opening
    assert (painted == plain)[~tube & (labels != 0)].all()  # the sample: the box mean's


def test_an_image_fused_with_the_box_mean_alone_is_not_resumed_with_the_opening(tmp_path):
    path = write_volume_file(tmp_path / "ph.zarr", (8, 32, 32), "ti", 2)
    plan = make_plan(open_volume(f"{path}:ct"), chunk=(8, 16, 16), axes="z", tile=32,
                     step=16, sigma=0.0)
    run = init_run(tmp_path / "run", plan)
    run_stain(run, colour_map, progress=False)
    fuse_run(run)
    group = zarr.open_group(str(run / "fused.ome.zarr"), mode="r+")
    settings = dict(group.attrs["hpcstain"])
    assert settings.pop("outside_test") == "box5-erode3-keep8"
    group.attrs["hpcstain"] = settings  # as written before the opening existed
    with pytest.raises(UsageError, match="outside_test: 'box5' -> 'box5-erode3-keep8'"):
        fuse_run(run)
    fuse_run(run, fill_outside=False, out="raw.ome.zarr")  # no test: nothing to compare
    fuse_run(run, fill_outside=False, out="raw.ome.zarr")
