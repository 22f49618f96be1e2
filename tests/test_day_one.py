"""Issue 24, a new user's first week on a cluster: the device a command runs on, refusing
before writing, interrupts that save, no silent wrong answers, the small things.

Every test reproduces one scenario of the issue with real files (and real subprocesses
where the scenario is a command line); all run on any CPU (CUDA hidden where it matters).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcstain.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def run_sub(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`hpcstain ARGS` as a real subprocess (where the environment must differ: no CUDA)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            **(env or {})}
    return subprocess.run([sys.executable, "-m", "hpcstain.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=full)


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """`hpcstain ARGS` in this process (the same `main`, its stdout/stderr captured, run
    from ``cwd``): a subprocess per call would mostly measure importing torch. ``env`` is
    for run_sub's signature only (CUDA cannot be hidden in-process; nothing here needs it)."""
    import contextlib
    import io

    from hpcstain.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help, usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # this machine has no CUDA device, GPU node or not


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 12 × 24 × 24 phantom volume and an untrained micro generator checkpoint."""
    from micro import untrained_generator_checkpoint

    from hpcstain.phantom import write_volume_file

    root = tmp_path_factory.mktemp("tiny")
    vol = write_volume_file(root / "ct.zarr", (12, 24, 24), "mg", 1, chunk=12)
    ckpt = untrained_generator_checkpoint(root / "gen.pt")
    return {"root": root, "volume": Path(vol), "checkpoint": ckpt}


# --------------------------------------------------------------------------- 1. device


@pytest.mark.parametrize("argv", [
    ["stain", "v.zarr", "--checkpoint", "c.pt", "--out", "o"],
    ["predict", "s.tif", "--checkpoint", "c.pt", "--out", "o.png"],
    ["evaluate", "m.csv", "--checkpoint", "c.pt", "--out", "o"],
    ["submit", "stain", "v.zarr", "--checkpoint", "c.pt", "--out", "o"],
])
def test_device_auto_is_the_default_of_every_inference_verb(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.device == "auto"


def test_device_auto_resolves_to_cuda_when_present_else_cpu() -> None:
    import torch

    from hpcstain.device import resolve_device

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


def test_absent_cuda_is_one_line_exit_2_and_no_run_directory(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "st-cuda"
    res = run_sub("stain", str(tiny["volume"]), "--checkpoint", str(tiny["checkpoint"]),
                  "--out", str(out), "--device", "cuda", "--no-progress", env=NO_CUDA)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "Traceback" not in res.stderr
    assert not out.exists()


def test_absent_cuda_in_predict_and_train_writes_nothing(tiny: dict[str, Path],
                                                         tmp_path: Path) -> None:
    from hpcstain.phantom import write_pairs

    manifest = write_pairs(tmp_path / "pairs", 2, 0, size=(48, 48))
    slide = next((tmp_path / "pairs" / "ct").glob("*.tif"))
    res = run_sub("predict", str(slide), "--checkpoint", str(tiny["checkpoint"]),
                  "--out", str(tmp_path / "p.png"), "--device", "cuda:0", env=NO_CUDA)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "p.png").exists()
    res = run_sub("train", "-c", "modcyclegan-tiny", "--out", str(tmp_path / "run"),
                  f"data.manifest={manifest}", "train.device=cuda", env=NO_CUDA)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--device cuda" in res.stderr or "cuda" in res.stderr
    assert not (tmp_path / "run").exists()
    res = run_sub("train", "-c", "modcyclegan-tiny", "--out", str(tmp_path / "run"),
                  f"data.manifest={manifest}", "--device", "cuda", env=NO_CUDA)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "run").exists()


def test_train_and_distill_default_to_auto_and_take_device() -> None:
    from hpcstain.config import load_config

    assert load_config("modcyclegan-tiny").train.device == "auto"
    assert load_config("student-fast").train.device == "auto"
    args = build_parser().parse_args(["distill", "--out", "o", "--device", "cpu"])
    from hpcstain.cli import _device_override

    assert _device_override(args) == ["train.device=cpu"]


def test_predict_prints_one_start_line_with_device_dtype_threads(tiny: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    from hpcstain.phantom import write_pairs

    write_pairs(tmp_path / "pairs", 1, 0, size=(48, 48))
    slide = next((tmp_path / "pairs" / "ct").glob("*.tif"))
    res = run_sub("predict", str(slide), "--checkpoint", str(tiny["checkpoint"]),
                  "--out", str(tmp_path / "p.png"), "--bone-level", "30000",
                  "--background-level", "10000", env=NO_CUDA)
    assert res.returncode == 0, res.stderr
    start = [ln for ln in res.stdout.splitlines() if ln.startswith("device:")]
    assert start == ["device: cpu, float32, 1 CPU threads"]  # stderr: errors only
    assert "device:" not in res.stderr


def test_gpu_profile_stains_one_task_per_gpu_cpu_profile_one_task() -> None:
    from hpcstain.launch.profiles import load_cluster, slurm_parameters
    from hpcstain.launch.submit import stain_cluster

    gpu = slurm_parameters(stain_cluster(load_cluster("maxwell")))
    assert gpu["gpus_per_node"] == 4 and gpu["tasks_per_node"] == 4
    cpu = slurm_parameters(stain_cluster(load_cluster("slurm")))
    assert "gpus_per_node" not in cpu and cpu["tasks_per_node"] == 1


def test_stain_task_of_a_multi_gpu_job_splits_its_group_per_task(
        tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Array task 0 of 1 run as task 1 of 2 in its job (2 GPUs → 2 tasks) stains every
    other unit; task 0 of the job the rest: together the whole run, no unit twice."""
    from hpcstain.launch.submit import StainJob
    from hpcstain.volume import init_run, load_plan, make_plan, open_volume, pending_units

    src = open_volume(str(tiny["volume"]))
    run = init_run(tmp_path / "st", make_plan(src, chunk=12, axes="z,y", levels=(1.0, 0.0),
                                              checkpoint=str(tiny["checkpoint"])))
    plan = load_plan(run)
    assert plan.n_units == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    StainJob(str(run), 1)(0)
    assert sorted(pending_units(run, plan)) == [0, 2]
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    StainJob(str(run), 1)(0)
    assert pending_units(run, plan) == []


