"""The phantom's physical CT chain (``--physics tomo``): each effect where it should be."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest

from hpcstain.cli import main
from hpcstain.errors import UsageError
from hpcstain.phantom import make_volume, render_pair, write_pairs
from hpcstain.phantom.sample import make_sample
from hpcstain.phantom.tomo import (
    HC_KEV_CM,
    MATERIALS,
    TomoParams,
    check_tomo,
    delta,
    fbp,
    make_geometry,
    mu,
    project,
    reconstruct,
    tomo_slab,
)
from hpcstain.phantom.volume import iter_slabs

PIX = 0.005                                    # cm per pixel in the synthetic slices
CLEAN = TomoParams(flux=0, rings=0, spectrum="mono", detector_blur=0, filter="ramp")


def disk(n: int, r: float, cy: float = 0.0, cx: float = 0.0) -> np.ndarray:
    c = (n - 1) / 2
    yy, xx = np.mgrid[:n, :n]
    return (((yy - c - cy) ** 2 + (xx - c - cx) ** 2) < r * r).astype(np.float32)


def maps(parts: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Basis maps (1, n, n) of material masks: photoelectric at 30 keV and electron density."""
    pe = sum(m * MATERIALS[name].rho * MATERIALS[name].pe30 for name, m in parts)
    ne = sum(m * MATERIALS[name].rho * MATERIALS[name].z_over_a for name, m in parts)
    return np.asarray(pe, np.float32)[None], np.asarray(ne, np.float32)[None]


def scan(parts: list[tuple[str, np.ndarray]], p: TomoParams, gains: np.ndarray | None = None,
         z: int = 0, pix: float = PIX) -> np.ndarray:
    pe, ne = maps(parts)
    g = make_geometry(pe.shape[1], pe.shape[2], angles=p.angles)
    return reconstruct(g, pe, ne, [z], p, seed=7, pix_cm=pix, gains=gains)[0]


