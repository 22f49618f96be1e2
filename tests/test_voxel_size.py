"""Physical metadata in, physical metadata out: the voxel size of every input kind reaches
the plan and the fused OME-Zarr's scale and axis units (issue #17, item 2)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile
import torch
import zarr

from hpcstain.cli import main
from hpcstain.errors import InputError, UsageError
from hpcstain.executors import run_stain
from hpcstain.volume import fuse_run, init_run, make_plan, open_volume
from hpcstain.volume.plan import load_plan
from hpcstain.volume.voxelsize import parse_voxel_size, unit_factor

SHAPE = (8, 16, 16)  # two pyramid levels at the fuse's minimum edge of 8


@pytest.fixture
def vol() -> np.ndarray:
    return np.random.default_rng(0).integers(9000, 32000, SHAPE, dtype=np.uint16)


def colour_map(batch: torch.Tensor) -> torch.Tensor:
    g = batch[:, :1]
    return torch.cat([-0.2 - 0.6 * g, -0.5 - 0.4 * g, 0.3 - 0.3 * g], dim=1).clamp(-1, 1)


def stain_and_fuse(tmp_path, spec, ngff="0.4", **plan_kw):
    """A tiny z-only run of ``spec`` fused into an OME-Zarr: (plan, report, image group)."""
    plan = make_plan(open_volume(spec), chunk=8, axes="z", tile=16, step=8, sigma=0.0,
                     levels=(30000.0, 10000.0), **plan_kw)
    run = init_run(tmp_path / "run", plan)
    run_stain(run, colour_map, progress=False)
    report = fuse_run(run, pyramid_levels=2, ngff=ngff)
    assert report.complete
    return load_plan(run), report, zarr.open_group(str(run / "fused.ome.zarr"), mode="r")


def multiscale(group, ngff="0.4") -> dict:
    """The image's multiscale, after a maintained NGFF validator accepted the image."""
    models = pytest.importorskip("ome_zarr_models")
    validator = models.v04.Image if ngff == "0.4" else models.v05.Image
    validator.from_zarr(group)  # raises on any NGFF violation
    attrs = dict(group.attrs)
    return (attrs["ome"] if ngff == "0.5" else attrs)["multiscales"][0]


def level_scales(ms: dict) -> list[list[float]]:
    return [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]


def assert_output_scale(group, zyx, ngff="0.4") -> None:
    ms = multiscale(group, ngff)
    assert [a.get("unit") for a in ms["axes"]] == [None] + ["micrometer"] * 3
    expected = [[1.0, *(v * 2 ** k for v in zyx)] for k in range(2)]
    np.testing.assert_allclose(level_scales(ms), expected, rtol=1e-12)


# --------------------------------------------------------------------------- NeXus / HDF5


def nexus(path, vol, detector=None, sample=None, detector_path="/entry/instrument/detector"):
    """A NeXus scan: the volume at /entry/data/data (no size attributes of its own)."""
    with h5py.File(path, "w") as fh:
        fh.require_group("/entry").attrs["NX_class"] = "NXentry"
        data = fh.create_dataset("/entry/data/data", data=vol)
        data.attrs["units"] = "counts"  # the data's unit: never a voxel size
        for group_path, fields, cls in ((detector_path, detector, "NXdetector"),
                                        ("/entry/sample", sample, "NXsample")):
            if fields is None:
                continue
            group = fh.require_group(group_path)
            group.attrs["NX_class"] = cls
            for name, (value, units) in fields.items():
                ds = group.create_dataset(name, data=value)
                if units is not None:
                    ds.attrs["units"] = units
    return path


def test_nexus_detector_pixel_size_in_metres_reaches_plan_and_fused_output(tmp_path, vol):
    """The issue's scan: /entry/instrument/detector/x_pixel_size = 5e-6 m."""
    h5 = nexus(tmp_path / "scan.nxs", vol,
               detector={"x_pixel_size": (5e-6, "m"), "y_pixel_size": (5e-6, "m")})
    plan, report, image = stain_and_fuse(tmp_path, h5)
    np.testing.assert_allclose(plan.voxel_size_um, (5.0, 5.0, 5.0), rtol=1e-12)
    assert "/entry/instrument/detector/x_pixel_size" in plan.voxel_size_from
    assert not report.notes
    assert_output_scale(image, (5.0, 5.0, 5.0))
    assert image.attrs["hpcstain"]["voxel_size_um"] == pytest.approx([5.0, 5.0, 5.0])


