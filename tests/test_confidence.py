"""The confidence image of ``fuse``: the axes' per-voxel disagreement (issue #17 item 5),
and the fuse task's own machinery it rides on (outside mask, in-memory level 1)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hpcstain.ct.outside import outside_mask
from hpcstain.volume import omezarr
from hpcstain.volume.fuse import (
    DISAGREEMENT,
    disagreement,
    fuse_groups,
    fuse_mean,
    fuse_run,
)
from hpcstain.volume.plan import Plan
from hpcstain.volume.rundir import PYRAMID_PENDING, axis_store, write_record
from hpcstain.volume.stain import init_run

SHAPE = (20, 18, 22)


def smooth(shape=SHAPE) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    base = 120 + 40 * np.sin(z / 4.0) * np.cos(y / 5.0) + 30 * np.sin(x / 3.5)
    rgb = np.stack([base, base * 0.8 + 20, 200 - base * 0.5], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def make_run(tmp_path, preds: dict[str, np.ndarray], chunk=(8, 8, 8)):
    """A run dir whose axis arrays hold ``preds``, every slab recorded as done."""
    plan = Plan(input="hand-made", shape=SHAPE, chunk=chunk, axes=tuple(preds),
                voxel_size_um=(5.0, 4.0, 4.0))
    run = init_run(tmp_path / "run", plan)
    for axis, pred in preds.items():
        zarr.open_array(str(axis_store(run, axis)), mode="r+")[...] = pred
    for axis in preds:
        for unit in plan.units:
            if unit.axis == axis:
                write_record(run, f"axis-{axis}", unit.name, {})
    return run, plan


def fuse(run, **kw):
    return fuse_run(run, fill_outside=False, **kw)  # hand-made runs have no input CT


def conf_levels(run, name="fused.ome.zarr") -> list[np.ndarray]:
    group = zarr.open_group(str(run / name / DISAGREEMENT), mode="r")
    return [np.asarray(group[str(k)][...]) for k in range(omezarr.n_levels_of(group))]


def test_disagreement_is_the_rms_colour_distance_to_the_fused_colour():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 256, (3, 6, 7, 8, 3), dtype=np.uint8)
    fused = fuse_mean(preds)
    got = disagreement(preds, fused)
    diff = preds.astype(np.float64) - fused.astype(np.float64)
    want = np.rint(np.sqrt((diff ** 2).mean(axis=(0, 4))))
    # float32 is exact here: SSE/9 is never within 1/36 of (k + 1/2)², far beyond its rounding
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8
    extreme = np.stack([np.zeros((1, 1, 1, 3), np.uint8), np.full((1, 1, 1, 3), 255, np.uint8)])
    assert disagreement(extreme, np.zeros((1, 1, 1, 3), np.uint8))[0, 0, 0] == 180  # √(255²/2)


def test_confidence_image_exists_with_the_fused_images_shape_and_scale(tmp_path):
    truth = smooth()
    run, _ = make_run(tmp_path, {"z": truth, "y": truth, "x": truth})
    fuse(run, pyramid_levels=3)
    root = zarr.open_group(str(run / "fused.ome.zarr"), mode="r")
    group = root[DISAGREEMENT]
    parent, child = omezarr.ngff_attrs(root), omezarr.ngff_attrs(group)
    assert child["multiscales"][0]["axes"] == parent["multiscales"][0]["axes"]
    assert child["multiscales"][0]["datasets"] == parent["multiscales"][0]["datasets"]
    assert child["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] \
        == [1.0, 10.0, 8.0, 8.0]
    assert [c["label"] for c in child["omero"]["channels"]] == [DISAGREEMENT]
    for k in range(3):
        assert group[str(k)].shape == (1, *root[str(k)].shape[1:])
        assert group[str(k)].chunks[1:] == root[str(k)].chunks[1:]
        assert group[str(k)].dtype == np.uint8
    assert root.attrs["hpcstain"]["confidence"] is True


def test_identical_axes_give_zero_and_a_differing_box_gives_exactly_its_distance(tmp_path):
    truth = smooth()
    run, _ = make_run(tmp_path / "same", {"z": truth, "y": truth, "x": truth})
    fuse(run, pyramid_levels=3)
    assert all((level == 0).all() for level in conf_levels(run))

    shifted = truth.copy()
    box = (slice(3, 11), slice(5, 13), slice(2, 9))
    assert int(truth[box].max()) + 30 <= 255
    shifted[box] += 30
    run2, _ = make_run(tmp_path / "diff", {"z": truth, "y": truth, "x": shifted})
    fuse(run2, pyramid_levels=3)
    level0 = conf_levels(run2)[0][0]
    # fused = P + 10; deviations (-10, -10, +20) per channel: √((100 + 100 + 400) / 3) = 14.1
    assert (level0[box] == 14).all()
    outside = np.ones(SHAPE, bool)
    outside[box] = False
    assert (level0[outside] == 0).all()
    levels = conf_levels(run2)
    np.testing.assert_array_equal(levels[1], omezarr.downsample2(levels[0]))
    np.testing.assert_array_equal(levels[2], omezarr.downsample2(levels[1]))


def test_no_confidence_and_single_axis_write_no_disagreement(tmp_path):
    truth = smooth()
    run, _ = make_run(tmp_path, {"z": truth, "x": truth})
    fuse(run, confidence=False)
    root = zarr.open_group(str(run / "fused.ome.zarr"), mode="r")
    assert DISAGREEMENT not in root and root.attrs["hpcstain"]["confidence"] is False
    fuse(run, single_axis="z")
    assert DISAGREEMENT not in zarr.open_group(str(run / "slicewise-z.ome.zarr"), mode="r")

    from hpcstain.cli import main

    assert main(["fuse", str(run), "--out", "cli.ome.zarr", "--no-fill", "--no-progress",
                 "--no-confidence"]) == 0
    assert DISAGREEMENT not in zarr.open_group(str(run / "cli.ome.zarr"), mode="r")
    assert main(["fuse", str(run), "--out", "cli2.ome.zarr", "--no-fill", "--no-progress"]) == 0
    assert DISAGREEMENT in zarr.open_group(str(run / "cli2.ome.zarr"), mode="r")


def test_parallel_confidence_equals_serial_bytes(tmp_path):
    rng = np.random.default_rng(1)
    preds = {a: np.clip(smooth().astype(int) + rng.integers(-9, 10, (*SHAPE, 3)), 0, 255
                        ).astype(np.uint8) for a in "zyx"}
    serial, _ = make_run(tmp_path / "serial", preds, chunk=(6, 5, 8))
    parallel, _ = make_run(tmp_path / "parallel", preds, chunk=(6, 5, 8))
    fuse(serial, method="consistency", pyramid_levels=3)
    fuse(parallel, method="consistency", pyramid_levels=3, workers=2)
    for a, b in zip(conf_levels(serial), conf_levels(parallel), strict=True):
        np.testing.assert_array_equal(a, b)
    assert conf_levels(serial)[0].any()


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_confidence_image_validates_and_opens_in_the_reference_reader(tmp_path, ngff):
    models = pytest.importorskip("ome_zarr_models")
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    truth = smooth()
    shifted = truth.copy()
    shifted[:4] //= 2
    run, _ = make_run(tmp_path, {"z": truth, "y": shifted}, chunk=(8, 8, 8))
    fuse(run, pyramid_levels=2, ngff=ngff)
    image = run / "fused.ome.zarr"
    validator = models.v04.Image if ngff == "0.4" else models.v05.Image
    validator.from_zarr(zarr.open_group(str(image), mode="r"))  # the RGBA image, nested group
    validator.from_zarr(zarr.open_group(str(image / DISAGREEMENT), mode="r"))
    node = next(iter(Reader(parse_url(str(image / DISAGREEMENT)))()))
    np.testing.assert_array_equal(np.asarray(node.data[0]), conf_levels(run)[0])
    assert conf_levels(run)[0].any()
    for group in (zarr.open_group(str(image), mode="r"),  # level 1 written from memory
                  zarr.open_group(str(image / DISAGREEMENT), mode="r")):
        np.testing.assert_array_equal(np.asarray(group["1"][...]),
                                      omezarr.downsample2(np.asarray(group["0"][...])))


def test_outside_mask_is_the_box_mean_test_and_does_not_depend_on_the_box():
    rng = np.random.default_rng(2)
    ct = rng.integers(6000, 17000, (14, 15, 16)).astype(np.uint16)
    levels = (30000.0, 10000.0)  # threshold 11600: 11600·125 is exact in float32
    whole = tuple(slice(0, n) for n in ct.shape)
    mask = outside_mask(ct, whole, whole, levels)
    padded = np.pad(ct.astype(np.float64), 2, mode="symmetric")
    sums = sum(padded[dz:dz + 14, dy:dy + 15, dx:dx + 16]
               for dz in range(5) for dy in range(5) for dx in range(5))
    np.testing.assert_array_equal(mask, sums < 11600 * 125)
    assert 0.1 < mask.mean() < 0.9
    inner = (slice(3, 9), slice(0, 7), slice(5, 16))
    grown = (slice(1, 11), slice(0, 9), slice(3, 16))
    np.testing.assert_array_equal(outside_mask(ct[grown], inner, grown, levels), mask[inner])
    assert not outside_mask(ct + 20000, whole, whole, levels).any()  # the min-only answer
    assert outside_mask(ct // 2, whole, whole, levels).all()          # the max-only answer


def test_groups_hold_whole_level1_chunks_and_respect_the_budget():
    plan = Plan(input="x", shape=(128, 384, 384), chunk=(64, 64, 64))
    todo = list(range(plan.n_chunks))
    assert fuse_groups(plan, todo) == [todo]  # 132·388·388 voxels fit the default budget
    groups = fuse_groups(plan, todo, min_groups=8)
    assert len(groups) >= 8 and sorted(i for g in groups for i in g) == todo
    for g in groups:
        coords = np.array([plan.chunk_coords(i) for i in g])
        assert (coords.min(axis=0) % 2 == 0).all()  # aligned on level-1 chunks
    small = fuse_groups(plan, todo, budget=70 ** 3)
    assert all(len(g) == 1 for g in small)


def test_interrupted_pass_leaves_a_marker_and_the_next_one_rebuilds_the_pyramid(tmp_path):
    truth = smooth()
    run, _ = make_run(tmp_path, {"z": truth, "y": truth // 2, "x": truth})
    fuse(run, pyramid_levels=3)
    root = zarr.open_group(str(run / "fused.ome.zarr"), mode="r+")
    good = [np.asarray(root[str(k)][...]) for k in (1, 2)]
    root["1"][...] = 0  # a pass that died after level 0, before its pyramid
    root["2"][...] = 0
    (run / "done" / "fused" / PYRAMID_PENDING).touch()
    report = fuse(run, pyramid_levels=3)
    assert report.fused == [] and not (run / "done" / "fused" / PYRAMID_PENDING).exists()
    for k, want in zip((1, 2), good, strict=True):
        np.testing.assert_array_equal(np.asarray(root[str(k)][...]), want)


def test_any_grouping_gives_the_same_bytes(tmp_path, monkeypatch):
    """One group, 2×2×2 groups and one chunk per group (the huge-chunk fallback) write the
    same RGBA and disagreement at every level, odd chunk sizes and the outside fill from a
    real CT included."""
    import functools

    from hpcstain.executors import run_stain
    from hpcstain.phantom import write_volume_file
    from hpcstain.volume import fuse as fuse_module
    from hpcstain.volume import init_run as init
    from hpcstain.volume import make_plan, open_volume

    path = write_volume_file(tmp_path / "ph.zarr", (22, 30, 26), "ti", 5)
    plan = make_plan(open_volume(f"{path}:ct"), chunk=(5, 7, 6), tile=16, step=8,
                     levels=(26000.0, 10000.0))
    run = init(tmp_path / "run", plan)

    def colour(batch):  # a per-axis-different stand-in: the axes disagree near edges
        import torch

        g = batch[:, :1]
        return torch.cat([torch.tanh(2 * g), torch.roll(g, 1, -1), -g], dim=1)

    run_stain(run, colour, progress=False)
    original = fuse_module.fuse_groups
    outputs = {}
    for name, kw in {"one": {}, "pairs": {"min_groups": 1000},
                     "single": {"budget": 1}}.items():
        monkeypatch.setattr(fuse_module, "fuse_groups", functools.partial(original, **kw))
        fuse_module.fuse_run(run, out=f"{name}.ome.zarr", pyramid_levels=3)
        root = zarr.open_group(str(run / f"{name}.ome.zarr"), mode="r")
        outputs[name] = [np.asarray(g[str(k)][...]) for g in (root, root[DISAGREEMENT])
                         for k in range(3)]
    assert outputs["one"][3].any() and (outputs["one"][0] == 250).any()  # painted, disagree
    for name in ("pairs", "single"):
        for a, b in zip(outputs["one"], outputs[name], strict=True):
            np.testing.assert_array_equal(a, b)