def radial(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``img`` in 0.5-pixel radius bins about the centre: (radii, means)."""
    n = img.shape[0]
    c = (n - 1) / 2
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - c, xx - c)
    b = np.rint(r * 2).astype(int)
    sums = np.bincount(b.ravel(), img.ravel())
    cnt = np.bincount(b.ravel())
    keep = cnt > 0
    return np.arange(b.max() + 1)[keep] / 2.0, sums[keep] / cnt[keep]


def test_material_model_matches_nist_totals() -> None:
    # NIST XCOM mass attenuation (cm²/g): water 30 keV 0.3756; cortical bone 60 keV 0.3148;
    # Ti 60 keV 0.7661, 100 keV 0.2721 — the photoelectric + Klein–Nishina model within 10 %
    for name, e, ref in (("soft_tissue", 30, 0.3756), ("cortical_bone", 60, 0.3148),
                         ("ti", 60, 0.7661), ("ti", 100, 0.2721)):
        assert mu(name, e) / MATERIALS[name].rho == pytest.approx(ref, rel=0.1)
    # metal hardens far more than tissue: μ(25 keV)/μ(64 keV)
    assert mu("ti", 25) / mu("ti", 64) > 3 * mu("soft_tissue", 25) / mu("soft_tissue", 64)
    assert delta("soft_tissue", 30) == pytest.approx(2.6e-7, rel=0.1)   # water's δ


def test_projector_and_fbp_match_scikit_image() -> None:
    from skimage.transform import iradon, radon

    img = disk(48, 15) + disk(48, 4, 5, -8)
    g = make_geometry(48, 48)
    theta = np.degrees(g.theta)
    ours = fbp(g, project(g, img[None]))[0]
    ref = iradon(radon(img, theta, circle=False), theta, circle=False)
    assert np.abs(ours - ref).mean() < 0.03
    assert ours[20:28, 20:28].mean() == pytest.approx(1.0, abs=0.03)
    # the projector's line integrals: the disk's chord through the centre is 2r
    assert project(g, disk(48, 15)[None])[0, :, int(g.u_c)].mean() == pytest.approx(30, rel=0.02)


@pytest.mark.parametrize("offset", [9, -5])
def test_defective_column_gives_a_ring_of_its_radius(offset: int) -> None:
    water = [("soft_tissue", disk(48, 18))]
    g = make_geometry(48, 48)
    gains = np.ones(g.n_det)
    gains[int(g.u_c) + offset] = 0.97
    diff = np.abs(scan(water, CLEAN, gains) - scan(water, CLEAN))
    radii, prof = radial(diff)
    assert radii[np.argmax(prof[radii > 1.5]) + np.count_nonzero(radii <= 1.5)] \
        == pytest.approx(abs(offset), abs=0.5)


def test_metal_streak_runs_along_the_line_joining_two_blobs() -> None:
    n = 64
    metal = disk(n, 5, 0, -12) + disk(n, 5, 0, 12)
    parts = [("soft_tissue", disk(n, 26) - metal), ("ti", metal)]
    c = (n - 1) / 2
    ys, xs = np.rint(c).astype(int), np.rint(c).astype(int)

    def band(img: np.ndarray) -> float:    # between the blobs (along x) minus across (along y)
        along = img[ys - 1:ys + 2, xs - 4:xs + 5].mean()
        across = img[ys - 4:ys + 5, xs - 1:xs + 2].mean()
        return float((along - across) / mu("soft_tissue", 40))

    low = replace(TomoParams(), flux=300, rings=0)
    assert band(scan(parts, low)) < -0.5                       # a dark band between them
    assert band(scan(parts, replace(low, flux=0))) < -0.3     # beam hardening alone
    assert band(scan(parts, replace(CLEAN, flux=300))) < -0.1  # photon starvation alone
    assert abs(band(scan(parts, CLEAN))) < 0.05                # mono, noiseless: none


def test_phase_contrast_fringes_have_the_right_sign_and_paganin_removes_them() -> None:
    n, r = 64, 18
    bone = [("cortical_bone", disk(n, r))]
    base = replace(CLEAN, energy_kev=40.0)
    mu_bone = mu("cortical_bone", 40)

    def edge(img: np.ndarray) -> tuple[float, float, float]:
        radii, prof = radial(img / mu_bone)
        inside = prof[(radii > r - 3.5) & (radii < r - 0.5)].max()
        outside = prof[(radii > r + 0.5) & (radii < r + 3.5)].min()
        return inside - prof[radii < r - 6].mean(), outside, prof[radii < r - 6].mean()

    flat = edge(scan(bone, base))
    fringe = edge(scan(bone, replace(base, phase_distance=2.0)))
    assert fringe[0] > flat[0] + 0.1           # overshoot on the dense side of the edge
    assert fringe[1] < flat[1] - 0.1           # undershoot on the light side
    lam = HC_KEV_CM / 40.0
    db = delta("cortical_bone", 40) * 4 * math.pi / (mu_bone * lam)   # δ/β of the bone
    retrieved = edge(scan(bone, replace(base, phase_distance=2.0, paganin=db)))
    assert retrieved[0] < flat[0] + 0.03 and retrieved[1] > flat[1] - 0.03
    assert retrieved[2] == pytest.approx(1.0, abs=0.05)          # interior value kept


def test_poisson_noise_scales_with_inverse_sqrt_flux() -> None:
    water = [("soft_tissue", disk(48, 18))]
    truth = scan(water, CLEAN)
    inner = disk(48, 12).astype(bool)
    std = {f: float((scan(water, replace(CLEAN, flux=f)) - truth)[inner].std())
           for f in (1e3, 1e5)}
    assert std[1e3] / std[1e5] == pytest.approx(10.0, rel=0.2)


def test_beam_hardening_cups_a_uniform_bone_disk() -> None:
    bone = [("cortical_bone", disk(48, 18))]

    def cup(p: TomoParams) -> float:
        radii, prof = radial(scan(bone, p, pix=0.02))   # a 7 mm bone disk
        return float((prof[(radii > 12) & (radii < 15)].mean() - prof[radii < 3].mean())
                     / prof[radii < 3].mean())

    assert cup(replace(CLEAN, spectrum="poly")) > 0.04          # edge brighter than centre
    assert abs(cup(CLEAN)) < 0.02


def test_slabs_equal_the_whole_volume_and_truth_is_unchanged() -> None:
    p = TomoParams(flux=2000, phase_distance=0.5)
    whole = make_volume((10, 32, 32), "ti", 4, tomo=p)
    s = make_sample((10, 32, 32), "ti", 4)
    ct, rgb, lab = tomo_slab(s, 3, 8, 32, 32, p)
    np.testing.assert_array_equal(ct, whole.ct[3:8])
    np.testing.assert_array_equal(lab, whole.labels[3:8])
    np.testing.assert_array_equal(rgb, whole.stain[3:8])
    got = np.concatenate([c for _, c, _, _ in iter_slabs((10, 32, 32), "ti", 4, 4, tomo=p)])
    np.testing.assert_array_equal(got, whole.ct)
    rendered = make_volume((10, 32, 32), "ti", 4)
    np.testing.assert_array_equal(whole.labels, rendered.labels)
    np.testing.assert_array_equal(whole.stain, rendered.stain)
    assert not np.array_equal(whole.ct, rendered.ct)
    # beamline grey scale: air near grey_offset (Ti streaks lift it a little), bone well
    # below the renderer's 30000
    assert abs(np.median(whole.ct[whole.labels == 0]) - p.grey_offset) < 800
    assert np.median(whole.ct[whole.labels == 3]) < 20000


def test_render_default_is_unchanged() -> None:
    # hashes of the renderer's output before the physics option existed
    v = make_volume((6, 40, 40), "ti", 3)
    assert hashlib.sha256(v.ct.tobytes()).hexdigest()[:16] == "b7959984319b3945"
    assert hashlib.sha256(v.stain.tobytes()).hexdigest()[:16] == "ca3bfdaefe1622a3"
    pair = render_pair("mg", 5, (32, 32), 1, 0)
    assert hashlib.sha256(pair.ct.tobytes()).hexdigest()[:16] == "f73e4768f8e9e129"
    assert hashlib.sha256(pair.histology.tobytes()).hexdigest()[:16] == "049b58b514dd1e9e"


def test_tomo_pairs_keep_the_histology(tmp_path) -> None:
    import json

    from PIL import Image

    write_pairs(tmp_path / "r", 1, 2, size=(32, 32))
    write_pairs(tmp_path / "t", 1, 2, size=(32, 32), tomo=TomoParams(flux=1000))
    for sub in ("histology", "truth", "mask", "labels"):
        a = np.asarray(Image.open(tmp_path / f"r/{sub}/pair_000.png"))
        b = np.asarray(Image.open(tmp_path / f"t/{sub}/pair_000.png"))
        np.testing.assert_array_equal(a, b)
    info = json.loads((tmp_path / "t/phantom.json").read_text())
    assert info["physics"]["flux"] == 1000.0
    assert "physics" not in json.loads((tmp_path / "r/phantom.json").read_text())
    with pytest.raises(UsageError, match="z sections only"):
        write_pairs(tmp_path / "y", 1, 2, size=(32, 32), orientation="y", tomo=TomoParams())


@pytest.mark.parametrize("bad, match", [
    (dict(flux=-1.0), "--flux"), (dict(rings=-0.5), "--rings"),
    (dict(paganin=500.0), "needs a --phase-distance"), (dict(spectrum="pink"), "--spectrum"),
    (dict(energy_kev=5.0), "--energy"), (dict(angles=3), "--angles"),
    (dict(grey_scale=0.0), "--grey"), (dict(flux=float("nan")), "finite"),
])
def test_bad_knobs_are_one_usage_error(bad: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        check_tomo(TomoParams(**bad))


def test_cli_physics_flags(tmp_path, capsys) -> None:
    out = tmp_path / "v.zarr"
    assert main(["phantom", "volume", str(out), "--shape", "4", "24", "24", "--physics",
                 "tomo", "--flux", "500", "--rings", "2", "--grey", "1000", "5000"]) == 0
    import zarr

    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert attrs["physics"]["flux"] == 500.0 and attrs["physics"]["grey_scale"] == 5000.0
    assert attrs["ct_air"] == 1000.0 and attrs["cupping"] is None
    assert main(["phantom", "volume", str(tmp_path / "w.zarr"), "--shape", "4", "24", "24",
                 "--flux", "500"]) == 2
    assert "--flux needs --physics tomo" in capsys.readouterr().err


def test_the_sample_tube_wall_is_scanned() -> None:
    v = make_volume((3, 64, 64), "mg", 2, tomo=TomoParams(flux=0, rings=0))
    air = np.median(v.ct[v.labels == 0])
    tube = np.median(v.ct[v.labels == 1])
    soft = np.median(v.ct[v.labels == 2])
    assert air + 300 < tube < soft        # polypropylene: above air, below soft tissue


def test_tomo_ct_slab_centre_plane_is_the_pairs_ct() -> None:
    from hpcstain.phantom.pairs import render_ct_slab

    p = TomoParams(flux=2000)
    pair = render_pair("ti", 9, (32, 32), 1, 0, tomo=p)
    slab = render_ct_slab("ti", 9, (32, 32), 1, 0, planes=3, tomo=p)
    np.testing.assert_array_equal(slab[1], pair.ct)
    assert not np.array_equal(slab[0], slab[1])
