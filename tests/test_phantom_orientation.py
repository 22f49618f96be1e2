"""Phantom pairs along any plane (z, y, x, mixed, random) and the dihedral augmentation."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcstain.cli import main
from hpcstain.config import DataConfig
from hpcstain.data.augment import Geometry, apply_geometry, draw_geometry
from hpcstain.data.manifest import read_manifest
from hpcstain.data.sampler import PairedPatchDataset, Slide
from hpcstain.errors import UsageError
from hpcstain.phantom import MANIFEST_COLUMNS, make_volume, render_pair, write_pairs
from hpcstain.phantom.pairs import _session_drift, plan_section, render_section
from hpcstain.phantom.render import stain
from hpcstain.phantom.sample import make_sample, tissue_at

SIZE = (48, 40)            # non-square, so a swapped axis cannot pass
AXIS = {"z": 0, "y": 1, "x": 2}


def volume_slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    sl: list[slice | int] = [slice(None)] * 3
    sl[axis] = index
    return vol[tuple(sl)]


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def pair_digest(pair) -> str:
    return digest(pair.ct, pair.histology, pair.mask, pair.truth, pair.labels)


# --------------------------------------------------------------------------- sections


@pytest.mark.parametrize("kind", ["z", "y", "x"])
def test_axis_sections_are_bit_identical_to_the_volume_slice(kind: str) -> None:
    """CT, truth and labels of a y/x (and z) section equal that slice of make_volume."""
    axis = AXIS[kind]
    sec = plan_section(kind, SIZE, seed=3, index=1)
    assert sec.kind == kind and sec.normal[axis] == 1.0
    vol = make_volume(sec.volume_shape, "mg", 77)
    s = make_sample(sec.volume_shape, "mg", 77)
    edge = sec.volume_shape[axis] - 1
    for index in (sec.index, 0, 1, edge):      # the borders too (the blur's nearest mode)
        ct, truth, labels = render_section(s, replace(sec, index=index), SIZE)
        assert ct.shape == labels.shape == SIZE
        assert np.array_equal(ct, volume_slice(vol.ct, axis, index))
        assert np.array_equal(truth, volume_slice(vol.stain, axis, index))
        assert np.array_equal(labels, volume_slice(vol.labels, axis, index))


@pytest.mark.parametrize("kind", ["y", "x"])
def test_y_and_x_pairs_show_the_volume_slice_of_their_sample(kind: str) -> None:
    seed, index, sample_seed = 5, 2, 1234
    pair = render_pair("ti", sample_seed, SIZE, seed, index, orientation=kind)
    sec = pair.section
    assert pair.orientation == kind and sec == plan_section(kind, SIZE, seed, index)
    vol = make_volume(sec.volume_shape, "ti", sample_seed)
    assert np.array_equal(pair.labels, volume_slice(vol.labels, AXIS[kind], sec.index))
    assert np.array_equal(pair.truth, volume_slice(vol.stain, AXIS[kind], sec.index))
    # the CT is that slice under the session's calibration drift
    drift = _session_drift(seed, 0)
    s = make_sample(sec.volume_shape, "ti", sample_seed)
    ct, _, _ = render_section(s, sec, SIZE, drift["ct_gain"], drift["ct_offset"])
    assert np.array_equal(pair.ct, ct)
    # the histology is a nearby plane: mostly, not fully, the same tissue
    agree = (pair.histology_labels == pair.labels).mean()
    assert 0.6 < agree < 1.0
    assert (pair.mask == 255).mean() > 0.2


def test_y_and_x_sections_look_along_other_axes_than_z() -> None:
    """Same sample, different planes: the screw is cut across (y) or along (z, x)."""
    labels = {k: render_pair("mg", 9, (64, 64), 1, 0, k).labels for k in ("z", "y", "x")}
    assert not np.array_equal(labels["z"], labels["y"])
    assert not np.array_equal(labels["z"], labels["x"])
    for lab in labels.values():
        assert (lab == 7).any()                 # every section cuts the screw


def test_random_sections_are_unit_planes_with_exact_truth() -> None:
    normals = []
    for index in range(4):
        pair = render_pair("mg", 40 + index, (40, 48), seed=2, index=index,
                           orientation="random")
        sec = pair.section
        n, r, c = (np.asarray(v) for v in (sec.normal, sec.row, sec.col))
        for v in (n, r, c):
            assert np.linalg.norm(v) == pytest.approx(1.0)
        assert abs(n @ r) < 1e-9 and abs(n @ c) < 1e-9 and abs(r @ c) < 1e-9
        normals.append(n)
        # truth and labels are the sample exactly on the CT plane
        s = make_sample(sec.volume_shape, "mg", 40 + index)
        tissue = tissue_at(s, sec.points(np.arange(40) - 19.5, np.arange(48) - 23.5))
        assert np.array_equal(pair.labels, tissue.labels)
        assert np.array_equal(pair.truth, stain(tissue))
        assert pair.ct.shape == (40, 48) and pair.ct.std() > 300
    assert len({tuple(np.round(n, 6)) for n in normals}) == 4
    again = render_pair("mg", 43, (40, 48), seed=2, index=3, orientation="random")
    assert pair_digest(again) == pair_digest(pair)


def test_volume_sections_are_axis_slices_anywhere_in_the_sample() -> None:
    from hpcstain.phantom.pairs import VOLUME_SPREAD

    d = 48
    offsets = {0: [], 1: [], 2: []}
    for index in range(12):
        sec = plan_section("volume", (d, d), seed=4, index=index)
        axis = index % 3
        assert sec.kind == "volume" and sec.volume_shape == (d, d, d)
        assert sec.normal[axis] == 1.0 and sum(map(abs, sec.normal)) == 1.0
        # rows/cols in the volume engine's layout: z-slices (y, x), y (z, x), x (z, y)
        in_plane = [a for a in range(3) if a != axis]
        assert sec.row[in_plane[0]] == 1.0 and sec.col[in_plane[1]] == 1.0
        off = (sec.centre[axis] - (d - 1) / 2) / (d / 2)
        assert abs(off) <= VOLUME_SPREAD
        offsets[axis].append(off)
    # not only the centre: the sections spread over the sample along each axis
    assert all(max(v) - min(v) > 0.3 for v in offsets.values())
    pair = render_pair("mg", 9, (d, d), seed=4, index=0, orientation="volume")
    s = make_sample((d, d, d), "mg", 9)
    tissue = tissue_at(s, pair.section.points(np.arange(d) - (d - 1) / 2,
                                              np.arange(d) - (d - 1) / 2))
    assert np.array_equal(pair.labels, tissue.labels) and pair.mask.any()


def test_oblique_renderer_agrees_with_the_axis_renderer_on_an_axis_plane() -> None:
    """A "random" plane that happens to be a y-slice gives that y-slice (blur order aside)."""
    sec = plan_section("y", SIZE, seed=3, index=0)
    s = make_sample(sec.volume_shape, "peek", 8)
    ct, truth, labels = render_section(s, sec, SIZE)
    ct2, truth2, labels2 = render_section(s, replace(sec, kind="random", index=None), SIZE)
    assert np.array_equal(labels, labels2) and np.array_equal(truth, truth2)
    diff = np.abs(ct.astype(int) - ct2.astype(int))[:, 3:-3]   # x edges: halo vs nearest
    assert diff.max() <= 2


# --------------------------------------------------------------------------- write_pairs


def test_z_is_the_default_and_unchanged() -> None:
    a = render_pair("mg", 5, (64, 64), 2, 1)
    b = render_pair("mg", 5, (64, 64), 2, 1, orientation="z")
    assert a.orientation == b.orientation == "z" and pair_digest(a) == pair_digest(b)
    # digest of this pair as rendered before orientations existed (same code path since);
    # regenerate only if numpy/scipy change the floating-point results on purpose
    assert pair_digest(a) == \
        "70d6916b729a6104c2ba1a5dd2acffd324399c7c4dd6acdc1225bbc02c848e24"


def manifest_rows(outdir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(outdir / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or ()), list(reader)


def test_z_set_has_the_old_manifest_and_provenance(tmp_path: Path) -> None:
    out = write_pairs(tmp_path / "z", 2, seed=4, size=(32, 32)).parent
    columns, _ = manifest_rows(out)
    assert tuple(columns) == MANIFEST_COLUMNS
    info = json.loads((out / "phantom.json").read_text())
    assert "orientation" not in info and "sections" not in info


def test_mixed_cycles_z_y_x_and_records_the_orientation(tmp_path: Path) -> None:
    mixed = write_pairs(tmp_path / "m", 4, seed=6, size=(32, 32), orientation="mixed").parent
    plain = write_pairs(tmp_path / "z", 4, seed=6, size=(32, 32)).parent
    columns, rows = manifest_rows(mixed)
    assert tuple(columns) == (*MANIFEST_COLUMNS, "orientation")
    assert [r["orientation"] for r in rows] == ["z", "y", "x", "z"]
    info = json.loads((mixed / "phantom.json").read_text())
    assert info["orientation"] == "mixed"
    assert [s["orientation"] for s in info["sections"]] == ["z", "y", "x", "z"]
    assert info["sections"][1]["normal"] == [0.0, 1.0, 0.0]
    # the z pairs of a mixed set are the pairs of a z set
    for pid in ("pair_000", "pair_003"):
        for f in (f"ct/{pid}.tif", f"histology/{pid}.png", f"truth/{pid}.png"):
            assert (mixed / f).read_bytes() == (plain / f).read_bytes()
    assert (mixed / "ct/pair_001.tif").read_bytes() != (plain / "ct/pair_001.tif").read_bytes()
    # the data layer reads the set; the orientation rides along as an extra column
    pairs = read_manifest(mixed / "manifest.csv")
    assert [p.extra["orientation"] for p in pairs] == ["z", "y", "x", "z"]


def test_random_sets_are_deterministic(tmp_path: Path) -> None:
    def tree(d: Path) -> str:
        return digest(*(np.frombuffer(p.read_bytes(), np.uint8)
                        for p in sorted(d.rglob("*")) if p.is_file()))

    a = write_pairs(tmp_path / "a", 2, seed=4, size=(32, 32), orientation="random").parent
    b = write_pairs(tmp_path / "b", 2, seed=4, size=(32, 32), orientation="random").parent
    c = write_pairs(tmp_path / "c", 2, seed=5, size=(32, 32), orientation="random").parent
    assert tree(a) == tree(b) != tree(c)
    info = json.loads((a / "phantom.json").read_text())
    assert [s["orientation"] for s in info["sections"]] == ["random", "random"]


def test_bad_orientation_is_a_usage_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="orientation"):
        write_pairs(tmp_path / "out", 1, 0, size=(32, 32), orientation="diagonal")
    assert list(tmp_path.iterdir()) == []


def test_cli_orientation_flag(tmp_path: Path) -> None:
    assert main(["phantom", "pairs", str(tmp_path / "p"), "--n", "2", "--size", "32", "32",
                 "--orientation", "x"]) == 0
    _, rows = manifest_rows(tmp_path / "p")
    assert [r["orientation"] for r in rows] == ["x", "x"]


# --------------------------------------------------------------------------- rot90


DIHEDRAL = {  # (flip_h, flip_v, transpose) -> the numpy transform of an (H, W) array
    (False, False, False): lambda a: a,
    (True, False, False): lambda a: a[:, ::-1],
    (False, True, False): lambda a: a[::-1, :],
    (True, True, False): lambda a: np.rot90(a, 2),
    (False, False, True): lambda a: a.T,
    (True, False, True): lambda a: np.rot90(a, -1),      # transpose, then flip h
    (False, True, True): lambda a: np.rot90(a, 1),
    (True, True, True): lambda a: np.rot90(a.T, 2),      # anti-transpose
}


def test_rot90_geometry_covers_the_8_dihedral_transforms_deterministically() -> None:
    draws = [draw_geometry(np.random.default_rng([0, i]), (64, 80), 32, rot90=True)
             for i in range(200)]
    assert {(g.flip_h, g.flip_v, g.transpose) for g in draws} == set(DIHEDRAL)
    again = draw_geometry(np.random.default_rng([0, 7]), (64, 80), 32, rot90=True)
    assert again == draws[7]
    # off: exactly the old draws (flips only, never a transpose)
    old = [draw_geometry(np.random.default_rng([0, i]), (64, 80), 32, flips=True)
           for i in range(50)]
    assert not any(g.transpose for g in old)


def test_each_dihedral_transform_moves_ct_histology_and_mask_together() -> None:
    h = 12
    ct = np.arange(h * h, dtype=np.float32).reshape(h, h) / (h * h)   # all values distinct
    hist = np.stack([ct * 2, -ct, ct + 1])
    image = torch.from_numpy(np.concatenate([ct[None], hist]))
    mask = torch.from_numpy((np.indices((h, h))[1] < 4).astype(np.uint8))  # left columns
    outs = set()
    for (fh, fv, tr), fn in DIHEDRAL.items():
        img, m = apply_geometry(image, mask, Geometry(0, 0, h, fh, fv, tr), h)
        assert np.array_equal(img[0].numpy(), fn(ct))
        for c in range(3):
            assert np.array_equal(img[1 + c].numpy(), fn(hist[c]))
        assert np.array_equal(m[0].numpy(), fn(mask.numpy()).astype(np.float32))
        outs.add(img[0].numpy().tobytes())
    assert len(outs) == 8


def test_dataset_with_rot90_keeps_patches_aligned_and_reproducible() -> None:
    rng = np.random.default_rng(0)
    ct = rng.uniform(-0.8, 0.8, size=(64, 64)).astype(np.float32)
    hist = np.stack([0.5 * ct, -0.3 * ct + 0.1, 0.2 * ct])
    slide = Slide("s", "mg", np.concatenate([ct[None], hist]), ct > 0)
    cfg = DataConfig(patch_size=32, patches_per_pair=16, rescale_min=1.0, rescale_max=1.0,
                     brightness_jitter=0.0, contrast_jitter=0.0, rot90=True)
    assert DataConfig().rot90 is False
    ds = PairedPatchDataset([slide], cfg, ct_channels=1, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        c, hst = item["ct"][0], item["histology"]
        torch.testing.assert_close(hst[0], 0.5 * c, atol=1e-6, rtol=0)
        torch.testing.assert_close(hst[1], -0.3 * c + 0.1, atol=1e-6, rtol=0)
        assert torch.equal(c > 0, item["mask"][0] > 0)
        assert torch.equal(ds[i]["ct"], item["ct"])
    geoms = [ds._geometry(ds.rng(i), 0) for i in range(len(ds))]
    assert any(g.transpose for g in geoms)