@pytest.mark.parametrize("detector, sample, path, expected", [
    # square pixels in µm (micro sign): isotropic
    ({"x_pixel_size": (0.65, "µm"), "y_pixel_size": (0.65, "µm")}, None,
     "/entry/instrument/detector", (0.65, 0.65, 0.65)),
    # rectangular detector pixels: slices are detector rows (z from y), in-plane from x
    ({"x_pixel_size": (2e-3, "mm"), "y_pixel_size": (3e-3, "mm")}, None,
     "/entry/instrument/detector", (3.0, 2.0, 2.0)),
    # an NXdetector found by its class wherever it sits, one value: isotropic
    ({"x_pixel_size": (1.3e-6, b"m")}, None, "/entry/instrument/pco_edge", (1.3, 1.3, 1.3)),
    # the sample's (effective, magnified) voxel size wins over the detector pixel
    ({"x_pixel_size": (6.5e-6, "m")}, {"voxel_size": (1.625, "um")},
     "/entry/instrument/detector", (1.625, 1.625, 1.625)),
    # per-axis sample fields, all three
    (None, {"x_pixel_size": (1.0, "um"), "y_pixel_size": (1.0, "um"),
            "z_pixel_size": (2.5, "micrometer")}, "/entry/instrument/detector", (2.5, 1.0, 1.0)),
])
def test_nexus_size_fields_and_units(tmp_path, vol, detector, sample, path, expected):
    h5 = nexus(tmp_path / "scan.h5", vol, detector, sample, path)
    np.testing.assert_allclose(open_volume(h5).voxel_size_um, expected, rtol=1e-12)


def test_nexus_field_without_units_in_metre_range_is_refused_with_a_note(tmp_path, vol):
    h5 = nexus(tmp_path / "scan.h5", vol, detector={"x_pixel_size": (5e-6, None)})
    src = open_volume(h5)
    assert src.voxel_size_um is None
    note = src.voxel_size_note()
    assert "x_pixel_size" in note and "metres" in note and "--voxel-size" in note
    assert "\n" not in note


def test_hdf5_attribute_on_a_parent_group(tmp_path, vol):
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh.create_dataset("/exchange/data", data=vol)
        fh["/exchange"].attrs.update({"pixel_size": 700.0, "pixel_size_units": "nm"})
    src = open_volume(f"{tmp_path / 's.h5'}:/exchange/data")
    np.testing.assert_allclose(src.voxel_size_um, (0.7, 0.7, 0.7), rtol=1e-12)


# --------------------------------------------------------------------------- zarr


