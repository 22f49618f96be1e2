"""End to end on the phantom: HDF5 input → levels estimated → 3 axes → fuse → OME-Zarr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from micro import fails_after

from hpcstain.executors import run_stain
from hpcstain.phantom import write_volume_file
from hpcstain.volume import fuse_run, init_run, make_plan, open_volume
from hpcstain.volume.fuse import fuse_mean
from hpcstain.volume.rundir import axis_store


def colour_map(batch: torch.Tensor) -> torch.Tensor:
    """Per-pixel toluidine-ish map: dark CT → near white, bright → purple."""
    g = batch[:, :1]
    return torch.cat([-0.2 - 0.6 * g, -0.5 - 0.4 * g, 0.3 - 0.3 * g], dim=1).clamp(-1, 1)


def test_phantom_hdf5_to_fused_ome_zarr(tmp_path):
    h5 = write_volume_file(tmp_path / "ph.h5", (24, 40, 40), "ti", 0)
    src = open_volume(h5)
    plan = make_plan(src, chunk=(12, 20, 20), tile=16, step=8, window="hann")
    assert 9000 < plan.background_level < 12000 < 20000 < plan.bone_level < 32000
    assert plan.voxel_size_um == (5.0, 5.0, 5.0)
    run = init_run(tmp_path / "run", plan)
    report = run_stain(run, colour_map, progress=False)
    assert len(report.stained) == plan.n_units == 6  # two slabs per axis
    fused = fuse_run(run, method="mean", fill_outside=False)
    assert fused.complete and len(fused.fused) == 8

    preds = np.stack([zarr.open_array(str(axis_store(run, a)), mode="r")[...] for a in "zyx"])
    root = zarr.open_group(str(run / "fused.ome.zarr"), mode="r")
    rgba = np.moveaxis(np.asarray(root["0"][...]), 0, -1)
    np.testing.assert_array_equal(rgba[..., :3], fuse_mean(preds))
    alpha = np.rint(rgba[..., :3].astype(np.float32).mean(-1))
    np.testing.assert_array_equal(rgba[..., 3], alpha.astype(np.uint8))
    screw = src.read((slice(0, 24), slice(0, 40), slice(0, 40))) > 45000
    assert rgba[..., 0][screw].mean() < rgba[..., 0][~screw].mean()  # metal stains dark
    scales = [d["coordinateTransformations"][0]["scale"]
              for d in root.attrs["multiscales"][0]["datasets"]]
    assert scales[0] == [1.0, 5.0, 5.0, 5.0] and len(scales) == len(list(root.array_keys()))


def tiny_checkpoint(path, seed: int = 0, **data):
    from hpcstain.checkpoint import save_checkpoint
    from hpcstain.config import Config, to_dict
    from hpcstain.models import architecture_of, build_model

    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = 4, 4, 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    model = build_model(cfg.model, cfg.loss, "cpu", seed=seed)
    save_checkpoint(path, {"architecture": architecture_of(cfg.model), "config": to_dict(cfg),
                           "model": model.state_dict()})
    return path, model


def ct_zarr(tmp_path, shape=(8, 16, 16)):
    rng = np.random.default_rng(0)
    data = rng.integers(8000, 32000, shape).astype(np.uint16)
    zarr.create_array(str(tmp_path / "ct.zarr"), data=data)
    return open_volume(tmp_path / "ct.zarr")


def test_pinned_generator_is_the_checkpoints_ct2hist_generator(tmp_path):
    from hpcstain.inference import load_generator
    from hpcstain.volume import PinnedStainer
    from hpcstain.volume.plan import load_plan
    from hpcstain.volume.rundir import generator_path

    ckpt, model = tiny_checkpoint(tmp_path / "g.pt")
    plan = make_plan(ct_zarr(tmp_path), chunk=8, axes="z", tile=16, step=8,
                     levels=(30000.0, 10000.0), checkpoint=ckpt)
    run = init_run(tmp_path / "run", plan)
    pinned = load_plan(run)
    assert generator_path(run).is_file() and len(pinned.generator_sha256) == 64
    assert generator_path(run).stat().st_size < ckpt.stat().st_size  # generator only
    fn = PinnedStainer(str(run))()
    assert PinnedStainer(str(run))() is fn  # built once per process and content hash
    batch = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    out = fn(batch)
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1
    torch.testing.assert_close(out, model.stain(batch))
    torch.testing.assert_close(load_generator(ckpt).fn(batch), out)
    report = run_stain(run, progress=False)  # fn from the run's pinned generator
    assert len(report.stained) == plan.n_units == 1


def test_replaced_checkpoint_between_kill_and_resume_changes_nothing(tmp_path):
    """The run keeps its pinned weights: resume after the source file changed == straight."""
    from hpcstain.executors import run_local
    from hpcstain.volume.stain import PinnedStainer, checkpoint_changed

    ckpt, _ = tiny_checkpoint(tmp_path / "latest.pt", seed=0)
    src = ct_zarr(tmp_path, (12, 16, 16))

    def plan_run(name):
        plan = make_plan(src, chunk=4, axes="z,y", tile=16, step=8,
                         levels=(30000.0, 10000.0), checkpoint=ckpt)
        return init_run(tmp_path / name, plan)

    straight = plan_run("straight")
    run_local(straight, progress=False)
    resumed = plan_run("resumed")
    with pytest.raises(RuntimeError):
        run_local(resumed, fails_after(PinnedStainer(str(resumed))(), 3), batch_size=4,
                  progress=False)
    tiny_checkpoint(ckpt, seed=1)  # training overwrote latest.pt meanwhile
    init_run(resumed, make_plan(src, chunk=4, axes="z,y", tile=16, step=8,
                                levels=(30000.0, 10000.0), checkpoint=ckpt))  # accepted
    assert "pinned generator" in checkpoint_changed(resumed)
    run_local(resumed, progress=False)
    for axis in "zy":
        a = zarr.open_array(str(axis_store(straight, axis)), mode="r")[...]
        b = zarr.open_array(str(axis_store(resumed, axis)), mode="r")[...]
        np.testing.assert_array_equal(a, b)


def test_tampered_pinned_generator_is_refused_naming_both_hashes(tmp_path):
    from hpcstain.errors import InputError
    from hpcstain.volume.plan import load_plan
    from hpcstain.volume.rundir import generator_path
    from hpcstain.volume.stain import PinnedStainer

    ckpt, _ = tiny_checkpoint(tmp_path / "g.pt")
    plan = make_plan(ct_zarr(tmp_path), chunk=8, axes="z", tile=16, step=8,
                     levels=(30000.0, 10000.0), checkpoint=ckpt)
    run = init_run(tmp_path / "run", plan)
    tiny_checkpoint(generator_path(run), seed=5)
    recorded = load_plan(run).generator_sha256
    with pytest.raises(InputError, match=rf"sha256 [0-9a-f]{{16}}.*recorded {recorded[:16]}"):
        PinnedStainer(str(run))()


def test_target_levels_come_from_the_checkpoint(tmp_path):
    """A model trained with other §2.5 levels is normalised with those levels by stain."""
    from hpcstain.ct.prepare import prepare_block
    from hpcstain.volume.plan import load_plan

    ckpt, _ = tiny_checkpoint(tmp_path / "g.pt", ct_bone_level=40000.0,
                              ct_background_level=5000.0)
    src = ct_zarr(tmp_path)
    plan = make_plan(src, chunk=8, axes="z", sigma=0.0, levels=(30000.0, 10000.0),
                     checkpoint=ckpt)
    run = init_run(tmp_path / "run", plan)
    assert load_plan(run).target_levels == (40000.0, 5000.0)
    box = (slice(0, 8), slice(0, 16), slice(0, 16))
    unit = prepare_block(src, box, load_plan(run).ct_recipe)
    raw = src.read(box).astype(np.float32)
    expected = ((raw - 10000) * (35000 / 20000) + 5000).clip(0, 65535) / 65535 * 2 - 1
    np.testing.assert_allclose(unit, expected, atol=2e-6)


def test_bf16_autocast_output_stays_close_to_fp32(tmp_path):
    """The GPU fast path (bf16 autocast) checked against fp32 on the CPU."""
    from hpcstain.inference import load_generator

    ckpt, _ = tiny_checkpoint(tmp_path / "g.pt")
    batch = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32).sin()
    fp32 = load_generator(ckpt).fn(batch)
    bf16 = load_generator(ckpt, autocast="bf16").fn(batch)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    diff = (bf16 - fp32).abs()
    # bf16 keeps 8 bits of mantissa (~0.4 % per op); through ~10 conv + norm layers of a
    # random tiny net that is ~0.03 mean error on [-1, 1] (about 4 uint8 levels): the path
    # differs from fp32 (it really ran in bf16) and stays above 30 dB PSNR.
    psnr = 10 * torch.log10(4.0 / (diff**2).mean())
    assert diff.max() > 0 and psnr > 30 and diff.mean() < 0.05
    plan = make_plan(ct_zarr(tmp_path), chunk=8, axes="z", tile=16, step=8,
                     levels=(30000.0, 10000.0), checkpoint=ckpt, autocast="bf16")
    assert plan.autocast == "bf16"


def test_fuse_paints_resin_and_air_with_the_slide_background(tmp_path):
    """Outside the sample (phantom labels: background) the fused stain is (250, 250, 250);
    inside, it is the generator's fusion untouched."""
    from hpcstain.ct.outside import outside_sample

    path = write_volume_file(tmp_path / "ph.zarr", (24, 48, 48), "mg", 3)
    src = open_volume(f"{path}:ct")
    plan = make_plan(src, chunk=(12, 24, 24), tile=16, step=8)
    run = init_run(tmp_path / "run", plan)
    run_stain(run, colour_map, progress=False)
    fuse_run(run, method="mean", out="raw.ome.zarr", fill_outside=False)
    fuse_run(run, method="mean")
    raw = np.moveaxis(zarr.open_group(str(run / "raw.ome.zarr"), mode="r")["0"][...], 0, -1)
    filled = np.moveaxis(zarr.open_group(str(run / "fused.ome.zarr"), mode="r")["0"][...], 0, -1)
    labels = zarr.open_group(str(path), mode="r")["labels"][...]
    changed = np.any(raw != filled, axis=-1)
    assert (filled[changed] == 250).all()
    background, inside = labels == 0, labels >= 2  # 0 resin/air, 1 tube wall, ≥ 2 sample
    assert changed[background].mean() > 0.8  # the medium is painted (the 5³ mean blurs its rim)
    assert changed[inside].mean() < 0.02      # the sample keeps its stain
    whole = np.asarray(src.read((slice(0, 24), slice(0, 48), slice(0, 48))), np.float32)
    assert outside_sample(whole, (plan.bone_level, plan.background_level)).any()
