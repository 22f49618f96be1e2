"""Cupping correction (hpcstain.ct.cupping): fit on the phantom, no-op, chunk invariance,
conventions recorded and enforced, the CLI verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from hpcstain.cli import main
from hpcstain.ct.cupping import (
    Cupping,
    apply_cupping,
    correction_map,
    fit_cupping,
    fit_source,
)
from hpcstain.errors import InputError, UsageError
from hpcstain.phantom import make_volume, write_volume_file
from hpcstain.phantom.render import CT_GAIN, NOISE_SIGMA
from hpcstain.volume.io import CorrectedSource

NOISE = NOISE_SIGMA * CT_GAIN   # the phantom's per-voxel noise σ in grey values (700)


class ArraySource:
    def __init__(self, ct: np.ndarray) -> None:
        self.ct, self.shape, self.spec = ct, ct.shape, "array"
        self.nan_policy, self.nan_value, self.voxel_size_um = "error", 0.0, None

    def read(self, region):
        return self.ct[region]


def curvature(c: Cupping) -> float:
    """Grey values per voxel² of the parabola (the identifiable shape parameter)."""
    return c.coeffs[0] / c.radius ** 2


@pytest.mark.parametrize(("material", "seed"), [("ti", 4), ("mg", 3)])
def test_fit_recovers_the_phantoms_cupping(material: str, seed: int) -> None:
    vol = make_volume((24, 128, 128), material, seed, cupping=0.15)
    truth = vol.cupping
    assert truth is not None and truth["depth_ct"] == pytest.approx(3000.0)
    fit = fit_cupping(vol.ct)
    assert fit.info["status"] == "fitted"
    true_curv = truth["depth_ct"] / truth["radius"] ** 2
    assert curvature(fit) == pytest.approx(true_curv, rel=0.1)
    # the fitted correction undoes the true cupping inside the sample (up to a constant)
    ys = xs = np.arange(128)
    r = np.hypot(ys[:, None] - truth["centre_yx"][0], xs[None, :] - truth["centre_yx"][1])
    inside = r < 0.9 * truth["radius"]
    lost = truth["depth_ct"] * np.clip(1 - (r / truth["radius"]) ** 2, 0, 1)
    err = correction_map(fit, ys, xs)[inside] - lost[inside]
    assert np.std(err) < 0.05 * truth["depth_ct"]


def test_no_cupping_leaves_grey_values_within_noise() -> None:
    vol = make_volume((24, 128, 128), "ti", 4, cupping=0.0)
    fit = fit_cupping(vol.ct)
    change = apply_cupping(vol.ct, fit) - vol.ct.astype(np.float32)
    assert np.abs(change).max() < 0.25 * NOISE


def test_noop_on_a_flat_volume() -> None:
    rng = np.random.default_rng(0)
    flat = (20000 + 500 * rng.standard_normal((16, 96, 96))).astype(np.float32)
    fit = fit_cupping(flat)
    assert np.abs(correction_map(fit, np.arange(96), np.arange(96))).max() < 0.1 * 500
    const = np.full((4, 64, 64), 12345, np.uint16)
    fit = fit_cupping(const)
    assert fit.coeffs == (0.0,) and fit.info["status"].startswith("no flat")
    np.testing.assert_array_equal(apply_cupping(const, fit), const.astype(np.float32))


def test_chunked_application_equals_the_whole_volume() -> None:
    c = Cupping((30.5, 41.0), 37.0, (812.5, -120.25))
    ct = np.random.default_rng(1).integers(8000, 30000, (6, 70, 90)).astype(np.uint16)
    whole = apply_cupping(ct, c)
    out = np.empty_like(whole)
    for y0 in range(0, 70, 32):
        for x0 in range(0, 90, 25):
            block = ct[:, y0:y0 + 32, x0:x0 + 25]
            out[:, y0:y0 + 32, x0:x0 + 25] = apply_cupping(block, c, (y0, x0))
    np.testing.assert_array_equal(out, whole)
    # the correction: c.depth on the axis, 0 from the radius on
    cmap = correction_map(c, np.array([30.5, 30.5, 30.5]), np.array([41.0, 41.0 + 37, 90.0]))
    np.testing.assert_allclose(cmap[0], [c.depth, 0.0, 0.0], atol=1e-3)
    src = CorrectedSource(ArraySource(ct), c)
    region = (slice(2, 5), slice(10, 40), slice(33, 80))
    np.testing.assert_array_equal(src.read(region), whole[region])
    slabs = list(src.iter_slabs(depth=4))  # scans see the corrected CT too
    np.testing.assert_array_equal(np.concatenate([b for _, b in slabs]), whole)


def test_stained_slabs_see_the_whole_volume_correction(tmp_path) -> None:
    """prepare_block (read + halo + correction + Gaussian) over any box = the whole volume's."""
    from hpcstain.ct.prepare import prepare_block
    from hpcstain.volume import make_plan

    vol = make_volume((16, 64, 64), "ti", 4, cupping=0.15)
    src = ArraySource(vol.ct)
    plan = make_plan(src, chunk=8, axes="z", sigma=1.0, levels=(30000.0, 10000.0),
                     cupping="auto")
    assert plan.cupping["model"] == "radial-even-poly" and plan.cupping["coeffs"][0] > 1000
    whole = prepare_block(src, (slice(0, 16), slice(0, 64), slice(0, 64)), plan.ct_recipe)
    for box in [(slice(0, 8), slice(0, 64), slice(0, 64)),
                (slice(5, 13), slice(17, 50), slice(3, 29))]:
        np.testing.assert_allclose(prepare_block(src, box, plan.ct_recipe), whole[box], atol=1e-6)
    none = make_plan(src, chunk=8, axes="z", sigma=1.0, levels=(30000.0, 10000.0))
    assert none.cupping == {}
    assert np.abs(prepare_block(src, (slice(0, 16), slice(0, 64), slice(0, 64)), none.ct_recipe)
                  - whole).max() > 0.02