# ---------------------------------------------------------------- 3. refuse before writing


MICRO_ARGS = ["data.patch_size=32", "data.patches_per_pair=4", "data.batch_size=2",
              "data.n_folds=0", "data.n_test=1", "model.ngf=4", "model.ndf=4",
              "model.n_blocks=1", "train.checkpoint_every=0", "train.max_steps=1",
              "data.num_workers=0"]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.fixture()
def micro_run(tmp_path: Path) -> Path:
    """A one-step micro run started from tmp_path with a *relative* manifest path."""
    from hpcstain.phantom import write_pairs

    write_pairs(tmp_path / "pairs", 4, 2, size=(64, 64))
    res = run_cli("train", "-c", "modcyclegan-tiny", "--out", "run", "--no-progress",
                  "data.manifest=pairs/manifest.csv", *MICRO_ARGS, cwd=tmp_path, env=NO_CUDA)
    assert res.returncode == 0, res.stderr
    return tmp_path / "run"


@pytest.mark.parametrize("override, key", [
    ("model.ngf=16", "model.ngf"),
    ("data.patch_size=48", "data.patch_size"),
    ("data.n_test=2", "data.n_test"),
    ("loss.lambda_px=1", "loss.lambda_px"),
])
def test_a_refused_resume_touches_no_file_of_the_run(micro_run: Path, override: str,
                                                     key: str) -> None:
    before = _snapshot(micro_run)
    res = run_cli("train", "--out", str(micro_run), "--no-progress", override, env=NO_CUDA)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and key in res.stderr
    assert "Traceback" not in res.stderr
    assert _snapshot(micro_run) == before
    again = run_cli("train", "--out", str(micro_run), "--no-progress", "train.max_steps=2",
                    env=NO_CUDA)
    assert again.returncode == 0, again.stderr
    assert "step 2" in again.stdout


