"""Launchers against a real single-node SLURM (started by .ci/slurm-up in CI)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from micro import micro_config

from hpcstain.checkpoint import load_checkpoint
from hpcstain.launch.profiles import load_cluster
from hpcstain.launch.submit import submit_fuse, submit_stain, submit_train
from hpcstain.train.logs import read_losses
from hpcstain.train.trainer import train


def _slurm_up() -> str | None:
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if out.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc"))
                                      for s in out.stdout.split()):
        return f"no usable SLURM node (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


_WHY = _slurm_up()
pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(_WHY is not None, reason=f"SLURM not reachable: {_WHY} "
                                 "(run .ci/slurm-up as root to start one)"),
              pytest.mark.filterwarnings("ignore")]

CLUSTER = ["cluster.cpus_per_task=1", "cluster.time_min=15", "cluster.signal_delay_s=30"]
# Byte-equality of float32 generator outputs between this process and jobs holds only with
# the same thread count on both sides (float summation order); pin it to one.
ONE_THREAD = "cluster.setup=[export OMP_NUM_THREADS=1]"


class one_thread:
    """Run a block with one torch thread (as the jobs started with ONE_THREAD)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpcstain.phantom import write_pairs

    return write_pairs(tmp_path_factory.mktemp("slurm-pairs") / "p", n=4, seed=5, size=(96, 96))


def tiny(manifest: Path, *extra: str):
    return micro_config(manifest, "data.patches_per_pair=8", "train.epochs=1",
                        "train.checkpoint_every=0", *extra)


def test_two_task_ddp_training_job_completes_and_its_checkpoint_loads(pairs: Path,
                                                                    tmp_path: Path) -> None:
    cluster = load_cluster("slurm", [*CLUSTER, "cluster.tasks_per_node=2"])
    job = submit_train(tiny(pairs, "train.max_steps=4"), tmp_path / "run", cluster)
    results = job.results()
    assert [r["status"] for r in results] == ["max_steps", "max_steps"]
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/latest.pt")
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2  # both ranks' RNG streams saved
    assert len(read_losses(tmp_path / "run")) == 4


def test_time_limit_signal_checkpoints_requeues_and_matches_uninterrupted(
        pairs: Path, tmp_path: Path) -> None:
    cfg = tiny(pairs, "train.epochs=2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the job runs single-threaded too: same float summation order
    try:
        train(cfg, tmp_path / "straight", progress=False)
    finally:
        torch.set_num_threads(threads)
    cluster = load_cluster("slurm", [*CLUSTER, "cluster.setup=[export OMP_NUM_THREADS=1]"])
    job = submit_train(cfg, tmp_path / "run", cluster)
    run = tmp_path / "run"
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run / "losses.jsonl").exists() and len(read_losses(run)) >= 3:
            break
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
    _release_requeued(str(job.job_id))
    result = job.result()
    assert result["status"] == "finished"
    log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "Requeued job" in log or "requeue" in log.lower()
    from hpcstain.status import collect_status

    status = collect_status(run)  # TrainJob.checkpoint recorded the requeue
    assert status["requeues"] == 1 and status["state"] == "complete"
    straight, resumed = read_losses(tmp_path / "straight"), read_losses(run)
    assert len(straight) == len(resumed)
    for a, b in zip(straight, resumed, strict=True):
        assert a["G_total"] == pytest.approx(b["G_total"], rel=1e-6)
    wa = load_checkpoint(tmp_path / "straight/checkpoints/latest.pt")["model"]["generators"]
    wb = load_checkpoint(run / "checkpoints/latest.pt")["model"]["generators"]
    for name in wa:
        for key in wa[name]:
            torch.testing.assert_close(wa[name][key], wb[name][key], atol=1e-6, rtol=0)


def _release_requeued(job_id: str, timeout: float = 180) -> None:
    """SLURM holds a requeued job ~2 min (BeginTime); start it now to keep the test short.

    The release is repeated while the job is pending: an update that lands before SLURM
    sets the requeue's BeginTime is overwritten by it (seen once as a 10-min hang).
    """
    deadline = time.time() + timeout
    last_update = 0.0
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"],
                             capture_output=True, text=True).stdout.split()
        if not out or out[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return
        if out[0] == "PENDING" and time.time() - last_update > 2.0:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           capture_output=True)
            last_update = time.time()
        if out[0] == "RUNNING" and last_update:
            return   # requeued and started again
        time.sleep(0.5)


