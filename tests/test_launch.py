"""Cluster profiles → submitit parameters and sbatch text, without a scheduler."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hpcstain.errors import ConfigError
from hpcstain.launch.profiles import load_cluster, slurm_parameters
from hpcstain.launch.submit import make_executor


def test_maxwell_profile_asks_for_exclusive_gpu_nodes() -> None:
    params = slurm_parameters(load_cluster("maxwell"))
    assert params["slurm_partition"] == "allgpu"
    assert params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4
    assert params["slurm_exclusive"] is True
    assert params["slurm_signal_delay_s"] >= 120


def test_cluster_keys_are_overridable_and_checked() -> None:
    cluster = load_cluster("maxwell", ["cluster.nodes=3", "cluster.partition=maxgpu",
                                       "cluster.additional=[mail-type=END]"])
    params = slurm_parameters(cluster)
    assert params["nodes"] == 3 and params["slurm_partition"] == "maxgpu"
    assert params["slurm_additional_parameters"] == {"mail-type": "END"}
    with pytest.raises(ConfigError, match="cluster.gpus"):
        load_cluster("maxwell", ["cluster.gpus=4"])
    with pytest.raises(ConfigError, match="no such cluster profile"):
        load_cluster("nowhere")


def test_sbatch_text_carries_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    # submitit's SLURM executor wants an `srun` on PATH even to only write the sbatch text;
    # a stand-in lets this run on machines without SLURM (it is never executed)
    if shutil.which("srun") is None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cluster = load_cluster("maxwell", ["cluster.account=mygroup", "cluster.qos=normal"])
    ex = make_executor(cluster, tmp_path / "logs", job_name="hpcstain-test")
    text = ex._make_submission_file_text("echo hi", "uid")
    for line in ("#SBATCH --partition=allgpu", "#SBATCH --exclusive",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --account=mygroup", "#SBATCH --qos=normal",
                 "#SBATCH --signal=USR2@300", "#SBATCH --job-name=hpcstain-test",
                 "module load maxwell"):
        assert line in text, line
    assert "#SBATCH --constraint='A100|V100'" in text  # quoted for the shell


def test_local_profile_makes_a_local_executor(tmp_path: Path) -> None:
    import submitit

    ex = make_executor(load_cluster("local"), tmp_path, job_name="x")
    assert isinstance(ex, submitit.LocalExecutor)


# --------------------------------------------------------------------------- calm terminal


def test_repeated_scheduler_warnings_collapse_to_one_line() -> None:
    import io
    import logging

    from hpcstain.launch.watch import HIDDEN_NOTE, RepeatFilter

    filt = RepeatFilter()
    logger = logging.getLogger("hpcstain-test-repeat")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.addFilter(filt)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for call in range(1, 13):  # 12 polls, two array tasks each: 24 sacct warnings
            for job in ("4711_0", "4711_1"):
                logger.warning(f"Call #{call} - Bypassing sacct error Command '['sacct', "
                               f"'-j', '{job}']' returned non-zero exit status 1., status "
                               "may be inaccurate.")
        logger.warning("Caught signal SIGUSR2 on node3: this job is timed-out.")
        logger.info("Requeued job 4711 (2 remaining timeouts)")  # INFO: never filtered
        logger.info("Requeued job 4711 (1 remaining timeouts)")
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(filt)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("Call #1 - Bypassing sacct error") and lines[0].endswith(
        HIDDEN_NOTE)
    assert lines[1].startswith("Caught signal SIGUSR2")
    assert filt.hidden == 23
    (summary,) = filt.summary()
    assert summary.startswith('(submitit: 23 more × "Call #1 - Bypassing sacct error')
    assert summary.endswith('…" hidden)')


def test_quiet_submitit_filters_submitit_own_logger(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from submitit.core import logger as submitit_logger

    from hpcstain.launch.watch import quiet_submitit

    filt = quiet_submitit()
    assert quiet_submitit() is filt  # installed once
    before = filt.hidden
    with caplog.at_level(logging.WARNING, logger="submitit"):
        for call in (901, 902, 903):
            submitit_logger.get_logger().warning(
                f"Call #{call} - Bypassing sacct error zzz-test, status may be inaccurate.")
    shown = [r for r in caplog.records if "zzz-test" in r.getMessage()]
    assert len(shown) == 1 and filt.hidden == before + 2


class FakeJob:
    """A submitit-like job that finishes after ``polls`` polls, or raises."""

    def __init__(self, job_id: str, polls: int, result: object = None,
                 error: Exception | None = None) -> None:
        from types import SimpleNamespace

        self.job_id, self.polls, self.result_value, self.error = job_id, polls, result, error
        self.paths = SimpleNamespace(stderr=Path(f"/logs/{job_id}_0_log.err"))

    def done(self) -> bool:
        self.polls -= 1
        return self.polls <= 0

    def results(self) -> list[object]:
        if self.error is not None:
            raise self.error
        return [self.result_value]

    def exception(self) -> Exception | None:
        return self.error


def test_wait_shows_tasks_and_units_and_one_line_per_failure() -> None:
    import io

    from hpcstain.launch.watch import print_summary, wait_for_jobs

    trace = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 3\n"
                         "RuntimeError: CUDA out of memory")
    jobs = [FakeJob("7_0", 2, "ok 0"), FakeJob("7_1", 4, error=trace), FakeJob("7_2", 6, "ok")]
    polls = iter(range(100))

    def counts() -> dict[str, tuple[int, int]]:
        return {"units": (min(next(polls), 6), 6)}

    out = io.StringIO()
    report = wait_for_jobs(jobs, "stain", counts, out=out, interval=0.0, log_every=1e9)
    lines = out.getvalue().splitlines()
    # a line at the start and one per finished task (not one per poll)
    assert [ln.split(" · ")[0] for ln in lines] == [
        "stain [....................] 0/3 task(s) finished",
        "stain [######..............] 1/3 task(s) finished",
        "stain [#############.......] 2/3 task(s) finished",
        "stain [####################] 3/3 task(s) finished"]
    assert lines[-1].split(" · ")[1] == "units 5/6"
    assert [o.ok for o in report.outcomes] == [True, False, True]
    assert report.outcomes[0].result == "ok 0"
    print_summary(report, None, out)
    tail = out.getvalue().splitlines()[len(lines):]
    assert tail == ["job 7_1 failed: RuntimeError: CUDA out of memory "
                    "(log: /logs/7_1_0_log.err)"]


def test_wait_gives_up_on_a_job_the_scheduler_dropped() -> None:
    import io

    from hpcstain.launch.watch import wait_for_jobs

    job = FakeJob("8", 10**9)  # never writes a result
    report = wait_for_jobs([job], "stain", out=io.StringIO(), interval=0.0,
                           gone=lambda j: True)
    assert not report.outcomes[0].ok and "without a result" in report.outcomes[0].error


@pytest.mark.slow  # three local job processes (~40 s on two busy cores)
def test_submit_stain_wait_on_local_processes_shows_progress_not_spam(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real path: `submit stain --tasks 2 --fuse --wait` with submitit's local
    executor (no scheduler): one progress line per finished task, then the fuse."""
    import numpy as np
    import zarr

    from hpcstain.checkpoint import save_checkpoint
    from hpcstain.cli import main
    from hpcstain.config import load_config, to_dict
    from hpcstain.models import build_model
    from hpcstain.status import collect_status

    cfg = load_config("modcyclegan-tiny", ["model.ngf=4", "model.ndf=4", "model.n_blocks=1"])
    model = build_model(cfg.model, cfg.loss, "cpu")
    ckpt = tmp_path / "g.pt"
    save_checkpoint(ckpt, {"architecture": model.architecture(), "config": to_dict(cfg),
                           "model": model.generator_state_dict(), "epoch": 0, "step": 0})
    vol = np.random.default_rng(0).integers(8000, 32000, (16, 20, 24), dtype=np.uint16)
    zarr.create_array(str(tmp_path / "ct.zarr"), data=vol, chunks=(8, 8, 8))
    run = tmp_path / "run"
    code = main(["submit", "stain", str(tmp_path / "ct.zarr"), "--checkpoint", str(ckpt),
                 "--out", str(run), "--tasks", "2", "--fuse", "--wait", "--profile", "local",
                 "--axes", "z,y", "--chunk", "8", "--tile", "16", "--step", "8", "--window",
                 "mean", "--bone-level", "30000", "--background-level", "9000", "--sigma", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    progress = [ln for ln in captured.err.splitlines() if ln.startswith(("stain [", "fuse ["))]
    stain = [ln for ln in progress if ln.startswith("stain")]
    assert len(stain) <= 3  # start + one per finished task, not one per poll
    assert stain[-1].startswith("stain [####################] 2/2 task(s) finished")
    assert "units 5/5" in stain[-1]  # 2 slabs along z + 3 along y
    assert progress[-1].startswith("fuse [####################] 1/1 task(s) finished")
    assert "fused 18/18" in progress[-1]  # 2 x 3 x 3 storage chunks
    assert "3/3 job(s) succeeded" in captured.out
    assert "Traceback" not in captured.err
    assert collect_status(run, require_fused=True)["state"] == "complete"


def test_requeue_is_recorded_for_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """submitit calls TrainJob.checkpoint() right before requeueing: one line each."""
    import json

    from hpcstain.launch.submit import TrainJob
    from hpcstain.status import requeue_count

    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    job = TrainJob({}, str(tmp_path))
    assert job.checkpoint().function == job  # what submitit resubmits
    job.checkpoint()
    rows = [json.loads(line) for line in (tmp_path / "requeues.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["slurm"]["job_id"] == "4711"
    assert requeue_count(tmp_path) == 2
