"""Pair manifest and image readers: formats, paths, and clear errors for bad rows."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from hpcstain.data.manifest import parse_boxes, read_manifest, read_pair
from hpcstain.data.readers import read_image, split_spec
from hpcstain.data.toy import png_bytes, toy_pair, write_toy_manifest
from hpcstain.errors import InputError


def test_read_image_handles_tiff_png_hdf5_zarr(tmp_path: Path) -> None:
    for dtype in (np.uint8, np.uint16, np.float32):
        a = (np.arange(12 * 9) % 200).reshape(12, 9).astype(dtype)
        tifffile.imwrite(tmp_path / f"a_{np.dtype(dtype).name}.tif", a)
        got = read_image(tmp_path / f"a_{np.dtype(dtype).name}.tif")
        assert got.dtype == dtype and np.array_equal(got, a)
    rgb = np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    (tmp_path / "h.png").write_bytes(png_bytes(rgb))
    assert np.array_equal(read_image(tmp_path / "h.png"), rgb)
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh["entry/data/data"] = a
        fh["other"] = a + 1
    assert np.array_equal(read_image(f"{tmp_path}/s.h5:/other"), a + 1)
    assert np.array_equal(read_image(f"{tmp_path}/s.h5"), a)  # NeXus default
    zarr.create_array(str(tmp_path / "s.zarr"), name="ct", data=a)
    assert np.array_equal(read_image(f"{tmp_path}/s.zarr:ct"), a)
    assert split_spec("/x/y.h5:/a/b") == (Path("/x/y.h5"), "a/b")


def test_read_image_names_missing_file_and_dataset(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.tif: file not found"):
        read_image(tmp_path / "nope.tif")
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh["a"] = np.zeros((2, 2))
    with pytest.raises(InputError, match=r"s.h5: no dataset '/b'"):
        read_image(f"{tmp_path}/s.h5:/b")


def test_manifest_csv_resolves_paths_and_optional_columns(tmp_path: Path) -> None:
    path = write_toy_manifest(tmp_path / "m", ("mg", "ti"), size=48)
    text = path.read_text().splitlines()
    text[0] += ",bone_roi,background_roi,extra_masks,notes"
    (tmp_path / "m" / "extra.png").write_bytes(png_bytes(np.full((48, 48), 255, np.uint8)))
    text[1] += ',"20:24,18:30;26:28,18:30","0:5,0:5",extra.png,first'
    text[2] += ",,,,"
    path.write_text("\n".join(text) + "\n")
    pairs = read_manifest(path)
    assert [p.id for p in pairs] == ["toy_00", "toy_01"]
    assert Path(pairs[0].ct).is_absolute() and Path(pairs[0].ct).is_file()
    assert pairs[0].bone_roi == ((20, 24, 18, 30), (26, 28, 18, 30))
    assert pairs[0].background_roi == ((0, 5, 0, 5),)
    assert pairs[0].extra_masks == (str(tmp_path / "m" / "extra.png"),)
    assert pairs[0].extra == {"notes": "first"} and pairs[1].bone_roi == ()
    images = read_pair(pairs[0])
    assert images.ct.shape == (48, 48) and images.histology.shape == (48, 48, 3)
    assert len(images.extra_masks) == 1 and images.extra_masks[0].all()


def test_manifest_yaml_form(tmp_path: Path) -> None:
    write_toy_manifest(tmp_path, ("peek",), size=40)
    (tmp_path / "pairs.yaml").write_text(
        "pairs:\n  - {id: a, material: PEEK, ct: toy_00_ct.tif, histology: toy_00_he.png,\n"
        "     bone_roi: [[10, 12, 10, 12]]}\n")
    (pair,) = read_manifest(tmp_path / "pairs.yaml")
    assert pair.material == "peek" and pair.bone_roi == ((10, 12, 10, 12),)


def test_bad_manifest_lists_every_bad_row_with_file_and_problem(tmp_path: Path) -> None:
    path = write_toy_manifest(tmp_path, ("mg",) * 6, size=32)
    toy = toy_pair(32)
    tifffile.imwrite(tmp_path / "small.tif", toy.ct[:20])
    (tmp_path / "grey.png").write_bytes(png_bytes(toy.histology[..., 0]))
    nan = toy.ct.astype(np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    rows = path.read_text().splitlines()
    rows[1] = rows[1].replace("toy_00_ct.tif", "missing.tif")
    rows[2] = rows[2].replace("toy_01_ct.tif", "small.tif")
    rows[3] = rows[3].replace("toy_02_he.png", "grey.png")
    rows[4] = rows[4].replace("toy_03_ct.tif", "nan.tif")
    rows[5] = rows[5].replace(",mg,", ",steel,")
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError) as err:
        read_manifest(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: 5 bad pair(s) of 6")
    assert "row 2 (id toy_00)" in msg and "missing.tif: file not found" in msg
    assert "row 3 (id toy_01)" in msg and "does not match the CT 20×32" in msg
    assert "row 4 (id toy_02)" in msg and "grey.png: greyscale image" in msg
    assert "row 5 (id toy_03)" in msg and "nan.tif: 1 NaN/Inf value(s)" in msg
    assert "row 6 (id toy_04)" in msg and "unknown material 'steel'" in msg
    assert "toy_05" not in msg


def test_manifest_rejects_missing_columns_duplicates_and_rois_outside(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id,ct,histology\nx,a.tif,b.png\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['material'\]"):
        read_manifest(tmp_path / "a.csv")
    path = write_toy_manifest(tmp_path, ("mg", "ti"), size=32)
    rows = path.read_text().splitlines()
    rows[0] += ",bone_roi"
    rows[1] += ',"0:40,0:4"'
    rows[2] = rows[2].replace("toy_01,", "toy_00,") + ","
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError) as err:
        read_manifest(path)
    assert "lies outside the 32×32 image" in str(err.value)
    assert "duplicate id 'toy_00'" in str(err.value)
    with pytest.raises(InputError, match="is not 'y0:y1,x0:x1'"):
        parse_boxes("1:2", "bone_roi")