def test_zarr_group_attribute_reaches_plan_and_fused_output(tmp_path, vol):
    """The issue's zarr: ``voxel_size_um: 5.0`` on the group, the ``ct`` array bare."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.attrs["voxel_size_um"] = 5.0
    group.create_array("ct", data=vol)
    plan, report, image = stain_and_fuse(tmp_path, tmp_path / "s.zarr", ngff="0.5")
    assert plan.voxel_size_um == (5.0, 5.0, 5.0) and "group" in plan.voxel_size_from
    assert not report.notes
    assert_output_scale(image, (5.0, 5.0, 5.0), ngff="0.5")


@pytest.mark.parametrize("attrs, expected", [
    ({"voxel_size": [2.0, 1.0, 1.0], "unit": "nm"}, (0.002, 0.001, 0.001)),
    ({"pixel_size": 0.005, "units": "mm"}, (5.0, 5.0, 5.0)),
    ({"resolution": [1.0, 2.0, 4.0], "axes": "x,y,z", "units": ["um", "um", "um"]},
     (4.0, 2.0, 1.0)),                                        # xyz order named: reordered
    ({"voxel_size_nm": [500, 250, 250]}, (0.5, 0.25, 0.25)),
    ({"voxel_size": "3.5e-6 m"}, (3.5, 3.5, 3.5)),            # a quantity written as text
    ({"element_size_um": [2.0, 0.5, 0.5]}, (2.0, 0.5, 0.5)),  # Fiji/ilastik HDF5 convention
    ({"voxel_size": {"value": 4, "unit": "micron"}}, (4.0, 4.0, 4.0)),
    ({"voxel_size": 3.0, "units": "HU"}, (3.0, 3.0, 3.0)),    # `units` of the data: not used
])
def test_zarr_array_attributes_with_units(tmp_path, vol, attrs, expected):
    zarr.create_array(str(tmp_path / "v.zarr"), data=vol, attributes=attrs)
    np.testing.assert_allclose(open_volume(tmp_path / "v.zarr").voxel_size_um, expected,
                               rtol=1e-12)


def test_array_attribute_wins_over_group_attribute(tmp_path, vol):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.attrs["voxel_size_um"] = 9.0
    group.create_array("ct", data=vol, attributes={"voxel_size_um": [3.0, 1.0, 1.0]})
    assert open_volume(tmp_path / "s.zarr").voxel_size_um == (3.0, 1.0, 1.0)


# --------------------------------------------------------------------------- OME-Zarr input


def ome_zarr_input(path, vol, axes="czyx", units=("micrometer",) * 3,
                   scale0=(2.0, 0.5, 0.5), version="0.4"):
    """A single-channel OME-Zarr image: level 0 = ``vol``, level 1 = every 2nd voxel."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    lead = [1] * (len(axes) - 3)
    datasets = []
    for k, data in enumerate((vol, vol[::2, ::2, ::2])):
        kw = {} if version == "0.4" else {"dimension_names": list(axes)}
        chunks = (*lead, *(max(1, n // 2) for n in data.shape))
        group.create_array(str(k), data=data.reshape(*lead, *data.shape), chunks=chunks, **kw)
        scale = [1.0] * len(lead) + [v * 2 ** k for v in scale0]
        datasets.append({"path": str(k),
                         "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    types = {"c": "channel", "t": "time"}
    ax = []
    for name in axes:
        entry = {"name": name, "type": types.get(name, "space")}
        if name in "zyx" and units is not None:
            entry["unit"] = units["zyx".index(name)]
        ax.append(entry)
    ms = {"axes": ax, "datasets": datasets, "name": "ct"}
    if version == "0.4":
        group.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return path


def test_ome_zarr_input_level0_and_scale_reach_plan_and_fused_output(tmp_path, vol):
    image_in = ome_zarr_input(tmp_path / "ct.ome.zarr", vol)
    src = open_volume(image_in)
    assert src.shape == SHAPE
    np.testing.assert_array_equal(src.read((slice(1, 5), slice(2, 9), slice(0, 16))),
                                  vol[1:5, 2:9, 0:16])
    # fuse reads the OME-Zarr input again (outside-the-sample fill): the default fill is on
    plan, _, image = stain_and_fuse(tmp_path, image_in)
    assert plan.voxel_size_um == (2.0, 0.5, 0.5) and "OME-Zarr scale" in plan.voxel_size_from
    assert_output_scale(image, (2.0, 0.5, 0.5))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_input_versions_units_and_named_level(tmp_path, vol, version):
    image_in = ome_zarr_input(tmp_path / "ct.zarr", vol, axes="tczyx", version=version,
                              units=("millimeter", "nanometer", "nanometer"),
                              scale0=(0.004, 800.0, 800.0))
    assert open_volume(image_in).voxel_size_um == pytest.approx((4.0, 0.8, 0.8))
    level1 = open_volume(f"{image_in}:1")  # a named level: that level's own scale
    assert level1.shape == (4, 8, 8)
    assert level1.voxel_size_um == pytest.approx((8.0, 1.6, 1.6))


def test_ome_zarr_input_with_several_channels_is_refused(tmp_path, vol):
    group = zarr.open_group(str(tmp_path / "rgb.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=np.stack([vol, vol]))
    group.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": "c", "type": "channel"}] + [
            {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 1, 1]}]}]}]
    with pytest.raises(InputError, match=r"rgb\.ome\.zarr: OME-Zarr image has c=2; "):
        open_volume(tmp_path / "rgb.ome.zarr")


def test_damaged_ome_zarr_input_names_the_chunk_file(tmp_path, vol):
    image_in = ome_zarr_input(tmp_path / "ct.ome.zarr", vol)
    src = open_volume(image_in)
    (image_in / "0" / "0.1.0.0").write_bytes(b"garbage" * 20)  # c 0, z 1, y 0, x 0
    with pytest.raises(InputError, match=r"ct\.ome\.zarr: damaged data in storage chunk "
                       r"1,0,0 \(voxels z 4:8.*file .*ct\.ome\.zarr/0/0\.1\.0\.0\)"):
        src.read((slice(0, 8), slice(0, 16), slice(0, 16)))


def test_ome_zarr_input_without_units_has_no_physical_size(tmp_path, vol):
    src = open_volume(ome_zarr_input(tmp_path / "ct.zarr", vol, units=None))
    assert src.voxel_size_um is None and "have no unit" in src.voxel_size_note()


# --------------------------------------------------------------------------- TIFF


def test_tiff_resolution_tags_reach_plan_and_fused_output(tmp_path, vol):
    """XResolution/YResolution per cm; a TIFF has no z spacing: taken as isotropic."""
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, vol, resolution=(1e4 / 0.8, 1e4 / 0.8), resolutionunit="CENTIMETER")
    plan, _, image = stain_and_fuse(tmp_path, tif)
    np.testing.assert_allclose(plan.voxel_size_um, (0.8, 0.8, 0.8), rtol=1e-9)
    assert "isotropic" in plan.voxel_size_from
    assert_output_scale(image, plan.voxel_size_um)


