"""Smoke run of benchmarks/paper_study.py: the Table-1-style table and the 3D study appear
with sane values (the full run is documented in docs/results.md, not part of CI)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_study.py"


def load_study():
    spec = importlib.util.spec_from_file_location("paper_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_smoke_study_writes_table_and_3d_study(tmp_path: Path) -> None:
    study = load_study()
    results = study.run_study(tmp_path, smoke=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best"] in study.VARIANTS
    table = (tmp_path / "table.md").read_text()
    assert "Mod. CycleGAN" in table and "Pix2Pix" in table and "Raw CT (baseline)" in table
    for run in results["variants"]:
        test = run["splits"]["test"]["model_vs_histology"]
        assert -1.0 <= test["ssim"] <= 1.0 and test["psnr"] > 0
    rows = results["volume"]["rows"]
    assert [(r["axes"], r["method"]) for r in rows] == [
        (a, m) for a, m in study.FUSIONS]
    for r in rows:
        assert r["psnr"] > 0 and math.isfinite(r["stripe_z"]) and -1 <= r["ssim_xz"] <= 1
    assert (tmp_path / "orthoview-z-single.png").is_file()
    assert (tmp_path / "orthoview-zyx-consistency.png").is_file()
