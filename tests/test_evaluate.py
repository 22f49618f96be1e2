"""§2.10 evaluation: patch protocol, baseline and truth rows, splits, report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from micro import micro_config
from PIL import Image

from hpcstain.data.manifest import read_manifest
from hpcstain.errors import UsageError
from hpcstain.evaluate import evaluate_manifest, read_splits, score_images
from hpcstain.metrics.lpips import LPIPS
from hpcstain.metrics.patches import mask_coverage, patch_grid
from hpcstain.phantom import write_pairs
from hpcstain.tiles import Tiling
from hpcstain.train.trainer import train

TILING = Tiling(32, 16, "mean")
PATCH = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Three 128² phantom pairs (one held out as test) and a 2-step tiny checkpoint."""
    root = tmp_path_factory.mktemp("evaluate")
    manifest = write_pairs(root / "pairs", n=3, seed=1, size=(128, 128))
    cfg = micro_config(manifest, "data.n_test=1", "train.max_steps=2")
    train(cfg, root / "run", progress=False)
    return {"root": root, "manifest": Path(manifest), "run": root / "run",
            "ckpt": root / "run" / "checkpoints" / "latest.pt"}


@pytest.fixture(scope="module")
def report(run):
    out = run["root"] / "eval"
    rep = evaluate_manifest(run["manifest"], run["ckpt"], out, split=run["run"],
                            tiling=TILING, patch=PATCH, log=lambda _: None)
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {"out": out, "report": rep, "rows": rows,
            "summary": json.loads((out / "summary.json").read_text())}


def test_evaluate_writes_the_report_files(report):
    out = report["out"]
    for name in ("metrics.csv", "summary.json", "table.md", "boxplots.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "boxplots.png") as img:
        assert img.format == "PNG"
    slides = sorted(p.name for p in (out / "slides").iterdir())
    assert slides == ["pair_000.png", "pair_001.png", "pair_002.png"]
    with Image.open(out / "slides" / "pair_000.png") as img:
        assert img.mode == "RGB" and img.size == (128, 128)
    table = (out / "table.md").read_text()
    assert "| Model |" in table and "Raw CT (baseline)" in table and "SSIM ↑" in table


def test_metric_values_are_in_range(report):
    rows = report["rows"]
    assert rows
    for r in rows:
        assert -1.0 <= float(r["ssim"]) <= 1.0
        assert float(r["psnr"]) > 0
        assert float(r["frc_px"]) >= 2.0
        assert r["lpips"] == ""


def test_patches_below_half_mask_coverage_are_excluded(report, run):
    pairs = read_manifest(run["manifest"])
    for pair in pairs:
        mask = np.asarray(Image.open(pair.mask)) > 0
        coverage = mask_coverage(mask, patch_grid(mask.shape, PATCH))
        kept = [r for r in report["rows"] if r["pair"] == pair.id
                and (r["method"], r["reference"]) == ("model", "histology")]
        assert len(kept) == int((coverage >= 0.5).sum())
        assert all(float(r["coverage"]) >= 0.5 for r in kept)
    assert any((coverage < 0.5).any() for coverage in [  # the case is really exercised
        mask_coverage(np.asarray(Image.open(p.mask)) > 0, patch_grid((128, 128), PATCH))
        for p in pairs])


def test_exactly_half_coverage_is_kept_and_just_below_is_not():
    rng = np.random.default_rng(0)
    img = {"model": rng.integers(0, 256, (32, 64, 3), dtype=np.uint8),
           "histology": rng.integers(0, 256, (32, 64, 3), dtype=np.uint8),
           "raw_ct": rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)}
    mask = np.zeros((32, 64), bool)
    mask[:16, :32] = True                  # left patch: 512/1024 = 50 %
    mask[:15, 32:64] = True                # right patch: 480/1024 < 50 %
    mask[15, 32:33] = True                 # 481/1024
    background = ~mask
    scores = score_images(img, mask, background, patch=32)
    assert set(scores) == {("model", "histology"), ("raw_ct", "histology")}
    kept = scores[("model", "histology")]
    assert [(s.row, s.col, s.coverage) for s in kept] == [(0, 0, 0.5)]


def test_raw_ct_baseline_rows_are_present(report):
    summary = report["summary"]
    baseline = [r for r in report["rows"] if r["method"] == "raw_ct"]
    model = [r for r in report["rows"] if r["method"] == "model"
             and r["reference"] == "histology"]
    assert baseline and len(baseline) == len(model)
    assert {r["reference"] for r in baseline} == {"histology"}
    train = summary["splits"]["train"]
    assert train["raw_ct_vs_histology"]["patches"] == train["model_vs_histology"]["patches"]


def test_truth_scores_are_present_for_phantoms(report):
    summary = report["summary"]["splits"]["train"]
    assert summary["model_vs_truth"]["patches"] > 0
    ceiling = summary["histology_vs_truth"]
    # the real histology, normalised like the truth, is far closer to it than the raw CT
    assert ceiling["psnr"] > summary["raw_ct_vs_histology"]["psnr"] + 5
    assert ceiling["ssim"] > summary["raw_ct_vs_histology"]["ssim"]


def test_splits_come_from_the_runs_split_json(report, run):
    split = json.loads((run["run"] / "split.json").read_text())
    by_pair = {p["id"]: p["split"] for p in report["summary"]["pairs"]}
    assert by_pair == {**{i: "train" for i in split["train_ids"]},
                       **{i: "test" for i in split["test_ids"]}}
    assert set(report["summary"]["splits"]) == {"train", "test"}
    assert all(p["seam_index"] > 0 for p in report["summary"]["pairs"])
    assert read_splits(run["run"] / "folds.json") == read_splits(run["run"])


def test_missing_lpips_weights_record_the_skip_message(report):
    message = report["summary"]["lpips_skipped"]
    assert message.startswith("LPIPS skipped")
    assert report["report"].lpips_message == message
    assert message in (report["out"] / "table.md").read_text()
    assert report["summary"]["splits"]["train"]["model_vs_histology"]["lpips"] is None


def test_lpips_is_scored_when_weights_load(run, tmp_path):
    torch.manual_seed(0)
    model = LPIPS()
    for lin in model.lins:
        lin.weight.data.abs_()
    torch.save(model.state_dict(), tmp_path / "lpips.pt")
    printed: list[str] = []
    rep = evaluate_manifest(run["manifest"], run["ckpt"], tmp_path / "ev", ids=["pair_002"],
                            tiling=TILING, patch=PATCH, lpips_path=tmp_path / "lpips.pt",
                            log=printed.append)
    assert printed == [] and rep.lpips_message is None
    assert set(rep.summary["splits"]) == {"all"}
    assert all(r.score.lpips is not None and r.score.lpips >= 0 for r in rep.rows)


def test_existing_out_dir_is_refused_and_left_unchanged(report, run):
    out = report["out"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="exists"):
        evaluate_manifest(run["manifest"], run["ckpt"], out, tiling=TILING, patch=PATCH)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_unknown_pair_ids_are_a_usage_error(run, tmp_path):
    with pytest.raises(UsageError, match="nope"):
        evaluate_manifest(run["manifest"], run["ckpt"], tmp_path / "ev", ids=["nope"])
    assert not (tmp_path / "ev").exists()
