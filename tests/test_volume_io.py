"""Volume inputs: zarr / HDF5 / TIFF readers, validation, NaN policy, intensity levels."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from hpcstain.errors import InputError, UsageError
from hpcstain.volume.io import (
    estimate_levels,
    open_volume,
    parse_spec,
    voxel_size_from_attrs,
)

REGION = (slice(2, 7), slice(3, 11), slice(0, 5))


@pytest.fixture
def vol() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 60000, (9, 12, 10), dtype=np.uint16)


def test_zarr_array_reads_only_the_region(tmp_path, vol):
    zarr.create_array(str(tmp_path / "v.zarr"), data=vol, chunks=(4, 4, 4))
    src = open_volume(tmp_path / "v.zarr")
    assert src.shape == vol.shape and src.dtype == np.uint16
    np.testing.assert_array_equal(src.read(REGION), vol[REGION])


def test_zarr_group_prefers_ct_array_and_accepts_named_array(tmp_path, vol):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("ct", data=vol)
    g.create_array("labels", data=(vol > 30000).astype(np.uint8))
    np.testing.assert_array_equal(open_volume(tmp_path / "g.zarr").read(REGION), vol[REGION])
    labels = open_volume(f"{tmp_path / 'g.zarr'}:labels")
    assert labels.dtype == np.uint8


def test_zarr_group_without_ct_and_several_arrays_is_refused(tmp_path, vol):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("a", data=vol)
    g.create_array("b", data=vol)
    with pytest.raises(InputError, match=r"g\.zarr.*'a', 'b'"):
        open_volume(tmp_path / "g.zarr")
    with pytest.raises(InputError, match=r"g\.zarr.*no array 'missing'"):
        open_volume(f"{tmp_path / 'g.zarr'}:missing")


def test_hdf5_default_nexus_path_and_explicit_path(tmp_path, vol):
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh.create_dataset("/entry/data/data", data=vol, chunks=(3, 6, 5))
        fh.create_dataset("/other/vol", data=vol[::-1])
    np.testing.assert_array_equal(open_volume(tmp_path / "s.h5").read(REGION), vol[REGION])
    other = open_volume(f"{tmp_path / 's.h5'}:/other/vol")
    np.testing.assert_array_equal(other.read(REGION), vol[::-1][REGION])


def test_hdf5_missing_dataset_names_file_and_path(tmp_path, vol):
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh.create_dataset("/exchange/data", data=vol)
    with pytest.raises(InputError, match=r"s\.h5: no dataset '/entry/data/data'.*exchange"):
        open_volume(tmp_path / "s.h5")


def test_tiff_multipage_and_folder_of_slices(tmp_path, vol):
    tifffile.imwrite(tmp_path / "stack.tif", vol)
    np.testing.assert_array_equal(open_volume(tmp_path / "stack.tif").read(REGION), vol[REGION])
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, plane in enumerate(vol):
        tifffile.imwrite(folder / f"slice_{z:04d}.tif", plane)
    src = open_volume(folder)
    assert src.shape == vol.shape
    np.testing.assert_array_equal(src.read(REGION), vol[REGION])


def test_2d_array_is_refused_naming_the_file(tmp_path):
    zarr.create_array(str(tmp_path / "flat.zarr"), data=np.zeros((5, 6), np.uint16))
    with pytest.raises(InputError, match=r"flat\.zarr: expected a 3D volume.*\(5, 6\)"):
        open_volume(tmp_path / "flat.zarr")


def test_empty_and_non_numeric_volumes_are_refused(tmp_path):
    zarr.create_array(str(tmp_path / "e.zarr"), shape=(0, 4, 4), dtype="uint16")
    with pytest.raises(InputError, match=r"e\.zarr: volume is empty"):
        open_volume(tmp_path / "e.zarr")
    zarr.create_array(str(tmp_path / "b.zarr"), data=np.zeros((2, 3, 4), bool))
    with pytest.raises(InputError, match=r"b\.zarr: expected a numeric"):
        open_volume(tmp_path / "b.zarr")


def test_nan_is_an_error_naming_the_file_unless_replaced(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    data[2, 3, 1] = np.nan
    zarr.create_array(str(tmp_path / "f.zarr"), data=data, chunks=(2, 5, 6))
    with pytest.raises(InputError, match=r"f\.zarr: 1 non-finite.*z,y,x=\(2, 3, 1\)"):
        open_volume(tmp_path / "f.zarr")
    src = open_volume(tmp_path / "f.zarr", nan_policy="replace", nan_value=-5.0)
    full = src.read((slice(0, 4), slice(0, 5), slice(0, 6)))
    assert full[2, 3, 1] == -5.0 and np.isfinite(full).all()
    with pytest.raises(UsageError):
        open_volume(tmp_path / "f.zarr", nan_policy="ignore")  # type: ignore[arg-type]


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown volume format"):
        parse_spec(tmp_path / "vol.raw")
    with pytest.raises(InputError, match=r"nope\.h5: no such HDF5 file"):
        open_volume(tmp_path / "nope.h5")


def test_spec_parsing_splits_inner_paths():
    assert parse_spec("a/b.zarr:ct").key == "ct"
    spec = parse_spec("scan.h5:/entry/data/data")
    assert spec.kind == "hdf5" and spec.key == "/entry/data/data"


def test_ct_to_unit_maps_levels_to_training_convention():
    from hpcstain.ct.levels import DEFAULT_TARGET, RawLevels
    from hpcstain.ct.signed import ct_to_signed

    out = ct_to_signed(np.array([100.0, 500.0, 900.0]), RawLevels(500.0, 100.0), DEFAULT_TARGET)
    np.testing.assert_allclose(out[:2], [10000 / 65535 * 2 - 1, 30000 / 65535 * 2 - 1],
                               rtol=1e-6)
    assert out[2] == pytest.approx(50000 / 65535 * 2 - 1, rel=1e-6)


def test_estimate_levels_finds_bone_and_background(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.normal(8000, 300, (24, 32, 32))
    vol[:, 8:24, 8:24] = rng.normal(20000, 500, (24, 16, 16))  # bone
    vol[:, 14:18, 14:18] = 60000  # a small, bright metal screw
    zarr.create_array(str(tmp_path / "v.zarr"), data=vol.astype(np.uint16))
    bone, background = estimate_levels(open_volume(tmp_path / "v.zarr"), max_voxels=5000)
    assert bone == pytest.approx(20000, rel=0.05)
    assert background == pytest.approx(8000, rel=0.05)


def test_voxel_size_from_metadata(tmp_path, vol):
    zarr.create_array(str(tmp_path / "v.zarr"), data=vol, attributes={"voxel_size_um": 5.0})
    assert open_volume(tmp_path / "v.zarr").voxel_size_um == (5.0, 5.0, 5.0)
    assert voxel_size_from_attrs({"voxel_size": [1, 2, 3]}) == (1.0, 2.0, 3.0)
    assert voxel_size_from_attrs({}) is None
