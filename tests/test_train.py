"""The trainer: learning signal, exact resume after a signal, DDP equals one process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from micro import StopAfter, micro_config

from hpcstain.checkpoint import load_checkpoint
from hpcstain.config import Config, save_config
from hpcstain.errors import InputError
from hpcstain.train.logs import read_losses
from hpcstain.train.trainer import EXIT_PREEMPTED, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpcstain.phantom import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs", n=5, seed=3, size=(96, 96))


def tiny(manifest: Path, *extra: str) -> Config:
    return micro_config(manifest, "train.epochs=2", "train.checkpoint_every=0", *extra)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "latest.pt")["model"]


def assert_same_model(a: dict, b: dict, atol: float = 0.0) -> None:
    flat_a = {k: v for k, v in _flatten(a)}
    flat_b = {k: v for k, v in _flatten(b)}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        if isinstance(flat_a[k], torch.Tensor) and flat_a[k].is_floating_point():
            torch.testing.assert_close(flat_a[k], flat_b[k], atol=atol, rtol=0, msg=k)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_run_writes_config_logs_and_checkpoints(pairs: Path, tmp_path: Path) -> None:
    cfg = tiny(pairs)
    result = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.status == "finished" and result.epoch == 2
    assert (run / "config.yaml").is_file() and (run / "DONE").is_file()
    rows = read_losses(run)
    assert [r["step"] for r in rows] == list(range(1, result.step + 1))
    assert {"G_total", "pixel_ct2hist", "cycle_ct", "D_hist"} <= set(rows[0])
    assert (run / "losses.csv").read_text().count("\n") == len(rows) + 1
    mins = sorted(p.name for p in (run / "checkpoints").glob("min-*.pt"))
    assert "min-pixel_ct2hist.pt" in mins and "min-G_total.pt" in mins
    ckpt = load_checkpoint(run / "checkpoints" / "min-pixel_ct2hist.pt")
    assert ckpt["architecture"]["ngf"] == 4


def test_resume_after_stop_equals_uninterrupted_run(pairs: Path, tmp_path: Path) -> None:
    cfg = tiny(pairs)
    straight = train(cfg, tmp_path / "a", progress=False)
    first = train(cfg, tmp_path / "b", stop=StopAfter(3), progress=False)
    assert first.status == "preempted" and first.step == 3
    assert load_checkpoint(tmp_path / "b/checkpoints/latest.pt")["reason"].startswith("signal")
    second = train(cfg, tmp_path / "b", progress=False)
    assert second.status == "finished" and second.step == straight.step
    la, lb = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    keys = [k for k in la[0] if k not in ("data_wait_s", "step_s")]
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb]
    assert_same_model(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_real_sigusr1_checkpoints_and_exits_75(pairs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny(pairs, "train.epochs=200")
    save_config(cfg, tmp_path / "cfg.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "hpcstain.cli", "train", "--config",
                             str(tmp_path / "cfg.yaml"), "--out", str(run), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "losses.jsonl").exists() and len(read_losses(run)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["reason"] == f"signal {int(signal.SIGUSR1)}"
    assert ckpt["step"] == len(read_losses(run)) >= 2
    assert "run the same command again to resume" in err


def test_changing_the_model_of_an_existing_run_is_refused(pairs: Path, tmp_path: Path) -> None:
    from hpcstain.errors import ConfigError
    from hpcstain.train.runs import resolve_run_config

    cfg = tiny(pairs, "train.max_steps=1")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="model.ngf"):
        resolve_run_config(tmp_path / "run", "modcyclegan-tiny", [f"data.manifest={pairs}"])
    again = resolve_run_config(tmp_path / "run", None, ["train.epochs=5"])
    assert again.train.epochs == 5 and again.model.ngf == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_ddp_matches_one_process_on_the_global_batch(pairs: Path,
                                                                   tmp_path: Path) -> None:
    common = ["train.max_steps=3"]
    one = tiny(pairs, "data.batch_size=4", *common)
    train(one, tmp_path / "single", progress=False)

    two = tiny(pairs, "data.batch_size=2", *common)
    save_config(two, tmp_path / "two.yaml")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "hpcstain.cli", "train", "--config",
             str(tmp_path / "two.yaml"), "--out", str(tmp_path / "ddp"), "--no-progress"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ls, ld = read_losses(tmp_path / "single"), read_losses(tmp_path / "ddp")
    assert len(ls) == len(ld) == 3
    for a, b in zip(ls, ld, strict=True):
        assert a["pixel_ct2hist"] == pytest.approx(b["pixel_ct2hist"], rel=1e-4)
        assert a["G_total"] == pytest.approx(b["G_total"], rel=1e-4)
    assert_same_model(weights(tmp_path / "single"), weights(tmp_path / "ddp"), atol=1e-4)


def test_rerunning_a_run_that_reached_max_steps_trains_no_further(pairs: Path,
                                                                  tmp_path: Path) -> None:
    cfg = tiny(pairs, "train.max_steps=2")
    assert train(cfg, tmp_path / "run", progress=False).step == 2
    again = train(cfg, tmp_path / "run", progress=False)
    assert again.status == "max_steps" and again.step == 2
    assert len(read_losses(tmp_path / "run")) == 2


def test_max_steps_at_an_epoch_end_still_does_the_epoch_end_work(pairs: Path,
                                                                   tmp_path: Path) -> None:
    per_epoch = train(tiny(pairs, "train.epochs=1"), tmp_path / "one", progress=False).step
    run = tmp_path / "run"
    first = train(tiny(pairs, f"train.max_steps={per_epoch}"), run, progress=False)
    assert first.status == "max_steps" and first.epoch == 1 and first.step == per_epoch
    assert (run / "epochs.jsonl").read_text().count("\n") == 1
    assert (run / "checkpoints" / "min-G_total.pt").is_file() and not (run / "DONE").exists()
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["epoch"] == 1
    # the last step of the last epoch: the run finishes (DONE) rather than stopping short
    last = train(tiny(pairs, f"train.max_steps={2 * per_epoch}"), run, progress=False)
    assert last.status == "finished" and last.epoch == 2 and (run / "DONE").is_file()
    assert (run / "epochs.jsonl").read_text().count("\n") == 2


def test_min_checkpoints_hold_only_generators_and_latest_holds_pools_once(
        pairs: Path, tmp_path: Path) -> None:
    from hpcstain.models import build_model_from_architecture

    run = tmp_path / "run"
    train(tiny(pairs), run, progress=False)
    best = load_checkpoint(run / "checkpoints" / "min-pixel_ct2hist.pt")
    assert set(best) == {"format", "architecture", "config", "model", "epoch", "step",
                         "minima", "reason", "palette"}  # no optimiser, scheduler, RNG, pools
    assert set(best["model"]) == {"generators"}
    assert set(best["model"]["generators"]) == {"ct2hist", "hist2ct"}
    model = build_model_from_architecture(best["architecture"], "cpu")
    model.load_state_dict(best["model"], generators_only=True)  # loads for inference
    ct = torch.zeros(1, 3, 32, 32)
    assert model.stain(ct).shape == (1, 3, 32, 32)
    with pytest.raises(InputError, match="discriminator"):
        model.load_state_dict(best["model"])  # not a training state

    latest = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert set(latest["model"]) == {"generators", "discriminators"}  # pools only per rank
    assert len(latest["pools_by_rank"]) == 1 and set(latest["pools_by_rank"][0]) == {"hist",
                                                                                     "ct"}
    assert {"opt_g", "opt_d", "sched_g", "sched_d", "rng"} <= set(latest)
