"""Fusion's chunk groups are block tasks that the executors run (issue 27: one block-task
engine): every executor gives the serial bytes, and a killed fuse resumes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from test_volume_fuse import make_run, smooth_truth, striped

from hpcstain.errors import UsageError
from hpcstain.executors import pass_runner, run_fuse
from hpcstain.volume.fuse import fuse_run
from hpcstain.volume.rundir import done_names
from hpcstain.volume.tasks import TaskPass, run_serial


def image_hash(run, name="fused.ome.zarr") -> str:
    h = hashlib.sha256()
    root = zarr.open_group(str(run / name), mode="r")
    for group in (root, root["disagreement"]):
        for key in sorted(group.array_keys()):
            h.update(np.asarray(group[key][...]).tobytes())
    return h.hexdigest()


def runs(tmp_path, *names):
    truth = smooth_truth()
    preds = {a: striped(truth, d, 5, d) for d, a in enumerate("zyx")}
    return [make_run(tmp_path / n, preds, chunk=(7, 9, 8))[0] for n in names]


class Doubled:
    """A picklable block task: records nothing, names its job twice."""

    def __call__(self, job: int) -> list[str]:
        return [f"{job}", f"{job}b"]


def test_pass_runners_run_every_job_once():
    tp = TaskPass(Doubled(), [3, 1, 2], label="t", weights=[1, 2, 3])
    assert run_serial(tp) == ["3", "3b", "1", "1b", "2", "2b"]
    assert sorted(pass_runner("local", workers=2)(tp, False)) == sorted(run_serial(tp))
    with pytest.raises(UsageError, match="unknown executor"):
        pass_runner("slurm")


@pytest.mark.timeout(300)
def test_every_executor_fuses_the_serial_bytes(tmp_path):
    serial, local, dask = runs(tmp_path, "serial", "local", "dask")
    kw = {"method": "consistency", "pyramid_levels": 3, "fill_outside": False}
    fuse_run(serial, **kw)
    a = run_fuse(local, executor="local", workers=2, **kw)
    b = run_fuse(dask, executor="dask", workers=2, **kw)
    assert a.fused == b.fused == sorted(done_names(serial, "fused"))
    assert image_hash(serial) == image_hash(local) == image_hash(dask)


@pytest.mark.timeout(300)
def test_a_killed_fuse_resumes_to_the_same_bytes(tmp_path):
    straight, killed = runs(tmp_path, "straight", "killed")
    kw = {"method": "mean", "pyramid_levels": 3, "fill_outside": False}
    fuse_run(straight, **kw)
    child = textwrap.dedent(f"""
        import os, signal
        import hpcstain.volume.fuse as F
        F.fuse_groups = lambda plan, todo, **_: [[i] for i in todo]  # one chunk per task
        call = F.FuseTask.__call__
        seen = []
        def dying(self, group):
            if len(seen) == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # no unwinding, no cleanup
            seen.append(group)
            return call(self, group)
        F.FuseTask.__call__ = dying
        F.fuse_run({str(killed)!r}, **{kw!r})
    """)
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, check=False)
    assert res.returncode == -9
    assert len(done_names(killed, "fused")) == 3
    report = run_fuse(killed, executor="local", workers=2, **kw)
    assert report.already == 3 and report.complete
    assert image_hash(straight) == image_hash(killed)


def test_a_failed_fuse_group_is_in_status_until_fused(tmp_path, monkeypatch):
    from hpcstain.status import collect_status
    from hpcstain.volume import fuse as fuse_module

    (run,) = runs(tmp_path, "run")
    kw = {"method": "mean", "pyramid_levels": 2, "fill_outside": False}

    def broken(self, indices):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(fuse_module.FuseTask, "_fuse_group", broken)
        with pytest.raises(OSError, match="disk full"):
            fuse_run(run, **kw)
    assert not list((run / "running").rglob("*.json"))  # the worker unwound
    report = collect_status(run)
    assert report["state"] == "failed"
    assert [(f["task"], f["error"]) for f in report["failed"]] == [
        ("fused", "OSError: disk full")]
    assert report["fused"][0]["failed"] == 1
    fuse_run(run, **kw)
    report = collect_status(run)
    assert report["state"] == "complete" and not report["failed"]
    assert not list((run / "failed").rglob("*.json"))
