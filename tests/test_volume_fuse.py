"""Fusion of per-axis predictions and the OME-Zarr pyramid, on hand-made per-axis arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from hpcstain.errors import UsageError
from hpcstain.volume import omezarr
from hpcstain.volume.fuse import (
    fuse_consistency,
    fuse_mean,
    fuse_median,
    stripe_index,
    with_alpha,
)
from hpcstain.volume.fuse import fuse_run as _fuse_run
from hpcstain.volume.plan import Plan
from hpcstain.volume.rundir import axis_store, write_record
from hpcstain.volume.stain import init_run

SHAPE = (20, 18, 22)


def fuse_run(*args, **kwargs):
    """These runs hold hand-made axis arrays and no input CT: nothing to find the sample in
    (the outside fill is tested on a real volume in test_volume_e2e.py)."""
    return _fuse_run(*args, fill_outside=False, **kwargs)


def smooth_truth(shape=SHAPE, seed=0) -> np.ndarray:
    """A smooth, isotropic RGB volume in the middle of the uint8 range."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    base = 120 + 40 * np.sin(z / 4.0) * np.cos(y / 5.0) + 30 * np.sin(x / 3.5)
    return np.stack([base, base * 0.8 + 20, 200 - base * 0.5], axis=-1).astype(np.float32)


def striped(truth: np.ndarray, axis: int, amplitude: float, seed: int) -> np.ndarray:
    """Truth + a random offset per slice along ``axis`` (slice-wise staining stripes)."""
    rng = np.random.default_rng(seed)
    shape = [1, 1, 1, 1]
    shape[axis] = truth.shape[axis]
    offsets = rng.normal(0, amplitude, shape).astype(np.float32)
    noise = rng.normal(0, 0.5, truth.shape).astype(np.float32)
    return np.clip(np.rint(truth + offsets + noise), 0, 255).astype(np.uint8)


def make_run(tmp_path, preds: dict[str, np.ndarray], chunk=(8, 8, 8), complete=None,
             voxel=(5.0, 5.0, 5.0), **plan_kw):
    """A run dir whose axis arrays hold ``preds``; the slabs covering the ``complete``
    chunks are recorded as done."""
    plan = Plan(input="hand-made", shape=SHAPE, chunk=chunk, axes=tuple(preds),
                voxel_size_um=voxel, **plan_kw)
    run = init_run(tmp_path / "run", plan)
    for axis, pred in preds.items():
        zarr.open_array(str(axis_store(run, axis)), mode="r+")[...] = pred
    for i in range(plan.n_chunks) if complete is None else complete:
        complete_chunk(run, plan, i, tuple(preds))
    return run, plan


def complete_chunk(run, plan, index, axes) -> None:
    """Completion records for every axis's slab(s) covering chunk ``index``."""
    for axis in axes:
        for name in plan.units_covering(axis, plan.write_region(index)):
            write_record(run, f"axis-{axis}", name, {})


def read_level0_rgb(run, name="fused.ome.zarr") -> np.ndarray:
    root = zarr.open_group(str(run / name), mode="r")
    return np.moveaxis(np.asarray(root["0"][...]), 0, -1)


def test_mean_and_median_of_hand_made_arrays():
    preds = np.array([[10, 20, 30], [40, 50, 61], [100, 0, 30]], np.uint8).reshape(3, 1, 1, 1, 3)
    np.testing.assert_array_equal(fuse_mean(preds)[0, 0, 0], [50, 23, 40])
    np.testing.assert_array_equal(fuse_median(preds)[0, 0, 0], [40, 20, 30])


def test_alpha_is_mean_of_rgb():
    rgba = with_alpha(np.array([[[[30, 60, 91]]]], np.uint8))
    np.testing.assert_array_equal(rgba[0, 0, 0], [30, 60, 91, 60])


