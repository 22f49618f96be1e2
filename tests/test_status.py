"""`hpcstain status`: staining runs (done, missing, running, stale, failed units; fused
chunks; throughput/ETA; exit codes) and training runs (epoch, step, losses, requeues)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from micro import micro_config

from hpcstain.cli import main
from hpcstain.errors import InputError
from hpcstain.executors import run_local
from hpcstain.status import (
    EXIT_COMPLETE,
    EXIT_FAILED,
    EXIT_IN_PROGRESS,
    collect_status,
    format_status,
    run_kind,
    throughput,
    watch,
)
from hpcstain.volume import fuse_run
from hpcstain.volume.io import open_volume
from hpcstain.volume.plan import load_plan, make_plan
from hpcstain.volume.rundir import FAILED, PYRAMID_PENDING, RUNNING, marker_path, read_markers
from hpcstain.volume.stain import init_run, stain_unit

SHAPE = (20, 26, 30)
CHUNK = (10, 13, 15)      # 2 slabs per axis


class Stain:
    """A cheap deterministic stand-in for a generator (3 channels in, 3 out, [-1, 1])."""

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.tanh(batch * 0.8 - 0.1)


class Exploding:
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory (simulated)")


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    vol = np.clip(rng.normal(20000, 6000, SHAPE), 0, 65535).astype(np.uint16)
    path = tmp_path_factory.mktemp("input") / "ct.zarr"
    zarr.create_array(str(path), data=vol, chunks=(8, 8, 8))
    return path


def new_run(where: Path, volume_path: Path, axes: str = "z,y") -> Path:
    plan = make_plan(open_volume(volume_path), chunk=CHUNK, axes=axes, tile=16, step=8,
                     window="mean", sigma=0.0, levels=(30000.0, 9000.0))
    return init_run(where, plan)


def unit_index(run: Path, axis: str, name: str) -> int:
    plan = load_plan(run)
    return next(i for i, u in enumerate(plan.units) if u.axis == axis and u.name == name)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def put_marker(run: Path, task: str, name: str, **info: object) -> None:
    path = marker_path(run, RUNNING, task, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unit": name, "time": time.time(), **info}))


def test_done_missing_stale_failed_and_running_units_then_complete(tmp_path: Path,
                                                                   volume_path: Path) -> None:
    run = new_run(tmp_path / "run", volume_path)
    z0, z1 = unit_index(run, "z", "s0000"), unit_index(run, "z", "s0001")
    y0 = unit_index(run, "y", "s0000")
    run_local(run, Stain(), units=[z0, z1], progress=False)
    with pytest.raises(RuntimeError, match="out of memory"):  # the engine records it
        stain_unit(run, y0, Exploding())
    assert not read_markers(run, RUNNING, "axis-y")  # cleared on the way out
    host = socket.gethostname()
    put_marker(run, "axis-y", "s0001", host=host, pid=dead_pid())
    report = collect_status(run, live_jobs=lambda: set())
    assert report["axes"]["z"] == {"done": 2, "total": 2, "running": 0, "stale": 0,
                                   "failed": 0}
    assert report["axes"]["y"] == {"done": 0, "total": 2, "running": 0, "stale": 1,
                                   "failed": 1}
    assert report["units"] == {"done": 2, "total": 4}
    assert report["failed"][0]["unit"] == "s0000"
    assert "RuntimeError: CUDA out of memory" in report["failed"][0]["error"]
    assert "is gone" in report["stale"][0]["why"]
    assert report["fused"] == []
    assert report["state"] == "failed" and report["exit_code"] == EXIT_FAILED
    text = format_status(report)
    assert "axis y:" in text and "0/2 units done (1 stale, 1 failed)" in text
    assert "stale: axis-y/s0001" in text and "failed: axis-y/s0000" in text
    assert "fused: not started" in text

    # A live SLURM job keeps its unit "running"; a job gone from squeue makes it stale.
    put_marker(run, "axis-y", "s0001", host="node17", pid=4242,
               slurm={"job_id": "9001", "array_job_id": "9000", "array_task_id": "1"})
    assert collect_status(run, live_jobs=lambda: {"9001"})["axes"]["y"]["running"] == 1
    gone = collect_status(run, live_jobs=lambda: {"1234"})
    assert gone["stale"][0]["why"] == "SLURM job 9000_1 is no longer queued or running"
    # Another host without SLURM cannot be checked: running (overdue when old).
    put_marker(run, "axis-y", "s0001", host="elsewhere", pid=1)
    assert collect_status(run)["axes"]["y"]["running"] == 1

    # Re-running finishes the run; the failure is superseded, the fuse completes it.
    run_local(run, Stain(), progress=False)
    assert not read_markers(run, FAILED, "axis-y")
    done = collect_status(run)
    assert done["units"] == {"done": 4, "total": 4}
    assert done["state"] == "complete" and done["exit_code"] == EXIT_COMPLETE
    assert done["stale"] == [] and done["failed"] == []  # the leftover marker is moot
    assert collect_status(run, require_fused=True)["exit_code"] == EXIT_IN_PROGRESS
    fuse_run(run)
    fused = collect_status(run, require_fused=True)
    assert fused["fused"] == [{"image": "fused.ome.zarr", "done": 2 * 2 * 2, "total": 8,
                               "pyramid_pending": False}]
    assert fused["exit_code"] == EXIT_COMPLETE
    # a fuse pass that died after its chunk records, before the pyramid: not complete
    (run / "done" / "fused" / PYRAMID_PENDING).touch()
    pending = collect_status(run, require_fused=True)
    assert pending["fused"][0]["pyramid_pending"] and pending["exit_code"] == EXIT_IN_PROGRESS
    assert "pyramid not built yet" in format_status(pending)


def test_a_retry_after_a_failure_is_running_not_failed(tmp_path: Path,
                                                       volume_path: Path) -> None:
    run = new_run(tmp_path / "run", volume_path, axes="z")
    failed = marker_path(run, FAILED, "axis-z", "s0000")
    failed.parent.mkdir(parents=True, exist_ok=True)
    failed.write_text(json.dumps({"unit": "s0000", "error": "RuntimeError: boom",
                                  "time": time.time() - 60}))
    assert collect_status(run)["exit_code"] == EXIT_FAILED
    put_marker(run, "axis-z", "s0000", host=socket.gethostname(), pid=os.getpid())
    retry = collect_status(run)
    assert retry["failed"] == [] and retry["axes"]["z"]["running"] == 1
    assert retry["exit_code"] == EXIT_IN_PROGRESS


def test_a_worker_clears_only_its_own_running_marker(tmp_path: Path) -> None:
    from hpcstain.volume.rundir import clear_running, mark_running

    put_marker(tmp_path, "axis-z", "s0000", host=socket.gethostname(), pid=dead_pid())
    clear_running(tmp_path, "axis-z", "s0000")  # a second worker took the unit since
    assert "s0000" in read_markers(tmp_path, RUNNING, "axis-z")
    mark_running(tmp_path, "axis-z", "s0000")
    clear_running(tmp_path, "axis-z", "s0000")
    assert not read_markers(tmp_path, RUNNING, "axis-z")


def test_worker_killed_mid_unit_leaves_a_stale_unit(tmp_path: Path, volume_path: Path) -> None:
    """A real SIGKILL in the middle of a unit: its marker stays, naming a dead process."""
    run = new_run(tmp_path / "run", volume_path, axes="z")
    script = textwrap.dedent(f"""
        import os, signal, torch
        from hpcstain.executors import run_local
        calls = [0]
        def fn(batch):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.tanh(batch)
        run_local({str(run)!r}, fn, batch_size=4, progress=False)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # a plain process
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                          env=env)
    assert proc.returncode == -9, proc.stderr.decode()
    report = collect_status(run)
    assert report["axes"]["z"]["stale"] == 1 and report["axes"]["z"]["done"] == 0
    assert report["stale"][0]["why"].startswith("process ")
    assert main(["status", str(run)]) == EXIT_FAILED


