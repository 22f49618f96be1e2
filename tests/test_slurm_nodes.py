"""Two SLURM nodes on one host (``.ci/slurm-up --nodes 2``: n1, n2): DDP across the nodes,
a node lost mid-training, a staining array with a node lost mid-unit.

A "lost node" is simulated as a dead machine would look to the others: its ``slurmd`` is
killed (the controller stops hearing from it), and its ``slurmstepd`` and tasks are frozen
(SIGSTOP: no TCP FIN reaches the peers, as with a powered-off node) until SLURM has
requeued the job, then killed. ``slurmd -N n2`` is started again afterwards
(``ReturnToService=2`` puts the node back). The host-list and status logic these tests rely
on is unit-tested at the top without SLURM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from micro import MICRO

from hpcstain.checkpoint import load_checkpoint
from hpcstain.train.distributed import (
    _first_slurm_host,
    ddp_timeout_s,
    expand_hostlist,
)

pytestmark = pytest.mark.filterwarnings("ignore")

# --------------------------------------------------------------------------- no SLURM needed


@pytest.mark.parametrize(("nodelist", "names"), [
    ("n[1-2]", ["n1", "n2"]),
    ("n[01-03,7]", ["n01", "n02", "n03", "n7"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu-[009-011]-ib", ["gpu-009-ib", "gpu-010-ib", "gpu-011-ib"]),
    ("node17", ["node17"]),
])
def test_host_lists_expand_like_scontrol_show_hostnames(nodelist: str, names: list[str]) -> None:
    assert expand_hostlist(nodelist) == names


def test_first_host_without_scontrol_and_node_addr_for_names_that_do_not_resolve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import hpcstain.train.distributed as d

    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the parser decides
    monkeypatch.setattr(d, "_resolves", lambda name: True)
    assert _first_slurm_host("n[01-03,7]") == "n01"
    assert _first_slurm_host("a1,b[2-3]") == "a1"
    monkeypatch.setattr(d, "_resolves", lambda name: False)
    monkeypatch.setattr(d, "_node_addr", lambda name: {"n01": "10.0.0.7"}.get(name))
    assert _first_slurm_host("n[01-03,7]") == "10.0.0.7"
    with pytest.raises(ValueError):
        expand_hostlist("n[1-")


def test_ddp_timeout_comes_from_the_environment() -> None:
    assert ddp_timeout_s({}) == 1800
    assert ddp_timeout_s({"HPCSTAIN_DDP_TIMEOUT_S": "45"}) == 45
    with pytest.raises(ValueError, match="HPCSTAIN_DDP_TIMEOUT_S"):
        ddp_timeout_s({"HPCSTAIN_DDP_TIMEOUT_S": "0"})


def test_a_failed_collective_counts_as_a_lost_peer_and_other_errors_do_not() -> None:
    from hpcstain.launch.submit import lost_peer

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
                        "out waiting 15000ms for recv operation to complete")
    assert lost_peer(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert lost_peer(outer)
    assert not lost_peer(ValueError("bad manifest"))
    assert not lost_peer(RuntimeError("CUDA out of memory"))


def test_requeues_slurm_did_itself_are_recorded_once_on_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcstain.launch.submit import record_requeue, record_slurm_requeues

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert record_slurm_requeues(tmp_path) == 0
    record_requeue(tmp_path, reason="lost peer")        # a rank requeued, restart 0 -> 1
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")      # then SLURM once more (node failure)
    assert record_slurm_requeues(tmp_path) == 1
    assert record_slurm_requeues(tmp_path) == 0         # a second task start adds nothing
    rows = [json.loads(x) for x in (tmp_path / "requeues.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rows] == ["lost peer", "node failure"]


def test_a_marker_of_a_requeued_job_is_stale() -> None:
    from hpcstain.status import LiveJobSet, worker_gone

    marker = {"host": "elsewhere", "pid": 1, "time": 1000.0,
              "slurm": {"job_id": "12", "array_job_id": "11", "array_task_id": "1"}}
    assert worker_gone(marker, {"12"}, "here") is None               # plain set: running
    assert worker_gone(marker, LiveJobSet({"12"}, {"12": 990.0}), "here") is None
    pending = worker_gone(marker, LiveJobSet({"12", "11_1"}, {}), "here")
    assert pending is not None and "11_1 was requeued" in pending
    restarted = worker_gone(marker, LiveJobSet({"12"}, {"12": 1100.0}), "here")
    assert restarted is not None and "restarted" in restarted
    assert "no longer" in (worker_gone(marker, LiveJobSet(set(), {}), "here") or "")


# --------------------------------------------------------------------------- the two nodes

NODES = ("n1", "n2")


def _scontrol_node(node: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True,
                         timeout=10)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def _node_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                         timeout=10)
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


def _two_nodes_down() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "no sinfo/scontrol on PATH"
    try:
        states = _node_states()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    usable = ("idle", "mix", "alloc")
    bad = {n: states.get(n, "absent") for n in NODES
           if not states.get(n, "").startswith(usable)}
    if bad:
        return f"nodes n1, n2 not both usable ({bad})"
    if os.geteuid() != 0:
        return "killing and restarting a node's slurmd needs root"
    return None


_WHY = _two_nodes_down()
two_nodes = [pytest.mark.slurm,
             pytest.mark.skipif(_WHY is not None, reason=f"two-node SLURM not up: {_WHY} "
                                "(run .ci/slurm-up --nodes 2 as root)")]

TIMEOUT_TRAIN = 240   # bound on any one training job (submission to results)
STEPS, EVERY = 24, 4  # 8 steps per epoch at 2 × batch 2; periodic latest.pt every 4 steps
SHORT = 3             # DDP vs one process: GAN training amplifies float-order differences
                      # (1e-5 relative by step 6 here), so compare 3 steps like test_train
SITE = '''
import atexit, os, sys
_dir = os.environ.get("HPCSTAIN_TEST_AUDIT")
if _dir and os.environ.get("SLURM_JOB_ID"):
    _log = open(os.path.join(_dir, "w-%s-%s-%d.txt" % (os.environ["SLURM_JOB_ID"],
                os.environ.get("SLURM_PROCID", "0"), os.getpid())), "a", buffering=1)
    _log.write("env %s %s %s %s\\n" % tuple(os.environ.get(k, "-") for k in (
        "SLURMD_NODENAME", "SLURM_PROCID", "SLURM_RESTART_COUNT", "SLURM_JOB_ID")))

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (
                    mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                _log.write("open %s\\n" % os.path.abspath(os.fsdecode(args[0])))
        elif event == "os.rename":
            _log.write("rename %s\\n" % os.path.abspath(os.fsdecode(args[1])))

    sys.addaudithook(_hook)
    atexit.register(lambda: _log.write("master %s\\n" % os.environ.get("MASTER_ADDR", "-")))
'''


class Audit:
    """Every file a job's Python processes open for writing or rename into place."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "site").mkdir(exist_ok=True)
        (folder / "site" / "sitecustomize.py").write_text(SITE)

    def setup_line(self) -> str:
        return (f"cluster.setup=[export OMP_NUM_THREADS=1 PYTHONPATH={self.folder / 'site'} "
                f"HPCSTAIN_TEST_AUDIT={self.folder}]")

    def processes(self, job: str | None = None) -> list[dict[str, Any]]:
        out = []
        for f in sorted(self.folder.glob("w-*.txt")):
            lines = f.read_text().splitlines()
            if not lines or not lines[0].startswith("env "):
                continue
            node, rank, restart, job_id = lines[0].split()[1:5]
            if job is not None and job_id != str(job):
                continue
            out.append({"node": node, "rank": int(rank), "job": job_id,
                        "restart": 0 if restart == "-" else int(restart),
                        "writes": [ln.split(" ", 1)[1] for ln in lines[1:]
                                   if ln.startswith(("open ", "rename "))],
                        "renames": [ln.split(" ", 1)[1] for ln in lines[1:]
                                    if ln.startswith("rename ")],
                        "master": next((ln.split()[1] for ln in lines if
                                        ln.startswith("master ")), None)})
        return out