def test_consistency_fusion_beats_mean_on_z_stripes():
    truth = smooth_truth()
    preds = np.stack([striped(truth, 0, 12.0, 1), striped(truth, 1, 1.0, 2),
                      striped(truth, 2, 1.0, 3)])
    mean = fuse_mean(preds)
    smart = fuse_consistency(preds, (0, 1, 2))
    s_truth, s_mean, s_smart = (stripe_index(v, 0) for v in (truth, mean, smart))
    assert stripe_index(preds[0], 0) > s_mean > s_smart
    assert s_smart - s_truth < 0.25 * (s_mean - s_truth)  # most of the excess is gone
    err_mean = np.abs(mean.astype(float) - truth).mean()
    err_smart = np.abs(smart.astype(float) - truth).mean()
    assert err_smart < err_mean


def test_fuse_run_writes_valid_ome_zarr_with_pyramid(tmp_path):
    truth = smooth_truth()
    preds = {"z": striped(truth, 0, 6, 1), "y": striped(truth, 1, 6, 2),
             "x": striped(truth, 2, 6, 3)}
    run, plan = make_run(tmp_path, preds)
    report = fuse_run(run, method="mean", pyramid_levels=3)
    assert report.complete and len(report.fused) == plan.n_chunks

    root = zarr.open_group(str(run / "fused.ome.zarr"), mode="r", zarr_format=2)
    ms = root.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["axes"][0]["type"] == "channel"
    assert all(a["type"] == "space" and a["unit"] == "micrometer" for a in ms["axes"][1:])
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    for k, d in enumerate(ms["datasets"]):
        scale = d["coordinateTransformations"][0]
        assert scale["type"] == "scale" and scale["scale"] == [1.0] + [5.0 * 2 ** k] * 3
        assert root[str(k)].shape == (4, *[-(-n // 2 ** k) for n in SHAPE])
        assert root[str(k)].dtype == np.uint8
    assert [c["label"] for c in root.attrs["omero"]["channels"]] == ["R", "G", "B", "A"]

    stack = np.stack(list(preds.values()))
    level0 = read_level0_rgb(run)
    np.testing.assert_array_equal(level0[..., :3], fuse_mean(stack))
    np.testing.assert_array_equal(level0[..., 3], with_alpha(fuse_mean(stack))[..., 3])
    level1 = np.asarray(root["1"][...])
    np.testing.assert_array_equal(level1, omezarr.downsample2(np.asarray(root["0"][...])))


def test_second_fuse_touches_only_newly_complete_chunks(tmp_path):
    truth = smooth_truth()
    preds = {a: striped(truth, d, 4, d) for d, a in enumerate("zyx")}
    run, plan = make_run(tmp_path, preds, complete=[0, 1, 2])
    first = fuse_run(run, method="median", pyramid_levels=2)
    assert first.fused == [plan.chunk_name(i) for i in (0, 1, 2)]
    assert len(first.missing) == plan.n_chunks - 3
    # chunks 0-2 are the first row along x: every x slab is done, z and y slabs 1 are not
    assert first.missing[plan.chunk_name(13)] == ["z", "y"]
    assert "missing axes" in first.summary()

    level0 = zarr.open_group(str(run / "fused.ome.zarr"), mode="r+")["0"]
    sentinel = plan.write_region(1)
    level0[(slice(None), *sentinel)] = 7  # a re-fuse of chunk 1 would overwrite this
    for i in range(3, plan.n_chunks):
        complete_chunk(run, plan, i, tuple(preds))
    second = fuse_run(run, method="median", pyramid_levels=2)
    assert second.already == 3 and len(second.fused) == plan.n_chunks - 3
    assert second.complete
    assert (np.asarray(level0[(slice(None), *sentinel)]) == 7).all()
    chunk5 = plan.write_region(5)
    expected = fuse_median(np.stack(list(preds.values())))[chunk5]
    np.testing.assert_array_equal(read_level0_rgb(run)[chunk5][..., :3], expected)
    assert fuse_run(run, method="median", pyramid_levels=2).fused == []


def test_pyramid_does_not_depend_on_fuse_order(tmp_path):
    truth = smooth_truth()
    preds = {a: striped(truth, d, 4, d) for d, a in enumerate("zyx")}
    run_a, plan = make_run(tmp_path / "a", preds, chunk=(5, 7, 6), complete=[])
    run_b, _ = make_run(tmp_path / "b", preds, chunk=(5, 7, 6))
    for i in reversed(range(plan.n_chunks)):  # one chunk at a time, last first
        complete_chunk(run_a, plan, i, tuple(preds))
        fuse_run(run_a, pyramid_levels=3)
    fuse_run(run_b, pyramid_levels=3)
    for k in range(3):
        a = zarr.open_group(str(run_a / "fused.ome.zarr"), mode="r")[str(k)][...]
        b = zarr.open_group(str(run_b / "fused.ome.zarr"), mode="r")[str(k)][...]
        np.testing.assert_array_equal(a, b)


def test_consistency_fusion_is_chunk_invariant_and_waits_for_neighbours(tmp_path):
    truth = smooth_truth()
    preds = {a: striped(truth, d, 8 if a == "z" else 1, d) for d, a in enumerate("zyx")}
    run_a, _ = make_run(tmp_path / "a", preds, chunk=(8, 8, 8))
    run_b, _ = make_run(tmp_path / "b", preds, chunk=(5, 18, 7))
    fuse_run(run_a, method="consistency")
    fuse_run(run_b, method="consistency")
    fused = read_level0_rgb(run_a)
    np.testing.assert_array_equal(fused, read_level0_rgb(run_b))
    whole = fuse_consistency(np.stack(list(preds.values())), (0, 1, 2))
    np.testing.assert_array_equal(fused[..., :3], whole)

    run_c, plan_c = make_run(tmp_path / "c", preds, complete=[0])
    report = fuse_run(run_c, method="consistency")
    assert report.fused == [] and report.waiting == [plan_c.chunk_name(0)]


def test_single_axis_mode_copies_the_slicewise_volume(tmp_path):
    truth = smooth_truth()
    preds = {"z": striped(truth, 0, 6, 1), "y": striped(truth, 1, 6, 2)}
    run, _ = make_run(tmp_path, preds)
    report = fuse_run(run, single_axis="z")
    assert report.output.name == "slicewise-z.ome.zarr"
    np.testing.assert_array_equal(read_level0_rgb(run, "slicewise-z.ome.zarr")[..., :3],
                                  preds["z"])
    with pytest.raises(UsageError, match="axis 'x' was not stained"):
        fuse_run(run, single_axis="x")


def test_fuse_with_other_settings_is_refused_unless_overwrite(tmp_path):
    truth = smooth_truth()
    run, _ = make_run(tmp_path, {"z": striped(truth, 0, 3, 1), "x": striped(truth, 2, 3, 2)})
    fuse_run(run, method="mean")
    with pytest.raises(UsageError, match=r"fused\.ome\.zarr.*method: 'mean' -> 'median'"):
        fuse_run(run, method="median")
    report = fuse_run(run, method="median", overwrite=True)
    assert report.already == 0 and report.complete
    attrs = zarr.open_group(str(run / "fused.ome.zarr"), mode="r").attrs
    assert attrs["hpcstain"]["method"] == "median"
    assert json.loads(json.dumps(dict(attrs)))["multiscales"][0]["datasets"][0]["path"] == "0"


def test_voxel_size_flag_overrides_plan_and_unknown_size_is_noted(tmp_path):
    truth = smooth_truth()
    run, _ = make_run(tmp_path, {"z": striped(truth, 0, 3, 1)}, voxel=None)
    report = fuse_run(run, single_axis="z")
    assert any("voxel size unknown" in n for n in report.notes)
    run2, _ = make_run(tmp_path / "b", {"z": striped(truth, 0, 3, 1)})
    fuse_run(run2, single_axis="z", voxel_size_um=(2.0, 1.0, 1.0), pyramid_levels=2)
    root = zarr.open_group(str(run2 / "slicewise-z.ome.zarr"), mode="r")
    ds = root.attrs["multiscales"][0]["datasets"]
    assert ds[1]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 2.0, 2.0]
    assert ds[1]["coordinateTransformations"][1]["translation"] == [0.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_fused_image_validates_and_opens_in_the_reference_readers(tmp_path, ngff):
    """A maintained NGFF validator accepts the image; ome-zarr-py reads back level 0."""
    models = pytest.importorskip("ome_zarr_models")
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    truth = smooth_truth()
    preds = {"z": striped(truth, 0, 6, 1), "y": striped(truth, 1, 6, 2)}
    run, _ = make_run(tmp_path, preds, chunk=(8, 8, 8))
    fuse_run(run, method="mean", pyramid_levels=2, ngff=ngff)
    image = run / "fused.ome.zarr"
    group = zarr.open_group(str(image), mode="r")
    validator = models.v04.Image if ngff == "0.4" else models.v05.Image
    attrs = validator.from_zarr(group).attributes  # raises on any NGFF violation
    multiscales = attrs.multiscales if ngff == "0.4" else attrs.ome.multiscales
    assert [d.path for d in multiscales[0].datasets] == ["0", "1"]
    if ngff == "0.5":
        assert group["0"].shards == (4, 8, 8, 8) and group.metadata.zarr_format == 3
    node = next(iter(Reader(parse_url(str(image)))()))
    level0 = np.asarray(node.data[0])
    expected = fuse_mean(np.stack(list(preds.values())))
    np.testing.assert_array_equal(np.moveaxis(level0, 0, -1)[..., :3], expected)


def test_parallel_fuse_equals_serial_fuse(tmp_path):
    truth = smooth_truth()
    preds = {a: striped(truth, d, 5, d) for d, a in enumerate("zyx")}
    serial, _ = make_run(tmp_path / "serial", preds, chunk=(7, 9, 8))
    parallel, plan = make_run(tmp_path / "parallel", preds, chunk=(7, 9, 8))
    fuse_run(serial, method="consistency", pyramid_levels=3)
    report = fuse_run(parallel, method="consistency", pyramid_levels=3, workers=2)
    assert len(report.fused) == plan.n_chunks
    for k in range(3):
        a = zarr.open_group(str(serial / "fused.ome.zarr"), mode="r")[str(k)][...]
        b = zarr.open_group(str(parallel / "fused.ome.zarr"), mode="r")[str(k)][...]
        np.testing.assert_array_equal(a, b)


def test_fuse_method_defaults_to_the_plans_the_checkpoints_recipe(tmp_path):
    """`fuse` without --method merges as the plan says (make_plan records the checkpoint's
    data.fuse_method: median for tissue-cpu; plans without the key read as mean)."""
    truth = smooth_truth()
    preds = {"z": striped(truth, 0, 3, 1), "y": striped(truth, 1, 3, 2),
             "x": striped(truth, 2, 3, 3)}
    run, _ = make_run(tmp_path / "median", preds, fuse_method="median")
    fuse_run(run)
    attrs = zarr.open_group(str(run / "fused.ome.zarr"), mode="r").attrs
    assert attrs["hpcstain"]["method"] == "median"
    fuse_run(run, method="mean", out="mean.ome.zarr")  # --method still wins
    assert not np.array_equal(read_level0_rgb(run), read_level0_rgb(run, "mean.ome.zarr"))
    old, _ = make_run(tmp_path / "old", preds)
    plan = json.loads((old / "plan.json").read_text())
    del plan["fuse_method"]  # a run planned before the key
    (old / "plan.json").write_text(json.dumps(plan))
    fuse_run(old)
    attrs = zarr.open_group(str(old / "fused.ome.zarr"), mode="r").attrs
    assert attrs["hpcstain"]["method"] == "mean"
    np.testing.assert_array_equal(read_level0_rgb(old), read_level0_rgb(run, "mean.ome.zarr"))