def test_throughput_and_eta_from_completion_records() -> None:
    """Two workers, each finishing a 1000-voxel unit every 10 s from t=0 to t=40."""
    records = [{"time": t, "seconds": 10.0, "voxels": 1000} for t in (10, 10, 20, 20, 30, 30,
                                                                       40, 40)]
    rate = throughput(records)
    assert rate is not None
    assert rate["voxels_per_s"] == pytest.approx(8000 / 40)
    assert rate["units_per_hour"] == pytest.approx(8 * 3600 / 40)
    assert rate["median_unit_s"] == 10.0
    assert throughput(records, window=2)["voxels_per_s"] == pytest.approx(2000 / 10)
    assert throughput([]) is None


def test_eta_while_workers_run(tmp_path: Path, volume_path: Path) -> None:
    run = new_run(tmp_path / "run", volume_path, axes="z")
    run_local(run, Stain(), units=[0], progress=False)
    put_marker(run, "axis-z", "s0001", host=socket.gethostname(), pid=os.getpid())
    report = collect_status(run)
    assert report["state"] == "in progress" and report["exit_code"] == EXIT_IN_PROGRESS
    rate = report["throughput"]
    remaining = report["voxel_axes"]["total"] - report["voxel_axes"]["done"]
    assert remaining == 10 * 26 * 30
    assert report["eta_s"] == pytest.approx(remaining / rate["voxels_per_s"])
    assert "ETA staining" in format_status(report)
    # watch prints one report per round and stops at max_rounds while in progress
    out = io.StringIO()
    assert watch(run, 0.01, out=out, max_rounds=2) == EXIT_IN_PROGRESS
    assert out.getvalue().count("state: in progress") == 2


