"""2D slide prediction: files in/out, §2.5 normalisation, §2.8 masking, reverse direction."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from micro import micro_config
from PIL import Image

from hpcstain.checkpoint import save_checkpoint
from hpcstain.config import LossConfig, ModelConfig, to_dict
from hpcstain.data.normalise import NORMALISED_BACKGROUND, Rois, ct_levels, find_ct_rois
from hpcstain.errors import InputError, UsageError
from hpcstain.models import build_model
from hpcstain.phantom import write_pairs
from hpcstain.predict import (
    load_stainer,
    mask_outside,
    predict_files,
    predict_slide,
)
from hpcstain.tiles import DEFAULT_TILING, PAPER_TILING, Tiling, resolve_tiling
from hpcstain.train.trainer import train

SMALL = Tiling(32, 16, "hann")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Three 96² phantom pairs and a 2-step tiny modified-CycleGAN checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    manifest = write_pairs(root / "pairs", n=3, seed=1, size=(96, 96))
    cfg = micro_config(manifest, "train.max_steps=2")
    train(cfg, root / "run", progress=False)
    with open(manifest, newline="") as fh:
        row = next(csv.DictReader(fh))
    base = Path(manifest).parent
    return {"root": root, "ckpt": root / "run" / "checkpoints" / "latest.pt",
            "ct": base / row["ct"], "histology": base / row["histology"],
            "mask": base / row["mask"]}


def tanh_fn(batch: torch.Tensor) -> torch.Tensor:
    """A per-pixel stand-in generator: (N, C, t, t) → (N, 3, t, t) in [-1, 1]."""
    g = batch[:, :1]
    return torch.cat([torch.tanh(2 * g), g.clamp(-1, 1), -g.clamp(-1, 1)], dim=1)


def test_predict_writes_rgb_png_of_the_input_shape(setup, tmp_path):
    out = predict_files([str(setup["ct"])], setup["ckpt"], tmp_path / "out", tiling=SMALL)
    assert out == [tmp_path / "out" / f"{setup['ct'].stem}.png"]
    with Image.open(out[0]) as img:
        assert img.mode == "RGB"
        rgb = np.asarray(img)
    assert rgb.shape == (*tifffile.imread(setup["ct"]).shape, 3)
    assert rgb.std() > 0


def test_predict_reads_hdf5_and_writes_tiff_by_extension(setup, tmp_path):
    ct = tifffile.imread(setup["ct"])
    with h5py.File(tmp_path / "scan.h5", "w") as fh:
        fh["entry/data/data"] = ct
    out = predict_files([f"{tmp_path / 'scan.h5'}:/entry/data/data"], setup["ckpt"],
                        tmp_path / "slide.tif", tiling=PAPER_TILING)
    assert tifffile.imread(out[0]).shape == (*ct.shape, 3)


def test_mask_outside_puts_exactly_the_mean_background_outside():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    mask = np.zeros((20, 24), bool)
    mask[5:15, 6:18] = True
    background = np.zeros_like(mask)
    background[:4] = True
    out = mask_outside(rgb, mask, background)
    expected = np.rint(rgb[background].mean(axis=0)).astype(np.uint8)
    assert (out[~mask] == expected).all()
    assert np.array_equal(out[mask], rgb[mask])


def test_predict_slide_fills_outside_the_mask_with_the_normalised_background(setup):
    ct = tifffile.imread(setup["ct"]).astype(np.float32)
    rois = find_ct_rois(ct)
    mask = np.asarray(Image.open(setup["mask"])) > 0
    plain = predict_slide(ct, tanh_fn, 1, rois=rois, tiling=SMALL)
    masked = predict_slide(ct, tanh_fn, 1, rois=rois, tiling=SMALL, mask=mask)
    assert (masked[~mask] == np.uint8(NORMALISED_BACKGROUND[0])).all()
    assert np.array_equal(masked[mask], plain[mask])


def test_given_levels_equal_the_rois_they_come_from(setup):
    ct = tifffile.imread(setup["ct"]).astype(np.float32)
    rois = find_ct_rois(ct)
    by_rois = predict_slide(ct, tanh_fn, 1, rois=rois, tiling=SMALL)
    by_levels = predict_slide(ct, tanh_fn, 1, levels=ct_levels(ct, rois), tiling=SMALL)
    assert np.array_equal(by_rois, by_levels)


def test_ct_is_normalised_to_the_training_levels():
    """Bone ROI → 30000, background → 10000 (16-bit scale) → the net sees -0.085 / -0.695."""
    ct = np.full((40, 40), 200.0, np.float32)
    ct[10:30, 10:30] = 900.0
    rois = Rois(ct == 900.0, ct == 200.0)
    seen: list[torch.Tensor] = []

    def record(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.clone())
        return batch[:, :3]

    predict_slide(ct, record, 3, rois=rois, tiling=Tiling(40, 40, "mean"))
    x = seen[0][0, 0].numpy()
    assert x[20, 20] == pytest.approx(30000 / 65535 * 2 - 1, abs=1e-5)
    assert x[0, 0] == pytest.approx(10000 / 65535 * 2 - 1, abs=1e-5)


def test_reverse_writes_a_uint16_ct_of_the_input_shape(setup, tmp_path):
    out = predict_files([str(setup["histology"])], setup["ckpt"], tmp_path, reverse=True,
                        tiling=SMALL, masks=str(setup["mask"]))
    ct = tifffile.imread(out[0])
    assert out[0].suffix == ".tif"
    assert ct.dtype == np.uint16 and ct.shape == np.asarray(Image.open(setup["mask"])).shape


def test_reverse_refuses_a_pix2pix_checkpoint(tmp_path, setup):
    model_cfg = ModelConfig(variant="pix2pix", generator="unet256", ngf=4, ndf=4)
    model = build_model(model_cfg, LossConfig(), "cpu")
    path = save_checkpoint(tmp_path / "p2p.pt", {
        "architecture": model.architecture(), "config": {"model": to_dict(model_cfg)},
        "model": model.state_dict()})
    with pytest.raises(UsageError, match=r"p2p\.pt.*pix2pix.*CycleGAN"):
        load_stainer(path, reverse=True)
    with pytest.raises(UsageError, match="pix2pix"):
        predict_files([str(setup["histology"])], path, tmp_path / "out", reverse=True)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten_without_overwrite(setup, tmp_path):
    target = tmp_path / "slide.png"
    target.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="slide.png.*exists"):
        predict_files([str(setup["ct"])], setup["ckpt"], target, tiling=SMALL)
    assert target.read_bytes() == b"keep me"
    predict_files([str(setup["ct"])], setup["ckpt"], target, tiling=SMALL, overwrite=True)
    with Image.open(target) as img:
        assert img.mode == "RGB"


def test_two_inputs_with_one_stem_are_refused(setup, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = other / setup["ct"].name
    copy.write_bytes(setup["ct"].read_bytes())
    with pytest.raises(UsageError, match="both be written"):
        predict_files([str(setup["ct"]), str(copy)], setup["ckpt"], tmp_path / "out")


def test_a_constant_ct_is_an_input_error_naming_the_file(setup, tmp_path):
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, np.full((40, 40), 7, np.uint16))
    with pytest.raises(InputError, match="flat.tif.*constant"):
        predict_files([str(flat)], setup["ckpt"], tmp_path / "out", tiling=SMALL)
    assert not (tmp_path / "out" / "flat.png").exists()


def test_tiling_names_and_overrides():
    assert resolve_tiling("paper") == PAPER_TILING == Tiling(256, 64, "mean")
    assert resolve_tiling("default") == DEFAULT_TILING
    assert resolve_tiling("paper", step=128, window="hann") == Tiling(256, 128, "hann")
    with pytest.raises(UsageError, match="unknown tiling"):
        resolve_tiling("fast")
    with pytest.raises(UsageError, match="step"):
        resolve_tiling("paper", step=512)
