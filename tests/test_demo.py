"""`hpcstain demo --quick` runs every stage end to end and reports sane numbers."""

from __future__ import annotations

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
    assert (out / "train/checkpoints/latest.pt").is_file()
    for name in ("truth", "fused-consistency", "fused-mean", "slicewise-z"):
        view = np.asarray(Image.open(out / f"orthoview-{name}.png"))
        assert view.ndim == 3 and view.shape[2] == 3 and view.std() > 0
        assert np.isfinite(summary["stripe_index_z"][name])
    for name in ("fused-consistency", "fused-mean", "slicewise-z"):
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
    assert main(["demo", "--out", str(out), "--quick", "--physics", "tomo"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["physics"] == "tomo" and summary["train"]["status"] == "finished"
    attrs = dict(zarr.open_group(str(out / "phantom-volume.zarr"), mode="r").attrs)
    assert attrs["physics"]["model"] == "tomo"
    assert np.isfinite(summary["volume_scores"]["fused-mean"]["psnr"])