def test_json_exit_codes_and_bad_directories(tmp_path: Path, volume_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = new_run(tmp_path / "run", volume_path, axes="x")
    assert main(["status", str(run), "--json"]) == EXIT_IN_PROGRESS
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "stain" and report["units"] == {"done": 0, "total": 2}
    run_local(run, Stain(), progress=False)
    assert main(["status", str(run), "--watch", "0.01"]) == EXIT_COMPLETE
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "neither a staining run" in err and err.count("\n") == 1
    with pytest.raises(InputError, match="no such directory"):
        run_kind(tmp_path / "nope")
    with pytest.raises(InputError, match="holds run directories: run"):
        run_kind(tmp_path)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpcstain.phantom import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "p", n=4, seed=5, size=(64, 64))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_run_status(pairs: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from micro import StopAfter

    from hpcstain.train.trainer import train

    cfg = micro_config(pairs, "train.epochs=2", "train.checkpoint_every=0")
    run = tmp_path / "run"
    first = train(cfg, run, stop=StopAfter(11), progress=False)
    assert first.status == "preempted" and first.step == 11
    (run / "slurm-logs").mkdir()
    (run / "slurm-logs" / "77_0_log.out").write_text(
        "submitit INFO - Requeued job 77 (2 remaining timeouts)\n")
    report = collect_status(run)
    # [issue 24] no process works on it any more: stopped (exit 1), not "in progress"
    assert report["kind"] == "train" and report["state"] == "stopped"
    assert report["exit_code"] == EXIT_FAILED
    assert report["step"] == 11 and report["epoch"] == 1
    per_epoch = report["steps_per_epoch"]
    assert per_epoch and per_epoch < 11  # one epoch finished, the second under way
    assert report["steps_total"] == 2 * per_epoch
    assert report["latest"]["step"] == 11 and report["latest"]["reason"].startswith("signal")
    assert 0 <= report["latest"]["age_s"] < 300
    assert report["requeues"] == 1  # from submitit's log (no requeues.jsonl yet)
    assert set(report["last_losses"]) >= {"G_total", "pixel_ct2hist", "D_hist"}
    assert report["eta_s"] is None  # nothing is running towards an end
    (run / "requeues.jsonl").write_text('{"time": 1}\n{"time": 2}\n')
    assert collect_status(run)["requeues"] == 2
    text = format_status(collect_status(run))
    assert f"step 11/{2 * per_epoch}" in text and "requeues: 2" in text

    final = train(cfg, run, progress=False)
    assert final.status == "finished"
    capsys.readouterr()
    assert main(["status", str(run), "--json"]) == EXIT_COMPLETE
    done = json.loads(capsys.readouterr().out)
    assert done["done"] and done["finished_by"] == "DONE" and done["epoch"] == 2
    assert done["step"] == final.step == 2 * per_epoch and done["eta_s"] is None


def test_a_damaged_input_chunk_fails_its_unit_and_status_reports_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Reading the input fails (a storage chunk's bytes garbled on disk) when resuming a
    run through the CLI: exit 2 with one line, the unit's failed marker names the damage,
    `status` reports the unit failed; once the chunk is restored the rerun clears it."""
    from micro import untrained_generator_checkpoint

    ckpt = untrained_generator_checkpoint(tmp_path / "g.pt")
    vol = np.clip(np.random.default_rng(1).normal(20000, 6000, SHAPE), 0, 65535)
    path = tmp_path / "ct.zarr"
    zarr.create_array(str(path), data=vol.astype(np.uint16), chunks=(8, 8, 8))
    run = tmp_path / "run"
    args = ["stain", str(path), "--checkpoint", str(ckpt), "--out", str(run), "--axes", "z",
            "--chunk", "10", "13", "15", "--tile", "16", "--step", "8", "--bone-level",
            "30000", "--background-level", "9000", "--no-progress"]
    assert main([*args, "--plan-only"]) == 0
    chunk = path / "c" / "1" / "0" / "0"  # z 8:16: read by slab s0000 (z 0:10 + halo)
    good = chunk.read_bytes()
    chunk.write_bytes(np.random.default_rng(0).integers(0, 256, 200, np.uint8).tobytes())
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged data" in err and str(chunk) in err
    marker = read_markers(run, FAILED, "axis-z")["s0000"]
    assert marker["error"].startswith("InputError: ") and str(chunk) in marker["error"]
    assert "damaged data" in marker["error"] and marker["pid"] == os.getpid()
    assert main(["status", str(run)]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "failed: axis-z/s0000: InputError: " in out and "damaged data" in out
    chunk.write_bytes(good)  # restored: the rerun stains it and clears the marker
    assert main(args) == 0
    assert not read_markers(run, FAILED, "axis-z")
    assert main(["status", str(run)]) == EXIT_COMPLETE


def test_polls_parse_the_plan_once_per_plan_file_version(
        tmp_path: Path, volume_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import hpcstain.volume.plan as plan_module
    from hpcstain.launch.watch import unit_counts
    from hpcstain.status import cached_plan
    from hpcstain.volume.plan import save_plan

    run = new_run(tmp_path / "run", volume_path)
    real, calls = plan_module.load_plan, []
    monkeypatch.setattr(plan_module, "load_plan", lambda d: calls.append(d) or real(d))
    for _ in range(3):  # three rounds of `submit --wait` and of `status --watch`
        assert unit_counts(run)["units"] == (0, 4)
        assert collect_status(run)["units"] == {"done": 0, "total": 4}
    assert len(calls) == 1
    save_plan(run, dataclasses.replace(real(run), axes=("z",)))  # a new plan.json
    assert cached_plan(run).axes == ("z",) and unit_counts(run)["units"] == (0, 2)
    assert len(calls) == 2