@pytest.fixture(scope="module")
def volume_run(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from hpcstain.phantom import write_volume_file

    base = tmp_path_factory.mktemp("slurm-vol")
    train(tiny(pairs, "train.max_steps=1"), base / "model", progress=False)
    vol = write_volume_file(base / "vol.zarr", (24, 48, 48), "mg", seed=2)
    return vol, base / "model/checkpoints/latest.pt"


def _plan(run_dir: Path, vol: Path, ckpt: Path) -> Path:
    from hpcstain.volume import init_run, make_plan, open_volume

    plan = make_plan(open_volume(f"{vol}:ct"), chunk=12, axes="z,y,x", tile=32, step=16,
                     window="mean", sigma=1.0, in_channels=3, checkpoint=str(ckpt))
    return Path(init_run(run_dir, plan))


def _fused(run_dir: Path) -> np.ndarray:
    import zarr

    return zarr.open_group(str(run_dir / "fused.ome.zarr"), mode="r")["0"][:]


def test_stain_array_and_dependent_fuse_equal_the_in_process_run(
        volume_run: tuple[Path, Path], tmp_path: Path) -> None:
    from hpcstain.executors import run_stain
    from hpcstain.volume import fuse_run

    vol, ckpt = volume_run
    local = _plan(tmp_path / "local", vol, ckpt)
    with one_thread():
        run_stain(local, executor="local", progress=False)
    fuse_run(local, method="consistency")

    slurm = _plan(tmp_path / "slurm", vol, ckpt)
    cluster = load_cluster("slurm", [*CLUSTER, ONE_THREAD])
    jobs = submit_stain(slurm, cluster, n_tasks=2)
    fuse_job = submit_fuse(slurm, cluster, after=jobs, method="consistency")
    assert "fused 32 new chunk(s)" in fuse_job.result()
    assert all("stained" in j.result() for j in jobs)
    assert np.array_equal(_fused(local), _fused(slurm))


def test_cancelled_task_then_resubmission_completes_only_missing_units(
        volume_run: tuple[Path, Path], tmp_path: Path) -> None:
    from hpcstain.volume import pending_units

    vol, ckpt = volume_run
    run = _plan(tmp_path / "run", vol, ckpt)
    cluster = load_cluster("slurm", CLUSTER)
    jobs = submit_stain(run, cluster, n_tasks=2)
    subprocess.run(["scancel", str(jobs[1].job_id)], check=True)
    jobs[0].result()
    left = pending_units(run)
    assert left, "the cancelled task should have left slabs unstained"
    done_before = {p.name: p.stat().st_mtime_ns for p in (run / "done").rglob("*.json")}
    again = submit_stain(run, cluster, n_tasks=2)
    for j in again:
        j.result()
    assert pending_units(run) == []
    after = {p.name: p.stat().st_mtime_ns for p in (run / "done").rglob("*.json")}
    assert all(after[name] == t for name, t in done_before.items())  # nothing redone


def test_cross_validation_array_trains_every_fold(pairs: Path, tmp_path: Path) -> None:
    import json

    from hpcstain.launch.submit import cv_runs, submit_cv

    runs = cv_runs(["modcyclegan-tiny"], 2, tmp_path / "cv",
                   [f"data.manifest={pairs}", "data.patch_size=32", "data.patches_per_pair=4",
                    "data.batch_size=2", "data.n_test=0", "model.ngf=4", "model.ndf=4",
                    "model.n_blocks=1", "train.max_steps=2"])
    jobs = submit_cv(runs, load_cluster("slurm", CLUSTER), name="test")
    results = [j.result() for j in jobs]
    assert [r["status"] for r in results] == ["max_steps", "max_steps"]
    splits = [json.loads((tmp_path / f"cv/modcyclegan-tiny/fold-{k}/split.json").read_text())
              for k in range(2)]
    assert set(splits[0]["val_ids"]).isdisjoint(splits[1]["val_ids"])
    assert all((tmp_path / f"cv/modcyclegan-tiny/fold-{k}/checkpoints/latest.pt").is_file()
               for k in range(2))


def test_dask_workers_as_slurm_jobs_stain_the_same_bytes(volume_run: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue")
    import zarr

    from hpcstain.executors import run_stain
    from hpcstain.launch.dask_slurm import slurm_cluster

    vol, ckpt = volume_run
    local = _plan(tmp_path / "local", vol, ckpt)
    with one_thread():
        run_stain(local, executor="local", progress=False)
    run = _plan(tmp_path / "dask", vol, ckpt)
    cluster = slurm_cluster(load_cluster("slurm", [*CLUSTER, "cluster.mem_gb=2", ONE_THREAD]),
                            jobs=2, log_dir=tmp_path / "dask-logs")
    try:
        report = run_stain(run, executor="dask", address=cluster)
    finally:
        cluster.close()
    assert len(report.stained) == 10  # slabs: 2 along z (24 / 12), 4 along y, 4 along x
    for axis in "zyx":
        assert np.array_equal(zarr.open_array(str(local / f"axis-{axis}.zarr"), mode="r")[:],
                              zarr.open_array(str(run / f"axis-{axis}.zarr"), mode="r")[:])