@pytest.mark.parametrize("unit", ["micron", "um", "\\u00B5m"])
def test_imagej_unit_and_z_spacing(tmp_path, vol, unit):
    tif = tmp_path / "ij.tif"
    tifffile.imwrite(tif, vol, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"spacing": 2.0, "unit": unit, "axes": "ZYX"})
    src = open_volume(tif)
    assert src.voxel_size_um == pytest.approx((2.0, 0.5, 0.5))
    assert "spacing" in src.voxel_size_from


def test_imagej_z_spacing_reaches_the_fused_output(tmp_path, vol):
    tif = tmp_path / "ij.tif"
    tifffile.imwrite(tif, vol, imagej=True, resolution=(4000, 4000),  # pixels per mm
                     metadata={"spacing": 0.001, "unit": "mm", "axes": "ZYX"})
    plan, _, image = stain_and_fuse(tmp_path, tif)
    assert plan.voxel_size_um == pytest.approx((1.0, 0.25, 0.25))
    assert_output_scale(image, (1.0, 0.25, 0.25))


def test_ome_tiff_physical_size(tmp_path, vol):
    tif = tmp_path / "ct.ome.tif"
    tifffile.imwrite(tif, vol, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.7, "PhysicalSizeY": 0.7, "PhysicalSizeZ": 1.5,
        "PhysicalSizeZUnit": "nm"})
    assert open_volume(tif).voxel_size_um == pytest.approx((0.0015, 0.7, 0.7))


def test_tiff_folder_uses_the_first_slice_tags(tmp_path, vol):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, plane in enumerate(vol):
        tifffile.imwrite(folder / f"s{z:03d}.tif", plane, resolution=(25400 / 3, 25400 / 3),
                         resolutionunit="INCH")
    assert open_volume(folder).voxel_size_um == pytest.approx((3.0, 3.0, 3.0))


def test_tifffile_json_description_like_the_phantoms(tmp_path, vol):
    tif = tmp_path / "ph.tif"
    tifffile.imwrite(tif, vol, metadata={"phantom": json.dumps({"voxel_size_um": 5.0})})
    assert open_volume(tif).voxel_size_um == (5.0, 5.0, 5.0)
    tifffile.imwrite(tif, vol, metadata={"voxel_size": [2, 1, 1], "unit": "mm"})
    assert open_volume(tif).voxel_size_um == (2000.0, 1000.0, 1000.0)


def test_default_dpi_is_not_a_voxel_size(tmp_path, vol):
    tif = tmp_path / "print.tif"
    tifffile.imwrite(tif, vol, resolution=(72, 72), resolutionunit="INCH")
    src = open_volume(tif)
    assert src.voxel_size_um is None and "72 dpi" in src.voxel_size_note()


# --------------------------------------------------------------------------- absent / override


