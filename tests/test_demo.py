"""`hpcstain demo --quick` runs every stage end to end and reports sane numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from hpcstain.cli import main


def test_quick_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["status"] == "finished" and summary["train"]["steps"] > 0
    # the default target: the exact truth stain, through a manifest that names it
    assert summary["target"] == "truth"
    assert "manifest-truth.csv" in (out / "train/config.yaml").read_text()
    with (out / "pairs/manifest-truth.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["histology"] == r["truth"] != "" for r in rows)
    assert (out / "train/checkpoints/latest.pt").is_file()
    # one PNG: a row per plane (XY, XZ, YZ), CT | fused | slice-wise z | truth in each
    view = np.asarray(Image.open(out / "orthoviews.png"))
    assert view.ndim == 3 and view.shape[2] == 3 and view.std() > 0
    assert view.shape[1] > view.shape[0]  # four panels wide, three rows tall
    for name in ("truth", "fused", "fused-mean", "slicewise-z"):
        assert np.isfinite(summary["stripe_index_z"][name])
    # the tissue table: the stains beside the CT-threshold baseline and the truth
    readings = summary["tissue"]["readings"]
    assert set(readings) == {"stain fused", "stain fused, own class means", "stain fused-mean",
                             "stain slicewise-z", "CT threshold", "truth"}
    assert readings["truth"]["mean_dice_ct_separable"] == 1.0
    for entry in readings.values():
        assert 0.0 <= entry["mean_dice_ct_separable"] <= 1.0
        assert 0.0 <= entry["morphometry"]["bv_tv"] <= 1.0
    # held-out slides of another seed, not the training pairs
    assert "pairs-held-out" in (out / "evaluate/summary.json").read_text()
    for name in ("fused", "fused-mean", "slicewise-z"):
        scores = summary["volume_scores"][name]
        assert set(scores["stripe_ratio"]) == {"z", "y", "x"} and set(scores["ssim"]) == {
            "xy", "xz", "yz"}
        # the colour-calibrated PSNR fits gain/offset to the truth: never below the plain one
        assert scores["psnr_calibrated"] >= scores["psnr"] - 1e-6
    assert (out / "evaluate/table.md").read_text().count("Raw CT") == 1
    assert (out / "evaluate/boxplots.png").is_file()
    assert (out / "stain/fused.ome.zarr/.zattrs").is_file() or \
        (out / "stain/fused.ome.zarr/zarr.json").is_file()


def test_quick_demo_on_the_physical_ct(tmp_path: Path) -> None:
    """`--physics tomo`: slides and volume come out of the tomography chain (recorded in
    the volume's attrs), and the whole pipeline runs on them."""
    import zarr

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--physics", "tomo",
                 "--target", "histology"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["physics"] == "tomo" and summary["train"]["status"] == "finished"
    # --target histology trains on the slides as they come, not on the truth stain
    assert summary["target"] == "histology"
    assert "pairs/manifest.csv" in (out / "train/config.yaml").read_text()
    attrs = dict(zarr.open_group(str(out / "phantom-volume.zarr"), mode="r").attrs)
    assert attrs["physics"]["model"] == "tomo"
    assert np.isfinite(summary["volume_scores"]["fused-mean"]["psnr"])