def test_resume_with_another_manifest_is_refused_and_split_kept(micro_run: Path,
                                                               tmp_path: Path) -> None:
    from hpcstain.phantom import write_pairs

    other = write_pairs(tmp_path / "other", 4, 9, size=(64, 64))
    split = (micro_run / "split.json").read_bytes()
    res = run_cli("train", "--out", str(micro_run), f"data.manifest={other}", env=NO_CUDA)
    assert res.returncode == 2 and "data.manifest" in res.stderr, res.stderr
    assert (micro_run / "split.json").read_bytes() == split


def test_a_manifest_edited_in_place_is_refused_and_split_kept(micro_run: Path,
                                                             tmp_path: Path) -> None:
    manifest = tmp_path / "pairs" / "manifest.csv"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))  # one pair fewer
    before = _snapshot(micro_run)
    res = run_cli("train", "--out", str(micro_run), "train.max_steps=2", env=NO_CUDA)
    assert res.returncode == 2 and "pairs changed" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert _snapshot(micro_run) == before  # split.json and config.yaml included


def test_resume_from_another_directory_with_the_manifest_spelled_otherwise(
        micro_run: Path, tmp_path: Path) -> None:
    """Started as `pairs/manifest.csv` from tmp_path; resumed from / with the absolute
    path and the same profile: the same file, so the same run."""
    manifest = (tmp_path / "pairs" / "manifest.csv").resolve()
    res = run_cli("train", "-c", "modcyclegan-tiny", "--out", str(micro_run.resolve()),
                  "--no-progress", f"data.manifest={manifest}", *MICRO_ARGS[:-2],
                  "train.max_steps=2", cwd=Path("/"), env=NO_CUDA)
    assert res.returncode == 0, res.stderr
    assert "step 2" in res.stdout


# --------------------------------------------------------------------------- 4. interrupts save


def test_first_ctrl_c_stops_like_sigterm_second_exits_at_once() -> None:
    import signal

    from hpcstain.train.trainer import StopFlag

    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()


