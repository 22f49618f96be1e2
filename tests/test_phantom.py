"""Phantom volumes: deterministic, self-consistent truth, documented file layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

from hpcstain.errors import UsageError
from hpcstain.phantom import (
    CT_RANGES,
    LABELS,
    MATERIALS,
    PALETTE,
    iter_slabs,
    make_volume,
    write_volume_file,
)
from hpcstain.phantom.render import ct_artefacts_2d
from hpcstain.phantom.sample import make_sample

SHAPE = (24, 96, 96)


@pytest.fixture(scope="module")
def volumes() -> dict[str, object]:
    return {m: make_volume(SHAPE, m, seed=3) for m in MATERIALS}


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


def test_same_seed_gives_byte_identical_volume(volumes: dict) -> None:
    again = make_volume(SHAPE, "mg", seed=3)
    first = volumes["mg"]
    assert digest(again.ct, again.stain, again.labels) == \
        digest(first.ct, first.stain, first.labels)
    other = make_volume(SHAPE, "mg", seed=4)
    assert digest(other.ct) != digest(first.ct)


def test_slab_partition_does_not_change_the_volume(volumes: dict) -> None:
    parts = list(iter_slabs(SHAPE, "mg", 3, slab=5))
    assert [z0 for z0, *_ in parts] == [0, 5, 10, 15, 20]
    ct = np.concatenate([p[1] for p in parts])
    stain = np.concatenate([p[2] for p in parts])
    assert np.array_equal(ct, volumes["mg"].ct)
    assert np.array_equal(stain, volumes["mg"].stain)


def test_volume_arrays_have_documented_dtypes_and_shapes(volumes: dict) -> None:
    v = volumes["ti"]
    assert v.ct.dtype == np.uint16 and v.ct.shape == SHAPE
    assert v.stain.dtype == np.uint8 and v.stain.shape == (*SHAPE, 3)
    assert v.labels.dtype == np.uint8 and v.labels.shape == SHAPE
    assert set(np.unique(v.labels)) <= set(LABELS.values())
    assert v.voxel_size_um == 5.0 and v.material == "ti" and v.seed == 3


@pytest.mark.parametrize("material", MATERIALS)
def test_screw_is_black_and_in_its_material_ct_range(volumes: dict, material: str) -> None:
    v = volumes[material]
    screw = v.labels == LABELS["screw"]
    assert screw.sum() > 1000
    assert np.all(v.stain[screw] == PALETTE["screw"])
    interior = ndimage.binary_erosion(screw, iterations=2)
    lo, hi = np.percentile(v.ct[interior], [1, 99])
    assert CT_RANGES[material][0] <= lo and hi <= CT_RANGES[material][1]


def test_material_ct_ranges_are_distinct_and_ordered_around_bone(volumes: dict) -> None:
    (_p_lo, p_hi), (m_lo, m_hi), (t_lo, _) = (CT_RANGES[m] for m in ("peek", "mg", "ti"))
    assert p_hi < m_lo and m_hi < t_lo
    v = volumes["ti"]
    cortical = ndimage.binary_erosion(v.labels == LABELS["cortical_bone"], iterations=1)
    bone = float(np.median(v.ct[cortical]))
    soft = float(np.median(v.ct[v.labels == LABELS["soft_tissue"]]))
    assert p_hi < bone < t_lo            # PEEK far below dense bone, Ti far above
    assert m_lo < bone                   # Mg a little below
    assert abs(np.median(volumes["peek"].ct[volumes["peek"].labels == 7]) - soft) < 4000


def test_bone_is_purple_and_soft_tissue_blue(volumes: dict) -> None:
    v = volumes["mg"]
    rgb = v.stain.astype(float)
    for name in ("cortical_bone", "trabecular_bone"):
        r, g, b = rgb[v.labels == LABELS[name]].mean(axis=0)
        assert r > g + 20 and b > g + 20, name
    r, g, b = rgb[v.labels == LABELS["soft_tissue"]].mean(axis=0)
    assert b > r + 40 and b > g + 30
    cort = rgb[v.labels == LABELS["cortical_bone"]].mean()
    trab = rgb[v.labels == LABELS["trabecular_bone"]].mean()
    assert trab < cort                   # younger bone stains darker


def test_new_bone_only_for_mg_next_to_the_degradation_layer(volumes: dict) -> None:
    mg = volumes["mg"]
    new = mg.labels == LABELS["new_bone"]
    deg = mg.labels == LABELS["degradation"]
    assert new.sum() > 50 and deg.sum() > 500
    r, _g, b = mg.stain[new].astype(float).mean(axis=0)
    assert b > 200 and b > r + 100       # bright blue
    dist = ndimage.distance_transform_edt(~deg)
    rf = min(SHAPE[1:]) / 2
    assert dist[new].max() <= 0.07 * rf + 2
    deg_rgb = mg.stain[deg].astype(float).mean(axis=0)
    assert deg_rgb.max() < 130 and deg_rgb[0] > deg_rgb[2]   # dark brownish
    for m in ("ti", "peek"):
        assert not np.isin(volumes[m].labels, (LABELS["new_bone"], LABELS["degradation"])).any()


def test_tube_shows_in_ct_but_not_in_the_stain(volumes: dict) -> None:
    v = volumes["peek"]
    tube = v.labels == LABELS["tube"]
    air = v.labels == LABELS["background"]
    assert tube.sum() > 100
    assert np.all(v.stain[tube] == PALETTE["background"])
    assert v.ct[tube].mean() > v.ct[air].mean() + 1000


def test_lacunae_are_a_few_voxels() -> None:
    v = make_volume((32, 128, 128), "ti", seed=5)
    comps, n = ndimage.label(v.labels == LABELS["lacuna"])
    sizes = np.bincount(comps.ravel())[1:]
    assert n > 20
    assert np.median(sizes) <= 12 and sizes.max() <= 40
    dots = v.stain[v.labels == LABELS["lacuna"]].astype(int)
    assert np.all(dots.mean(axis=1) < 110) and np.all(dots[:, 2] > dots[:, 0])  # dark blue


def test_ct_has_noise_and_concentric_ring_and_cupping_artefacts(volumes: dict) -> None:
    v = volumes["mg"]
    air = ndimage.binary_erosion(v.labels == LABELS["background"], iterations=2)
    assert v.ct[air].std() > 300
    s = make_sample((8, 64, 64), "mg", 3)
    cup, rings = ct_artefacts_2d(s, 64, 64)
    for field in (cup, rings):           # functions of the distance to the z axis only
        assert np.allclose(field, field.T, atol=1e-6)
        assert np.allclose(field, field[::-1, ::-1], atol=1e-6)
    assert rings.std() > 1e-3
    assert cup[31:33, 31:33].min() == pytest.approx(cup.max(), abs=1e-3) and cup[0, 0] == 0


def test_zarr_output_has_documented_layout_and_equals_make_volume(tmp_path: Path) -> None:
    shape = (20, 48, 40)
    out = write_volume_file(tmp_path / "v.zarr", shape, "mg", 7, chunk=16)
    ref = make_volume(shape, "mg", 7)
    g = zarr.open_group(str(out), mode="r")
    assert g["ct"].dtype == np.uint16 and g["ct"].chunks == (16, 16, 16)
    assert g["stain"].shape == (*shape, 3) and g["stain"].chunks == (16, 16, 16, 3)
    assert np.array_equal(g["ct"][:], ref.ct)
    assert np.array_equal(g["stain"][:], ref.stain)
    assert np.array_equal(g["labels"][:], ref.labels)
    attrs = dict(g.attrs)
    assert attrs["material"] == "mg" and attrs["seed"] == 7
    assert attrs["voxel_size_um"] == 5.0 and attrs["labels"] == LABELS
    assert attrs["generator_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["v.zarr"]


def test_hdf5_output_is_nexus_like_and_equals_make_volume(tmp_path: Path) -> None:
    shape = (12, 40, 48)
    out = write_volume_file(tmp_path / "v.h5", shape, "peek", 2, chunk=8)
    ref = make_volume(shape, "peek", 2)
    with h5py.File(out, "r") as f:
        assert f["/entry"].attrs["NX_class"] == "NXentry"
        assert f["/entry/data"].attrs["NX_class"] == "NXdata"
        data = f["/entry/data/data"]
        assert data.dtype == np.uint16 and data.attrs["voxel_size_um"] == 5.0
        assert np.array_equal(data[()], ref.ct)
        assert np.array_equal(f["/entry/truth/stain"][()], ref.stain)
        assert np.array_equal(f["/entry/truth/labels"][()], ref.labels)
        assert json.loads(f["/entry/truth/labels"].attrs["labels"]) == LABELS
        assert f["/entry/sample"].attrs["material"] == "peek"


def test_tiff_output_writes_ct_stack_with_truth_beside_it(tmp_path: Path) -> None:
    shape = (6, 32, 36)
    write_volume_file(tmp_path / "v.tif", shape, "ti", 1, chunk=4)
    ref = make_volume(shape, "ti", 1)
    assert np.array_equal(tifffile.imread(tmp_path / "v.tif"), ref.ct)
    assert np.array_equal(tifffile.imread(tmp_path / "v_stain.tif"), ref.stain)
    assert np.array_equal(tifffile.imread(tmp_path / "v_labels.tif"), ref.labels)


@pytest.mark.parametrize(("name", "shape", "material"), [
    ("zero.zarr", (0, 16, 16), "mg"), ("neg.h5", (8, -16, 16), "mg"),
    ("two.zarr", (16, 16), "mg"), ("steel.zarr", (8, 16, 16), "steel"),
    ("weird.npy", (8, 16, 16), "mg"),
])
def test_bad_arguments_raise_usage_error_and_write_nothing(
        tmp_path: Path, name: str, shape: tuple, material: str) -> None:
    with pytest.raises(UsageError):
        write_volume_file(tmp_path / name, shape, material, 0)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "v.h5"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists"):
        write_volume_file(out, (4, 16, 16), "mg", 0)
    assert out.read_bytes() == b"precious"
    write_volume_file(out, (4, 16, 16), "mg", 0, overwrite=True)
    with h5py.File(out, "r") as f:
        assert f["/entry/data/data"].shape == (4, 16, 16)


def test_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hpcstain.phantom.volume as volume

    calls = []
    real = volume.render_slab

    def flaky(*args: object, **kw: object) -> object:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("node died")
        return real(*args, **kw)

    monkeypatch.setattr(volume, "render_slab", flaky)
    monkeypatch.setattr(volume, "SLAB_VOXELS", 16 * 16 * 2)
    for name in ("v.zarr", "v.h5", "v.tif"):
        calls.clear()
        with pytest.raises(RuntimeError):
            write_volume_file(tmp_path / name, (8, 16, 16), "mg", 0, chunk=4)
    assert list(tmp_path.iterdir()) == []