def tiny_checkpoint(path, **data):
    from hpcstain.checkpoint import save_checkpoint
    from hpcstain.config import Config, to_dict
    from hpcstain.models import architecture_of, build_model

    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = 4, 4, 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    model = build_model(cfg.model, cfg.loss, "cpu", seed=0)
    save_checkpoint(path, {"architecture": architecture_of(cfg.model), "config": to_dict(cfg),
                           "model": model.state_dict()})
    return path


def test_conventions_differ_and_a_mismatch_is_refused(tmp_path) -> None:
    from hpcstain.inference import load_generator, load_pinned, pin_generator
    from hpcstain.volume import make_plan

    plain = tiny_checkpoint(tmp_path / "plain.pt")
    radial = tiny_checkpoint(tmp_path / "radial.pt", cupping="radial")
    c_plain, c_radial = (load_generator(p).conventions for p in (plain, radial))
    assert (c_plain.cupping, c_radial.cupping) == ("none", "radial")
    assert c_plain != c_radial
    sha = pin_generator(radial, tmp_path / "pinned.pt")   # the run's copy keeps it
    assert load_pinned(tmp_path / "pinned.pt", sha).conventions.cupping == "radial"

    src = ArraySource(make_volume((8, 64, 64), "ti", 4, cupping=0.15).ct)
    kw = {"chunk": 8, "axes": "z", "levels": (30000.0, 10000.0)}
    assert make_plan(src, checkpoint=radial, **kw).cupping["model"] == "radial-even-poly"
    assert make_plan(src, checkpoint=plain, **kw).cupping == {}
    with pytest.raises(UsageError, match=r"trained with cupping correction 'radial'.*"
                                         r"--cupping none"):
        make_plan(src, checkpoint=radial, cupping="none", **kw)
    with pytest.raises(UsageError, match=r"trained with cupping correction 'none'.*"
                                         r"--cupping auto"):
        make_plan(src, checkpoint=plain, cupping="auto", **kw)
    forced = make_plan(src, checkpoint=plain, cupping="auto", cupping_override=True, **kw)
    assert forced.cupping["model"] == "radial-even-poly"


def test_plan_record_round_trips_and_bad_records_are_refused() -> None:
    c = Cupping((1.5, 2.5), 10.0, (100.0, -5.0), {"status": "fitted"})
    assert Cupping.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(InputError, match="plan.json: bad cupping record"):
        Cupping.from_dict({"model": "other"}, "plan.json")
    with pytest.raises(InputError, match="bad cupping parameters"):
        Cupping.from_dict({**c.to_dict(), "radius": -1}, "plan.json")