def test_ctrl_c_in_train_writes_latest_and_status_says_stopped(tmp_path: Path) -> None:
    import json
    import signal
    import time

    from hpcstain.checkpoint import load_checkpoint
    from hpcstain.phantom import write_pairs
    from hpcstain.train.logs import read_losses

    manifest = write_pairs(tmp_path / "pairs", 4, 2, size=(64, 64))
    run = tmp_path / "run"
    args = [a for a in MICRO_ARGS if not a.startswith("train.max_steps")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcstain.cli", "train", "-c", "modcyclegan-tiny", "--out",
         str(run), "--no-progress", f"data.manifest={manifest}", *args, "train.epochs=500",
         "data.num_workers=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **NO_CUDA, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 300  # a busy 2-core machine starts torch slowly
        while time.time() < deadline:
            if (run / "losses.jsonl").exists() and len(read_losses(run)) >= 2:
                break
            time.sleep(0.2)
        live = run_cli("status", str(run), "--json")
        assert proc.poll() is None, proc.communicate()
        assert json.loads(live.stdout)["state"] == "in progress", live.stdout
        assert live.returncode == 3
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "run the same command again to resume" in err
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["reason"] == f"signal {int(signal.SIGINT)}"
    assert ckpt["step"] == len(read_losses(run)) >= 2
    res = run_cli("status", str(run))
    assert res.returncode == 1, res.stdout
    assert "state: stopped: no process is working on it" in res.stdout


# ------------------------------------------------------------ 5. no silent wrong answers


def _slices(folder: Path, names: list[str]) -> None:
    import numpy as np
    import tifffile

    folder.mkdir()
    for name in names:  # each slice holds the number in its name (the first one)
        number = int("".join(c for c in name.split(".")[0] if c.isdigit()) or 0)
        tifffile.imwrite(folder / name, np.full((4, 5), number, np.uint16))


def test_slice_folder_is_read_in_natural_order(tmp_path: Path) -> None:
    from hpcstain.volume import open_volume

    _slices(tmp_path / "s", [f"slice_{i}.tif" for i in range(1, 13)])
    vol = open_volume(str(tmp_path / "s"))
    plane_values = vol.read((slice(0, 12), slice(0, 1), slice(0, 1))).ravel().tolist()
    assert plane_values == list(range(1, 13))  # name order would read 1, 10, 11, 12, 2, …


@pytest.mark.parametrize("names, message", [
    (["slice_1.tif", "slice_2.tif", "preview.tif"], "2 patterns"),
    (["s01.tif", "s1.tif", "s2.tif"], "same slice number"),
])
def test_an_ambiguous_slice_folder_is_refused(tmp_path: Path, names: list[str],
                                              message: str) -> None:
    _slices(tmp_path / "s", names)
    res = run_cli("levels", str(tmp_path / "s"))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_hdf5_without_the_dataset_shows_the_file_colon_path_syntax(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    with h5py.File(tmp_path / "scan.h5", "w") as fh:
        fh.create_dataset("exchange/data", data=np.zeros((4, 8, 8), np.uint16))
    res = run_cli("levels", str(tmp_path / "scan.h5"))
    assert res.returncode == 2
    assert f"{tmp_path / 'scan.h5'}:/exchange/data" in res.stderr, res.stderr


def test_evaluate_refuses_a_split_that_calls_training_pairs_test(micro_run: Path,
                                                                tmp_path: Path) -> None:
    import json

    trained = json.loads((micro_run / "split.json").read_text())
    assert trained["train_ids"] and trained["test_ids"]
    other = tmp_path / "other-split.json"  # another run's split: everything is "test"
    other.write_text(json.dumps({"train_ids": [], "val_ids": [],
                                 "test_ids": trained["train_ids"] + trained["test_ids"]}))
    manifest = tmp_path / "pairs" / "manifest.csv"
    ckpt = micro_run / "checkpoints" / "latest.pt"
    res = run_cli("evaluate", str(manifest), "--checkpoint", str(ckpt), "--out",
                  str(tmp_path / "ev"), "--split", str(other), "--patch", "32", env=NO_CUDA)
    assert res.returncode == 2 and "trained on" in res.stderr, res.stderr
    assert trained["train_ids"][0] in res.stderr and not (tmp_path / "ev").exists()
    ok = run_cli("evaluate", str(manifest), "--checkpoint", str(ckpt), "--out",
                 str(tmp_path / "ev"), "--split", str(micro_run), "--patch", "32",
                 "--min-coverage", "0", env=NO_CUDA)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["splits"]) == {"train", "test"}


def test_evaluate_with_no_usable_patch_exits_2_with_the_reason(micro_run: Path,
                                                              tmp_path: Path) -> None:
    manifest = tmp_path / "pairs" / "manifest.csv"
    res = run_cli("evaluate", str(manifest), "--checkpoint",
                  str(micro_run / "checkpoints" / "latest.pt"), "--out", str(tmp_path / "ev"),
                  "--patch", "128", env=NO_CUDA)
    assert res.returncode == 2, res.stderr
    assert "no usable patch" in res.stderr and "--patch" in res.stderr
    assert "smaller than one 128² patch" in res.stderr
    assert not (tmp_path / "ev").exists()


def test_a_cupping_fit_that_did_not_converge_says_so_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One iteration cannot reach the fixed point of a strongly cupped phantom: the fit
    reports "not converged" with what remained, and `cupping --out` exits 2 unwritten."""
    import functools

    import hpcstain.ct.cupping as cupping
    from hpcstain.cli import main
    from hpcstain.phantom import make_volume, write_volume_file

    vol = make_volume((16, 96, 96), "ti", 4, cupping=0.15)
    fit = cupping.fit_cupping(vol.ct, iterations=1)
    assert fit.info["converged"] is False and fit.info["status"] == "not converged"
    assert fit.info["residual"] > 2.0
    assert "did not converge" in cupping.volume_fit_line(fit)
    assert cupping.fit_cupping(vol.ct).info["status"] == "fitted"

    path = write_volume_file(tmp_path / "ct.zarr", (16, 96, 96), "ti", 4, cupping=0.15)
    monkeypatch.setattr(cupping, "fit_cupping",
                        functools.partial(cupping.fit_cupping, iterations=1))
    code = main(["cupping", str(path), "--out", str(tmp_path / "fixed.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and "did not converge" in err and "grey values" in err
    assert not (tmp_path / "fixed.zarr").exists()


# ------------------------------------------------------------------ 2. runs are places


@pytest.fixture()
def stained(tiny: dict[str, Path], tmp_path: Path) -> Path:
    """A run stained from tmp_path with relative spellings of input, checkpoint and out."""
    import shutil

    shutil.copytree(tiny["volume"], tmp_path / "ct.zarr")
    shutil.copy(tiny["checkpoint"], tmp_path / "gen.pt")
    res = run_cli("stain", "ct.zarr", "--checkpoint", "gen.pt", "--out", "st", "--axes",
                  "z,y", "--chunk", "12", "--bone-level", "30000", "--background-level",
                  "10000", "--no-progress", cwd=tmp_path, env=NO_CUDA)
    assert res.returncode == 0, res.stderr
    return tmp_path / "st"


def test_a_stained_run_fuses_and_resumes_from_any_directory(stained: Path,
                                                            tmp_path: Path) -> None:
    import json

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run_cli("fuse", str(stained), "--no-progress", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert run_cli("status", str(stained), "--require-fused", cwd=elsewhere).returncode == 0
    # the same plan spelled absolutely, from another directory: the same run, resumed
    again = run_cli("stain", str(tmp_path / "ct.zarr"), "--checkpoint",
                    str(tmp_path / "gen.pt"), "--out", str(stained), "--axes", "z,y",
                    "--chunk", "12", "--bone-level", "30000", "--background-level", "10000",
                    "--no-progress", cwd=elsewhere, env=NO_CUDA)
    assert again.returncode == 0, again.stderr
    assert "different" not in again.stderr
    plan = json.loads((stained / "plan.json").read_text())
    assert Path(plan["input"]).is_absolute() and Path(plan["checkpoint"]).is_absolute()


def test_fuse_overwrite_never_replaces_a_good_image_when_the_input_is_gone(
        stained: Path, tmp_path: Path) -> None:
    import shutil

    import numpy as np
    import zarr

    assert run_cli("fuse", str(stained), "--no-progress").returncode == 0
    image = stained / "fused.ome.zarr"
    before = np.asarray(zarr.open_group(str(image), mode="r")["0"][:])
    assert before.any()
    shutil.move(tmp_path / "ct.zarr", tmp_path / "moved.zarr")
    res = run_cli("fuse", str(stained), "--overwrite", "--no-progress")
    assert res.returncode == 2 and "ct.zarr" in res.stderr, res.stderr
    after = np.asarray(zarr.open_group(str(image), mode="r")["0"][:])
    np.testing.assert_array_equal(after, before)
    assert run_cli("status", str(stained), "--require-fused").returncode == 0


def test_fuse_out_must_be_an_image_name_not_a_path(stained: Path) -> None:
    res = run_cli("fuse", str(stained), "--out", "sub/dir/x", "--no-progress")
    assert res.returncode == 2 and "not a path" in res.stderr, res.stderr
    assert not (stained / "sub").exists() and not (stained / "done" / "sub").exists()
    ok = run_cli("fuse", str(stained), "--out", "other", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert (stained / "other.ome.zarr").is_dir()
    status = run_cli("status", str(stained))
    line = next(ln for ln in status.stdout.splitlines() if "other.ome.zarr" in ln)
    assert "4/4 chunks fused" in line and status.returncode == 0, status.stdout


# ------------------------------------------------------------------ 7. the smaller things


def test_submit_usage_lists_distill_and_every_option_has_help() -> None:
    res = run_cli("submit", "--help")
    assert "{train,distill,cv,stain,fuse}" in res.stdout
    for verb in (["stain"], ["predict"], ["evaluate"], ["fuse"], ["demo"]):
        out = run_cli(*verb, "--help").stdout
        for flag in ("--device", "--overwrite", "--quick"):
            if flag in out:
                line = out[out.index(flag):].split("\n  -")[0]
                assert len(line.split()) > 2, (verb, flag, line)  # a help text follows
    demo = run_cli("demo", "--help").stdout
    assert "phantom" in demo and "orthoview" in demo


def test_info_detects_slurm_from_sbatch_on_path(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (fake / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{fake}:{env.get('PATH', '')}"
    res = subprocess.run([sys.executable, "-m", "hpcstain.cli", "info"], capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": str(REPO)})
    slurm = [ln for ln in res.stdout.splitlines() if ln.startswith("slurm:")]
    assert slurm and "not detected" not in slurm[0] and str(fake / "sbatch") in slurm[0]


def test_info_piped_into_head_has_no_traceback() -> None:
    res = subprocess.run(f"{sys.executable} -m hpcstain.cli info | head -1", shell=True,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.stdout.startswith("hpcstain ") and len(res.stdout.splitlines()) == 1
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr


def test_interrupted_message_says_rerunning_resumes(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import hpcstain.cli as cli

    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert cli.main(["info"]) == 130
    assert "re-running the same command resumes" in capsys.readouterr().err


# ------------------------------------------------------------------ 6. see your own run


def test_view_writes_labelled_orthoviews_of_a_stained_then_fused_run(stained: Path,
                                                                    tmp_path: Path) -> None:
    from PIL import Image

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run_cli("view", str(stained), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    assert "axis-z.zarr (stained along z, not fused)" in res.stdout
    views = {p.name: Image.open(p) for p in sorted((stained / "view").glob("*.png"))}
    assert set(views) == {"view-xy.png", "view-xz.png", "view-yz.png"}
    # CT | stain side by side, at physical aspect: XZ of a 12 × 24 × 24 volume is 1:2
    xz = views["view-xz.png"]
    panel_w = (xz.width - 6) / 2
    assert abs((xz.height - 26) / panel_w - 0.5) < 0.02
    xy = views["view-xy.png"]
    assert abs((xy.height - 26) / ((xy.width - 6) / 2) - 1.0) < 0.02
    assert run_cli("fuse", str(stained), "--no-progress").returncode == 0
    again = run_cli("view", str(stained / "fused.ome.zarr"), "--at", "3,4,5")
    assert again.returncode == 0 and "fused.ome.zarr (fused) at z = 3, y = 4, x = 5" in \
        again.stdout, again.stderr
    bad = run_cli("view", str(stained), "--at", "99,0,0")
    assert bad.returncode == 2 and "outside the volume" in bad.stderr


def test_view_of_a_training_run_says_what_to_do(micro_run: Path) -> None:
    res = run_cli("view", str(micro_run))
    assert res.returncode == 2 and "training run" in res.stderr and "stain" in res.stderr


def test_a_run_moved_with_its_input_still_fuses_scores_and_views(stained: Path,
                                                                tmp_path: Path) -> None:
    """The run and its input moved together (another mount point): the absolute input
    path is gone, the path relative to the run directory finds it."""
    import shutil

    moved = tmp_path / "mnt" / "project"
    moved.mkdir(parents=True)
    shutil.move(tmp_path / "ct.zarr", moved / "ct.zarr")
    shutil.move(stained, moved / "st")
    run = moved / "st"
    for argv in (["fuse", str(run), "--no-progress"], ["view", str(run)],
                 ["score", str(run), "--out", str(moved / "score")],
                 ["status", str(run), "--require-fused"]):
        res = run_cli(*argv, cwd=moved)
        assert res.returncode == 0, (argv, res.stderr)
    assert (moved / "score" / "summary.json").is_file()


def test_a_training_run_moved_with_its_pairs_resumes_with_the_new_manifest(
        micro_run: Path, tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "mnt"
    moved.mkdir()
    shutil.move(tmp_path / "pairs", moved / "pairs")
    shutil.move(micro_run, moved / "run")
    before = _snapshot(moved / "run")
    res = run_cli("train", "--out", "run", "train.max_steps=2", "--no-progress", cwd=moved,
                  env=NO_CUDA)
    assert res.returncode == 2 and "data.manifest=PATH" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert _snapshot(moved / "run") == before
    ok = run_cli("train", "--out", "run", "data.manifest=pairs/manifest.csv",
                 "train.max_steps=2", "--no-progress", cwd=moved, env=NO_CUDA)
    assert ok.returncode == 0, ok.stderr
    assert "step 2" in ok.stdout


def test_a_refused_new_run_leaves_nothing_so_the_corrected_command_starts(
        tmp_path: Path) -> None:
    """A new run that fails reading its data used to leave config.yaml behind, and the
    corrected command was then refused as a resume that changes data.manifest."""
    from hpcstain.phantom import write_pairs

    manifest = write_pairs(tmp_path / "pairs", 4, 2, size=(64, 64))
    res = run_cli("train", "-c", "modcyclegan-tiny", "--out", "run", *MICRO_ARGS,
                  cwd=tmp_path, env=NO_CUDA)
    assert res.returncode == 2 and "data.manifest" in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made: kept, only the run's files go
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = run_cli("train", "-c", "modcyclegan-tiny", "--out", "mine", *MICRO_ARGS,
                  cwd=tmp_path, env=NO_CUDA)
    assert res.returncode == 2
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    ok = run_cli("train", "-c", "modcyclegan-tiny", "--out", "run", "--no-progress",
                 f"data.manifest={manifest}", *MICRO_ARGS, cwd=tmp_path, env=NO_CUDA)
    assert ok.returncode == 0, ok.stderr


def test_fuse_overwrite_that_fails_midway_restores_the_previous_image(stained: Path) -> None:
    """A damaged stained chunk is found only while fusing: the pass fails, and the image
    it was to replace comes back with its records (status still complete)."""
    import numpy as np
    import zarr

    assert run_cli("fuse", str(stained), "--no-progress").returncode == 0
    image = stained / "fused.ome.zarr"
    before = np.asarray(zarr.open_group(str(image), mode="r")["0"][:])
    chunk = next(p for p in sorted((stained / "axis-z.zarr").rglob("*"))
                 if p.is_file() and "c" in p.relative_to(stained / "axis-z.zarr").parts)
    chunk.write_bytes(b"\x00garbled" * 25)
    res = run_cli("fuse", str(stained), "--overwrite", "--no-progress")
    assert res.returncode == 2 and "damaged" in res.stderr, res.stderr
    after = np.asarray(zarr.open_group(str(image), mode="r")["0"][:])
    np.testing.assert_array_equal(after, before)
    assert run_cli("status", str(stained), "--require-fused").returncode == 0
    assert not list(stained.glob(".*previous")) and not list((stained / "done").glob(".*"))


def test_cross_validation_runs_record_the_manifest_absolute(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """`submit cv` from a project folder with a relative manifest: every fold's config
    names the manifest absolutely, so the jobs (other cwd) and later resumes find it."""
    from hpcstain.launch.submit import cv_runs
    from hpcstain.phantom import write_pairs

    write_pairs(tmp_path / "pairs", 6, 1, size=(48, 48))
    monkeypatch.chdir(tmp_path)
    runs = cv_runs(["modcyclegan-tiny"], 2, Path("cv"), ["data.manifest=pairs/manifest.csv",
                                                         "data.n_test=1"])
    assert [cfg.data.manifest for cfg, _ in runs] == \
        [str((tmp_path / "pairs" / "manifest.csv").resolve())] * 2