def _run_json(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def _hpcstain(*args: str, env: dict[str, str] | None = None) -> str:
    exe = str(Path(sys.executable).with_name("hpcstain"))
    cmd = [exe, *args] if Path(exe).exists() else [sys.executable, "-m", "hpcstain.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _job_ids(stdout: str) -> list[str]:
    return re.findall(r"submitted job (\S+)", stdout)


def _squeue(job: str) -> list[list[str]]:
    out = _run_json(["squeue", "-h", "-r", "-j", job.split("_")[0], "-o", "%i %A %T %N"])
    return [line.split() for line in out.stdout.splitlines() if line.strip()]


def _scontrol_job(job: str) -> dict[str, str]:
    out = _run_json(["scontrol", "show", "job", "-o", job]).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _wait(cond: Any, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _submitit_job(folder: Path, job_id: str, tasks: int) -> Any:
    import submitit

    return submitit.SlurmJob(folder=folder, job_id=job_id, tasks=tuple(range(tasks)))


def _results(job: Any, timeout: float) -> list[Any]:
    """The job's results; fails (never hangs) when it takes longer than ``timeout`` or
    leaves the queue without results."""
    deadline, gone_since = time.time() + timeout, None
    while not job.done():
        state = _squeue(str(job.job_id))
        gone_since = (gone_since or time.time()) if not state else None
        if time.time() > deadline or (gone_since and time.time() - gone_since > 15):
            subprocess.run(["scancel", str(job.job_id).split("_")[0]], capture_output=True)
            log = Path(job.paths.stderr)
            tail = log.read_text()[-1500:] if log.exists() else ""
            pytest.fail(f"job {job.job_id} not done after {timeout} s or left the queue "
                        f"without results (squeue: {state}); {log}:\n{tail}")
        time.sleep(1)
    return job.results()


def _release_requeued(job: str, timeout: float = 180) -> None:
    """A requeued job waits ~2 min (BeginTime); start it now (repeatedly: an update that
    lands before SLURM sets the BeginTime is overwritten by it)."""
    deadline, last = time.time() + timeout, 0.0
    while time.time() < deadline:
        rows = _squeue(job)
        states = [r[2] for r in rows if r[0] == job or r[1] == job]
        if not states or states[0] in ("RUNNING", "COMPLETED", "FAILED", "CANCELLED"):
            return
        if states[0] == "PENDING" and time.time() - last > 2.0:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                           capture_output=True)
            last = time.time()
        time.sleep(0.5)
    pytest.fail(f"requeued job {job} did not start within {timeout} s")


# ------------------------------------------------------------------ freezing and reviving n2


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _ppid_comm(pid: int) -> tuple[int, str]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0, ""
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    try:
        return ppid, Path(f"/proc/{ppid}/comm").read_text().strip()
    except OSError:
        return ppid, ""


def job_processes(job: str, node: str) -> list[int]:
    """The tasks of ``job`` that run on ``node`` (their environment says so), their
    children, and the ``slurmstepd`` processes that started them."""
    tasks, stepds = [], set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = _environ(int(entry.name))
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node:
            tasks.append(int(entry.name))
            ppid, comm = _ppid_comm(int(entry.name))
            if comm.startswith("slurmstepd"):
                stepds.add(ppid)
    return sorted(stepds) + tasks


def _slurmd_pid(node: str) -> int | None:
    try:
        pid = int(Path(f"/run/slurmd-{node}.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


class LostNode:
    """Kill ``node``'s slurmd and freeze the given jobs' processes there; ``revive`` kills the
    frozen processes and starts the slurmd again (also on teardown, whatever happened)."""

    def __init__(self, node: str) -> None:
        self.node, self.frozen, self.at = node, [], 0.0
        self.jobs: list[str] = []  # cancelled on teardown: no stray jobs after a failure

    def freeze(self, jobs: list[str]) -> list[int]:
        for _ in range(3):  # again: a process may have forked between listing and stopping
            for pid in (p for job in jobs for p in job_processes(job, self.node)):
                if pid not in self.frozen:
                    os.kill(pid, signal.SIGSTOP)
                    self.frozen.append(pid)
        return self.frozen

    def thaw(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def kill_slurmd(self) -> None:
        pid = _slurmd_pid(self.node)
        assert pid is not None, f"no slurmd for {self.node}"
        os.kill(pid, signal.SIGKILL)
        self.at = time.time()

    def revive(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.frozen = []
        started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
        if _slurmd_pid(self.node) is None:
            subprocess.run(["/usr/sbin/slurmd", "-N", self.node], check=True, timeout=30)
        else:
            started = ""

        def back() -> bool:
            # Back only once the controller has heard from the new slurmd: a node whose
            # slurmd died reads plain IDLE for ~25 s until a ping fails, and a job started on
            # it then is cancelled for a node failure when that ping does fail.
            node = _scontrol_node(self.node)
            state = node.get("State", "")
            if state.startswith(("DOWN", "DRAIN", "FAIL")):
                subprocess.run(["scontrol", "update", f"nodename={self.node}", "state=resume"],
                               capture_output=True)
            return (state in ("IDLE", "MIXED", "ALLOCATED")  # no +NOT_RESPONDING etc.
                    and node.get("SlurmdStartTime", "") >= started)

        _wait(back, 90, f"{self.node} back in service")


@pytest.fixture
def lost_n2() -> Any:
    node = LostNode("n2")
    yield node
    try:
        node.revive()
    finally:
        for job in node.jobs:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpcstain.phantom import write_pairs

    return write_pairs(tmp_path_factory.mktemp("nodes-pairs") / "p", n=4, seed=5,
                       size=(96, 96))


def _train_overrides(manifest: Path, batch: int, steps: int = STEPS) -> list[str]:
    return [*MICRO, f"data.manifest={manifest}", "data.patches_per_pair=8",
            f"data.batch_size={batch}", "train.epochs=10", f"train.max_steps={steps}",
            f"train.checkpoint_every={EVERY}"]


def _cluster(*extra: str) -> list[str]:
    return ["cluster.cpus_per_task=1", "cluster.time_min=15", "cluster.signal_delay_s=30",
            "cluster.nodes=2", "cluster.tasks_per_node=1", *extra]


def _submit_train(run: Path, manifest: Path, audit: Audit, *extra: str,
                  steps: int = STEPS) -> Any:
    out = _hpcstain("submit", "train", "--profile", "slurm", "-c", "modcyclegan-tiny",
                    "--out", str(run), *_train_overrides(manifest, 2, steps),
                    *_cluster(audit.setup_line(), *extra))
    (job_id,) = _job_ids(out)
    return _submitit_job(run / "slurm-logs", job_id, tasks=2)


def _generators(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return load_checkpoint(run / "checkpoints/latest.pt")["model"]["generators"]


def _assert_same_generators(a: Path, b: Path, atol: float) -> None:
    wa, wb = _generators(a), _generators(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        for key in wa[name]:
            torch.testing.assert_close(wa[name][key], wb[name][key], atol=atol, rtol=0,
                                       msg=f"{name}.{key}")


def _own_files(audit: Audit, job: str, run: Path) -> dict[int, set[str]]:
    """Files under the run directory (not the submitit logs) each rank wrote, by rank."""
    by_rank: dict[int, set[str]] = {}
    for proc in audit.processes(job):
        paths = {p for p in proc["writes"] if p.startswith(str(run) + "/")
                 and not p.startswith(str(run / "slurm-logs"))}
        by_rank.setdefault(proc["rank"], set()).update(paths)
    return by_rank


@pytest.fixture(scope="module")
def reference(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process on the global batch (2 ranks × 2 = 4), in this process, one thread,
    ``SHORT`` steps."""
    from hpcstain.config import load_config
    from hpcstain.train.trainer import train

    run = tmp_path_factory.mktemp("nodes-ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config("modcyclegan-tiny", _train_overrides(pairs, 4, SHORT)), run,
              progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def two_node_run(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-node run of ``STEPS`` steps (what a resumed run must equal)."""
    if _WHY is not None:
        pytest.skip(_WHY)
    base = tmp_path_factory.mktemp("nodes-ddp")
    job = _submit_train(base / "run", pairs, Audit(base / "audit"))
    results = _results(job, TIMEOUT_TRAIN)
    assert [r["status"] for r in results] == ["max_steps", "max_steps"]
    return base / "run"


@pytest.mark.slurm
@pytest.mark.skipif(_WHY is not None, reason=f"two-node SLURM not up: {_WHY}")
def test_ddp_across_two_nodes_equals_one_process_and_only_rank_0_writes(
        pairs: Path, reference: Path, tmp_path: Path) -> None:
    from hpcstain.train.logs import read_losses

    audit, run = Audit(tmp_path / "audit"), tmp_path / "run"
    submitted = _submit_train(run, pairs, audit, steps=SHORT)
    job = str(submitted.job_id)
    results = _results(submitted, TIMEOUT_TRAIN)
    assert [r["status"] for r in results] == ["max_steps", "max_steps"]
    procs = [p for p in audit.processes(job) if p["writes"] or p["master"]]
    ranks = {p["rank"]: p for p in procs if p["master"]}
    assert {r: p["node"] for r, p in ranks.items()} == {0: "n1", 1: "n2"}  # one rank a node
    assert {p["master"] for p in ranks.values()} == {"n1"}  # first node of n[1-2]
    # losses and weights as one process on the global batch (test_train's DDP tolerance)
    ls, ld = read_losses(reference), read_losses(run)
    assert len(ls) == len(ld) == SHORT
    for a, b in zip(ls, ld, strict=True):
        assert a["pixel_ct2hist"] == pytest.approx(b["pixel_ct2hist"], rel=1e-4)
        assert a["G_total"] == pytest.approx(b["G_total"], rel=1e-4)
    _assert_same_generators(reference, run, atol=1e-4)
    # only rank 0 wrote into the run directory: checkpoints, the mask cache, logs
    written = _own_files(audit, job, run)
    assert written.get(1, set()) == set(), sorted(written[1])[:5]
    assert str(run / "checkpoints/latest.pt") in written[0]
    assert any("/cache/mask-" in p for p in written[0])


@pytest.mark.slurm
@pytest.mark.skipif(_WHY is not None, reason=f"two-node SLURM not up: {_WHY}")
def test_node_lost_mid_training_requeues_and_resumes_to_the_same_weights(
        pairs: Path, two_node_run: Path, lost_n2: LostNode,
        tmp_path: Path) -> None:
    from hpcstain.status import collect_status
    from hpcstain.train.logs import read_losses

    timeout = 15  # DDP collective timeout: below the controller's ~20-45 s node detection
    audit = Audit(tmp_path / "audit")
    run = tmp_path / "run"
    job = _submit_train(run, pairs, audit, f"cluster.ddp_timeout_s={timeout}")
    jid = str(job.job_id)
    lost_n2.jobs.append(jid)
    _wait(lambda: (run / "losses.jsonl").exists() and len(read_losses(run)) >= EVERY + 2,
          TIMEOUT_TRAIN, "training to pass its first periodic checkpoint", every=0.2)
    survivor = [p for p in job_processes(jid, "n1") if _comm(p).startswith("python")]
    assert survivor, "no training task of the job on n1"
    frozen = lost_n2.freeze([jid])
    assert frozen, "no process of the job on n2"
    lost_n2.kill_slurmd()
    step_at_loss = len(read_losses(run))
    _wait(lambda: not any(_alive(p) for p in survivor), timeout + 45,
          "the surviving rank to give up")
    survivor_s = time.time() - lost_n2.at
    _wait(lambda: int(_scontrol_job(jid).get("Restarts", "0")) >= 1, 120, "the requeue")
    requeued_s = time.time() - lost_n2.at
    lost_n2.revive()
    # Start it before its ~2 min BeginTime, but only once the old run is gone from n1: its
    # srun still waits KillWait+2 s, then cancels "step J.0", which the new run reuses.
    _wait(lambda: not job_processes(jid, "n1") and any(
        r[2] == "PENDING" for r in _squeue(jid)), 60, "the old run of the job to end")
    _release_requeued(jid)
    results = _results(job, TIMEOUT_TRAIN)
    total_s = time.time() - lost_n2.at
    print(f"\nnode lost at step {step_at_loss}: survivor exited after {survivor_s:.1f} s, "
          f"requeued after {requeued_s:.1f} s, finished {total_s:.1f} s after the loss")

    assert survivor_s < timeout + 25  # the DDP timeout, not SLURM's node detection (~45 s)
    assert [r["status"] for r in results] == ["max_steps", "max_steps"]
    rows = [json.loads(x) for x in (run / "requeues.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rows] == ["lost peer"] and rows[0]["slurm"]["job_id"] == jid
    assert collect_status(run)["requeues"] == 1
    restarted = [p for p in audit.processes(jid) if p["restart"] == 1]
    assert sorted((p["rank"], p["node"]) for p in restarted if p["master"]) == [
        (0, "n1"), (1, "n2")]
    # the resumed run ends where the uninterrupted two-node run ended
    straight = two_node_run
    la, lb = read_losses(straight), read_losses(run)
    assert len(la) == len(lb) == STEPS
    for a, b in zip(la, lb, strict=True):
        assert a["G_total"] == pytest.approx(b["G_total"], rel=1e-6)
    _assert_same_generators(straight, run, atol=1e-6)
    written = _own_files(audit, jid, run)
    assert written.get(1, set()) == set(), sorted(written[1])[:5]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------- staining

STAIN = ["--chunk", "12", "--tile", "32", "--step", "16", "--window", "mean", "--sigma", "1.0",
         "--max-unit-voxels", "4000"]


@pytest.mark.slurm
@pytest.mark.skipif(_WHY is not None, reason=f"two-node SLURM not up: {_WHY}")
def test_stain_array_over_two_nodes_with_a_node_lost_mid_unit(
        lost_n2: LostNode, tmp_path: Path) -> None:
    import zarr
    from micro import untrained_generator_checkpoint

    from hpcstain.phantom import write_volume_file
    from hpcstain.status import stain_status
    from hpcstain.volume import pending_units

    vol = write_volume_file(tmp_path / "vol.zarr", (24, 48, 48), "mg", seed=2)
    ckpt = untrained_generator_checkpoint(tmp_path / "g.pt")
    one = {"OMP_NUM_THREADS": "1"}
    _hpcstain("stain", str(vol), "--checkpoint", str(ckpt), "--out", str(tmp_path / "local"),
              *STAIN, "--no-progress", env=one)
    _hpcstain("fuse", str(tmp_path / "local"), env=one)

    audit = Audit(tmp_path / "audit")
    run = tmp_path / "run"
    out = _hpcstain("submit", "stain", str(vol), "--checkpoint", str(ckpt), "--out", str(run),
                    *STAIN, "--tasks", "2", "--fuse", "--profile", "slurm",
                    "cluster.cpus_per_task=1", "cluster.time_min=15", audit.setup_line())
    array, fuse_id = _job_ids(out)
    lost_n2.jobs += [array.split("_")[0], fuse_id]
    elements = _wait(lambda: (lambda rows: rows if len(rows) == 2 and all(
        r[2] == "RUNNING" for r in rows) else None)(
        [r for r in _squeue(array) if "_" in r[0]]), 120, "both array tasks running")
    on = {r[3]: r for r in elements}
    assert set(on) == {"n1", "n2"}, f"array tasks not spread over the nodes: {elements}"
    element, job_n2 = on["n2"][0], on["n2"][1]

    def caught() -> list[str] | None:  # freeze n2's task while it is inside a unit
        if not _markers(run, job_n2):
            return None
        lost_n2.freeze([job_n2])
        inside = _markers(run, job_n2)
        if inside:
            return inside
        lost_n2.thaw()  # the unit finished between the look and the stop: try the next one
        return None

    lost = _wait(caught, 120, "n2's task to start a unit", every=0.02)
    lost_n2.kill_slurmd()
    done_before = {p.relative_to(run / "done"): (p.read_bytes(), p.stat().st_mtime_ns)
                   for p in (run / "done").rglob("*.json")}
    _wait(lambda: any(r[0] == element and r[2] == "PENDING" for r in _squeue(array)), 120,
          "SLURM to requeue the task of the lost node")
    requeued_s = time.time() - lost_n2.at
    report = stain_status(run)
    stale = {f"{e['task']}/{e['unit']}" for e in report["stale"]}
    assert stale == set(lost) and report["state"] == "failed"
    assert all("requeued" in e["why"] for e in report["stale"])
    lost_n2.revive()
    _release_requeued(element)
    fuse = _submitit_job(run / "slurm-logs", fuse_id, tasks=1)
    assert "fused" in str(_results(fuse, 240)[0])
    print(f"\nlost units {sorted(lost)}; task requeued {requeued_s:.1f} s after the loss, "
          f"fused {time.time() - lost_n2.at:.1f} s after it")

    assert pending_units(run) == []  # no unit lost
    after = {p.relative_to(run / "done"): (p.read_bytes(), p.stat().st_mtime_ns)
             for p in (run / "done").rglob("*.json")}
    assert all(after[k] == v for k, v in done_before.items())  # nothing done was redone
    records = [p for proc in audit.processes() for p in proc["renames"]
               if "/done/axis-" in p]
    assert records and max(Counter(records).values()) == 1  # each unit completed once
    assert {str(Path(p).relative_to(run / "done")).removesuffix(".json") for p in records} == {
        str(k).removesuffix(".json") for k in after if str(k).startswith("axis-")}
    for axis in "zyx":
        assert np.array_equal(zarr.open_array(str(tmp_path / f"local/axis-{axis}.zarr"),
                                              mode="r")[:],
                              zarr.open_array(str(run / f"axis-{axis}.zarr"), mode="r")[:])
    fused = [zarr.open_group(str(d / "fused.ome.zarr"), mode="r")["0"][:]
             for d in (tmp_path / "local", run)]
    assert np.array_equal(fused[0], fused[1])


def _markers(run: Path, job: str) -> list[str]:
    """Units whose running marker names ``job`` (``axis-z/s0001`` …)."""
    out = []
    for path in (run / "running").glob("axis-*/*.json"):
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if str((marker.get("slurm") or {}).get("job_id")) == job:
            out.append(f"{path.parent.name}/{path.stem}")
    return sorted(out)
