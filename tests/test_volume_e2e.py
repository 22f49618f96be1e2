"""End to end on the phantom: HDF5 input → levels estimated → 3 axes → fuse → OME-Zarr."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from hpcstain.phantom import write_volume_file
from hpcstain.volume import fuse_run, init_run, make_plan, open_volume, run_stain
from hpcstain.volume.fuse import fuse_mean
from hpcstain.volume.plan import axis_store


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
    assert len(report.stained) == plan.n_chunks == 8
    fused = fuse_run(run, method="mean")
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


def test_checkpoint_stainer_runs_a_saved_generator(tmp_path):
    from hpcstain.config import Config, to_dict
    from hpcstain.models import architecture_of, build_model
    from hpcstain.train.checkpoint import save_checkpoint
    from hpcstain.volume import CheckpointStainer

    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = 4, 4, 1
    model = build_model(cfg.model, cfg.loss, "cpu")
    ckpt = save_checkpoint(tmp_path / "g.pt", {"architecture": architecture_of(cfg.model),
                                               "config": to_dict(cfg),
                                               "model": model.state_dict()})
    fn = CheckpointStainer(str(ckpt))()
    assert CheckpointStainer(str(ckpt))() is fn  # built once per process
    batch = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    out = fn(batch)
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1
    torch.testing.assert_close(out, model.stain(batch))

    zarr.create_array(str(tmp_path / "ct.zarr"), data=np.full((8, 16, 16), 20000, np.uint16))
    plan = make_plan(open_volume(tmp_path / "ct.zarr"), chunk=8, axes="z", tile=16, step=8,
                     levels=(30000.0, 10000.0), checkpoint=ckpt)
    run = init_run(tmp_path / "run", plan)
    report = run_stain(run, progress=False)  # fn from the plan's checkpoint
    assert len(report.stained) == plan.n_chunks == 4