def test_training_slides_are_corrected_under_the_radial_convention(tmp_path) -> None:
    from hpcstain.config import DataConfig
    from hpcstain.data.manifest import read_manifest, read_pair
    from hpcstain.data.sampler import load_slide, load_slides
    from hpcstain.phantom import write_pairs

    manifest = write_pairs(tmp_path / "pairs", 2, seed=3, size=(96, 96))
    pairs = read_manifest(manifest)
    slides = load_slides(pairs, DataConfig(cupping="radial"))
    # one fit for the set of equally sized axial slides, recorded on each slide
    assert slides[0].cupping is slides[1].cupping
    assert slides[0].cupping.centre_yx == (47.5, 47.5)
    a = load_slide(pairs[0], DataConfig())
    b = slides[0]
    assert a.ct.shape == b.ct.shape and np.abs(a.ct - b.ct).max() > 0
    alone = load_slide(pairs[0], DataConfig(cupping="radial"))  # fitted on itself, recorded
    assert alone.cupping == fit_cupping(read_pair(pairs[0]).ct)


def test_cli_fits_and_writes_the_corrected_volume(tmp_path, capsys) -> None:
    vol = write_volume_file(tmp_path / "v.zarr", (16, 96, 96), "ti", 4, cupping=0.15)
    attrs = dict(zarr.open_group(str(vol), mode="r").attrs)
    assert attrs["cupping"]["depth_ct"] == pytest.approx(3000.0)
    out = tmp_path / "c.zarr"
    assert main(["cupping", str(vol), "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    fit = Cupping.from_dict(record)
    raw = zarr.open_group(str(vol), mode="r")["ct"][...]
    got = zarr.open_group(str(out), mode="r")
    expected = np.clip(np.rint(apply_cupping(raw, fit)), 0, 65535).astype(np.uint16)
    np.testing.assert_array_equal(got["ct"][...], expected)
    assert got.attrs["cupping"]["coeffs"] == record["coeffs"]
    from hpcstain.volume import open_volume

    assert fit_source(open_volume(out)).depth < 0.15 * fit.depth  # nothing left to fix
    assert main(["cupping", str(vol), "--out", str(out)]) == 2            # exists
    assert main(["cupping", str(vol), "--out", str(tmp_path / "c.h5")]) == 2
    assert not (tmp_path / "c.h5").exists()
    err = capsys.readouterr().err
    assert "output exists" in err and "written as zarr" in err


def test_fuse_tests_outside_on_the_corrected_ct(tmp_path) -> None:
    """With a correction in the plan, fusion's outside-the-sample test reads corrected CT
    (uncorrected, strongly cupped soft tissue near the axis falls below the resin level)."""
    import torch

    from hpcstain.executors import run_stain
    from hpcstain.volume import fuse_run, init_run, make_plan, open_volume

    def grey(batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :1].expand(-1, 3, -1, -1).clamp(-1, 1) * 0.5

    path = write_volume_file(tmp_path / "v.zarr", (16, 96, 96), "ti", 4, cupping=0.3)
    src = open_volume(f"{path}:ct")
    plan = make_plan(src, chunk=16, axes="z", tile=32, step=24, cupping="auto")
    assert plan.cupping["depth"] > 3000
    run = init_run(tmp_path / "run", plan)
    run_stain(run, grey, progress=False)
    fuse_run(run, method="mean")
    rgba = np.asarray(zarr.open_group(str(run / "fused.ome.zarr"), mode="r")["0"][...])
    labels = zarr.open_group(str(path), mode="r")["labels"][...]
    painted = (rgba[:3] == 250).all(axis=0)
    soft = labels == 2
    assert painted[soft].mean() < 0.02 and painted[labels == 0].mean() > 0.5


def test_cli_stain_refuses_a_convention_mismatch_and_leaves_nothing(tmp_path, capsys) -> None:
    vol = write_volume_file(tmp_path / "v.zarr", (8, 64, 64), "ti", 4, cupping=0.15)
    ckpt = tiny_checkpoint(tmp_path / "plain.pt")
    out = tmp_path / "st"
    assert main(["stain", f"{vol}:ct", "--checkpoint", str(ckpt), "--out", str(out),
                 "--cupping", "auto", "--axes", "z", "--plan-only"]) == 2
    assert "trained with cupping correction 'none'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["stain", f"{vol}:ct", "--checkpoint", str(ckpt), "--out", str(out),
                 "--cupping", "auto", "--cupping-override", "--axes", "z",
                 "--plan-only"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["cupping"]["model"] == "radial-even-poly"
    assert "cupping: +" in capsys.readouterr().out
