"""The `hpcstain` command surface: help lists the verbs, info reports, errors exit cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpcstain.cli import main
from hpcstain.info import launch_context


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcstain.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_the_implemented_verbs() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in ("info", "phantom", "train", "demo"):
        assert verb in out.stdout


def test_info_reports_libraries_and_devices_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["libraries"]["torch"].startswith("2.")
    assert report["libraries"]["zarr"].startswith("3.")
    assert set(report["launch"]) == {"slurm", "mpi", "torchrun"}
    assert isinstance(report["devices"]["cuda_available"], bool)


def test_launch_context_detects_slurm_and_mpi() -> None:
    ctx = launch_context({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "4",
                          "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert ctx["slurm"] == {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "4"}
    assert ctx["mpi"]["OMPI_COMM_WORLD_SIZE"] == "2"
    assert ctx["torchrun"] is None
    assert launch_context({}) == {"slurm": None, "mpi": None, "torchrun": None}


def test_config_error_is_one_line_and_exit_2(tmp_path) -> None:
    out = run_cli("train", "--config", "modcyclegan-tiny", "--out", str(tmp_path / "run"),
                  "train.lrr=1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        out.stderr.strip().splitlines()[0]]
    assert "unknown key 'train.lrr'" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_verb_exits_2() -> None:
    assert run_cli("frobnicate").returncode == 2


@pytest.mark.parametrize("args, message", [
    (["--shape", "0", "16", "16"], "shape"),
    (["--shape", "-4", "16", "16"], "shape"),
    (["--material", "steel"], "steel"),
])
def test_phantom_bad_arguments_exit_2_without_writing(tmp_path, args, message) -> None:
    out = tmp_path / "vol.zarr"
    res = run_cli("phantom", "volume", str(out), *(["--shape", "8", "16", "16"]
                                                  if "--shape" not in args else []), *args)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_phantom_existing_output_needs_overwrite(tmp_path) -> None:
    out = tmp_path / "vol.h5"
    assert run_cli("phantom", "volume", str(out), "--shape", "8", "16", "16").returncode == 0
    before = out.read_bytes()
    res = run_cli("phantom", "volume", str(out), "--shape", "8", "16", "16", "--seed", "5")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert out.read_bytes() == before
    assert run_cli("phantom", "volume", str(out), "--shape", "8", "16", "16", "--seed", "5",
                   "--overwrite").returncode == 0
    assert out.read_bytes() != before