def test_absent_size_is_one_note_and_a_unitless_scale_of_one(tmp_path, vol):
    """NGFF makes ``unit`` optional: no unit + scale 1 (voxels) rather than a made-up 1 µm."""
    zarr.create_array(str(tmp_path / "bare.zarr"), data=vol)
    src = open_volume(tmp_path / "bare.zarr")
    assert src.voxel_size_um is None
    note = src.voxel_size_note()
    assert note.startswith("voxel size unknown") and "\n" not in note
    plan, report, image = stain_and_fuse(tmp_path, tmp_path / "bare.zarr")
    assert plan.voxel_size_um is None and plan.voxel_size_from == ""
    assert [n for n in report.notes if "voxel size unknown" in n] == [report.notes[0]]
    ms = multiscale(image)
    assert all("unit" not in a for a in ms["axes"])
    assert level_scales(ms) == [[1.0] * 4, [1.0, 2.0, 2.0, 2.0]]
    assert image.attrs["hpcstain"]["voxel_size_um"] is None


def test_voxel_size_override_wins_and_is_recorded(tmp_path, vol):
    zarr.create_array(str(tmp_path / "v.zarr"), data=vol, attributes={"voxel_size_um": 5.0})
    plan, _, image = stain_and_fuse(tmp_path, tmp_path / "v.zarr", voxel_size_um="2,1,1")
    assert plan.voxel_size_um == (2.0, 1.0, 1.0) and plan.voxel_size_from == "--voxel-size"
    assert_output_scale(image, (2.0, 1.0, 1.0))


def test_parse_voxel_size_forms_and_errors():
    assert parse_voxel_size("2,1,1") == parse_voxel_size(["2", "1", "1"]) == (2.0, 1.0, 1.0)
    assert parse_voxel_size(["5"]) == (5.0, 5.0, 5.0)
    for bad in ("1,2", "0,1,1", "a", "-1"):
        with pytest.raises(UsageError, match="voxel size"):
            parse_voxel_size(bad)
    assert unit_factor("µm") == unit_factor("μm") == unit_factor("micrometre") == 1.0
    assert unit_factor("meters") == 1e6 and unit_factor("pixel") is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from micro import untrained_generator_checkpoint

    return untrained_generator_checkpoint(tmp_path_factory.mktemp("ckpt") / "g.pt")


def stain_cli(spec, run, checkpoint, *extra):
    return main(["stain", str(spec), "--checkpoint", str(checkpoint), "--out", str(run),
                 "--plan-only", "--bone-level", "30000", "--background-level", "10000",
                 "--tile", "16", "--step", "8", "--chunk", "8", "--no-progress", *extra])


def test_cli_prints_where_the_size_came_from_and_takes_an_override(tmp_path, vol, checkpoint,
                                                                     capsys):
    h5 = nexus(tmp_path / "scan.nxs", vol,
               detector={"x_pixel_size": (5e-6, "m"), "y_pixel_size": (5e-6, "m")})
    assert stain_cli(h5, tmp_path / "a", checkpoint) == 0
    out = capsys.readouterr().out
    assert "voxel size: 5 × 5 × 5 µm (z, y, x) from /entry/instrument/detector/" in out
    assert json.loads((tmp_path / "a" / "plan.json").read_text())["voxel_size_um"] == \
        pytest.approx([5.0, 5.0, 5.0])
    assert stain_cli(h5, tmp_path / "b", checkpoint, "--voxel-size", "2,1,1") == 0
    assert load_plan(tmp_path / "b").voxel_size_um == (2.0, 1.0, 1.0)
    assert stain_cli(h5, tmp_path / "c", checkpoint, "--voxel-size", "3", "1", "1") == 0
    assert load_plan(tmp_path / "c").voxel_size_um == (3.0, 1.0, 1.0)
    # fuse --voxel-size overrides the plan (nothing stained yet: exit 3, image created)
    assert main(["fuse", str(tmp_path / "a"), "--voxel-size", "2,1,1", "--levels", "2",
                 "--no-progress"]) == 3
    assert_output_scale(zarr.open_group(str(tmp_path / "a" / "fused.ome.zarr"), mode="r"),
                        (2.0, 1.0, 1.0))


def test_cli_notes_an_absent_size_once(tmp_path, vol, checkpoint, capsys):
    zarr.create_array(str(tmp_path / "bare.zarr"), data=vol)
    assert stain_cli(tmp_path / "bare.zarr", tmp_path / "run", checkpoint) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.out.splitlines() if "voxel size" in line]
    assert len(notes) == 1 and notes[0].startswith("note: voxel size unknown")
    assert captured.err == ""
