"""The training loop, readable top to bottom: data → model → DDP → epochs → checkpoints.

One process per GPU (or one CPU process); ranks come from the environment (torchrun,
srun/submitit). Every rank draws different patches (DistributedSampler + per-index RNG),
gradients are averaged by DDP, rank 0 writes logs and checkpoints. SIGUSR1/SIGTERM (what
SLURM sends before a time limit or preemption) make every rank stop after the current step
and rank 0 write ``latest.pt``; re-running the same command resumes exactly there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from hpcstain.atomic import write_text_atomic
from hpcstain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from hpcstain.config import Config, dump_config, save_config, to_dict
from hpcstain.ct.cupping import fits_record
from hpcstain.data.folds import make_folds, split_for_fold, write_folds
from hpcstain.data.manifest import read_manifest
from hpcstain.data.sampler import (
    EpochSampler,
    PairedPatchDataset,
    load_slides,
    training_fits,
    with_context,
)
from hpcstain.device import announce, autocast_dtype
from hpcstain.errors import InputError
from hpcstain.metrics.tissue import training_palette
from hpcstain.models.build import build_model
from hpcstain.models.gans import check_architecture, generator_input
from hpcstain.train import distributed
from hpcstain.train.logs import LossLog
from hpcstain.train.runs import check_resume, check_split
from hpcstain.train.teacher import adopt_teacher, build_distill_data
from hpcstain.volume.rundir import worker_identity

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run the same command again to resume
WORKER_MARKER = "running.json"  # the process training the run (host, pid, SLURM job)


# --------------------------------------------------------------------------- small parts


class StopFlag:
    """Set by SIGUSR1/SIGTERM/SIGINT; the loop checks it after every step.

    [interrupts save] The first Ctrl-C (SIGINT) stops like SIGTERM: the step finishes and
    ``latest.pt`` is written; a second Ctrl-C exits at once (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.signals = tuple(signals or self.SIGNALS)
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt  # second Ctrl-C: at once, no checkpoint
            with contextlib.suppress(OSError):
                os.write(2, b"\nhpcstain: interrupt: finishing this step and writing "
                         b"checkpoints/latest.pt (Ctrl-C again to quit at once)\n")
        self.requested = True
        self.signum = signum

    def install(self) -> StopFlag:
        for sig in self.signals:
            with contextlib.suppress(ValueError):  # not the main thread: caller must poll
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def lr_lambda(epochs: int, decay_epochs: int) -> Callable[[int], float]:
    """Constant learning rate, then linear decay to zero over the last ``decay_epochs``."""
    flat = max(epochs - decay_epochs, 0)

    def factor(epoch: int) -> float:
        if decay_epochs <= 0 or epoch < flat:
            return 1.0
        return max(0.0, 1.0 - (epoch - flat + 1) / (decay_epochs + 1))

    return factor


AutocastFactory = Callable[[], contextlib.AbstractContextManager[Any]]


def autocast_factory(device: torch.device, amp: str) -> AutocastFactory:
    """Mixed precision on GPU (bf16 or fp16); plain fp32 elsewhere."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- result


@dataclass
class TrainResult:
    status: Literal["finished", "preempted", "max_steps"]
    epoch: int
    step: int
    run_dir: Path
    last_losses: dict[str, float] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "latest.pt"


# --------------------------------------------------------------------------- data


def build_data(cfg: Config, run_dir: Path, env: distributed.DistEnv
               ) -> tuple[Any, Any | None, EpochSampler, dict[str, Any]]:
    """Manifest → folds → normalised in-memory slides → patch dataset and sampler."""
    if cfg.model.variant == "distill":  # teacher-labelled CT of pairs and volumes
        return build_distill_data(cfg, run_dir, env)
    if not cfg.data.manifest:
        raise InputError("data.manifest: no pair manifest given (data.manifest=PATH)")
    pairs = read_manifest(cfg.data.manifest)
    folds = make_folds(pairs, n_folds=cfg.data.n_folds, n_test=cfg.data.n_test,
                       seed=cfg.data.seed)
    train_ids, val_ids = split_for_fold(folds, cfg.data.fold)
    check_split(run_dir, cfg.data.manifest, {"train_ids": list(train_ids),
                                             "val_ids": list(val_ids),
                                             "test_ids": list(folds.test_ids)})
    if env.is_main:
        write_folds(run_dir / "folds.json", folds)
    by_id = {p.id: p for p in pairs}
    cache = run_dir / "cache"
    if env.distributed and not env.is_main:
        distributed.barrier(env)  # rank 0 fills the shared mask cache; the others read it
    k = cfg.model.context_slices  # 2.5D: each slide's CT planes, normalised like it
    train_pairs = [by_id[i] for i in train_ids]
    train_slides = with_context(load_slides(train_pairs, cfg.data, cache), train_pairs,
                                cfg.data, k)
    dataset = PairedPatchDataset(train_slides, cfg.data, ct_channels=cfg.model.ct_channels,
                                 seed=cfg.data.seed, context_slices=k)
    fits = training_fits(train_slides)  # data.cupping radial: one fit per slide size
    val_set = None
    if val_ids and cfg.train.val_every > 0:  # validated as predict applies it: stored fits
        val_pairs = [by_id[i] for i in val_ids]
        val_slides = with_context(load_slides(val_pairs, cfg.data, cache, fits), val_pairs,
                                  cfg.data, k)
        val_set = PairedPatchDataset(val_slides, cfg.data, ct_channels=cfg.model.ct_channels,
                                     seed=cfg.data.seed + 1, augment=False, context_slices=k)
    if env.distributed and env.is_main:
        distributed.barrier(env)  # the mask cache is complete: the other ranks load now
    sampler = EpochSampler(dataset, env.world_size, env.rank, cfg.train.seed)
    info: dict[str, Any] = {"train_ids": list(train_ids), "val_ids": list(val_ids),
                            "test_ids": list(folds.test_ids)}
    if fits:  # into every checkpoint (train() takes it out of the split record)
        info["cupping_fits"] = fits_record(fits)
    info["palette"] = training_palette(train_pairs, train_slides)  # `morph`'s colour reading
    return dataset, val_set, sampler, info


def make_loader(dataset: Any, sampler: EpochSampler, cfg: Config, device: torch.device
                ) -> DataLoader:
    # Workers are re-forked every epoch (not persistent) so they see dataset.set_epoch().
    return DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler,
                      num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                      drop_last=True, persistent_workers=False,
                      worker_init_fn=_ignore_sigint if cfg.data.num_workers else None)


def _ignore_sigint(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process (it checkpoints, then they end)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool
              ) -> dict[str, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.to(device, non_blocking=True, memory_format=fmt)
            for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim == 4}


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: Any, val_set: Any, cfg: Config, device: torch.device) -> dict[str, float]:
    """Masked L1 of the CT→histology generator on fixed, un-augmented validation patches."""
    n = min(len(val_set), 64)
    total, weight = 0.0, 0.0
    for start in range(0, n, cfg.data.batch_size):
        items = [val_set[i] for i in range(start, min(start + cfg.data.batch_size, n))]
        batch = {k: torch.stack([it[k] for it in items]).to(device)
                 for k in ("ct", "ct_context", "histology", "mask") if k in items[0]}
        fake = model.stain(generator_input(batch)).float()
        m = batch["mask"]
        total += float(((fake - batch["histology"]).abs() * m).sum())
        weight += float(m.sum()) * fake.shape[1]
    return {"val_l1": total / max(weight, 1.0)}


# --------------------------------------------------------------------------- the loop


def train(cfg: Config, run_dir: str | Path, *, stop: StopFlag | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) the run in ``run_dir``; returns why the loop ended.

    [refuse before writing] A *new* run that fails before its first checkpoint (no
    manifest, a bad manifest row, too few patches, Ctrl-C while reading the data) leaves
    nothing behind: what it created is removed, so the corrected command starts it afresh
    instead of being refused as a changed resume.
    """
    run_dir = Path(run_dir)
    fresh = not (run_dir / "config.yaml").exists()
    before = set(run_dir.iterdir()) if fresh and run_dir.is_dir() else None
    try:
        return _train(cfg, run_dir, stop=stop, progress=progress)
    except BaseException:
        if fresh and _is_rank0() and not (run_dir / "checkpoints" / "latest.pt").exists():
            _forget_new_run(run_dir, before)
        raise


def _is_rank0() -> bool:
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key]) == 0
    return True


def _forget_new_run(run_dir: Path, before: set[Path] | None) -> None:
    """Remove what a failed new run created (the whole folder when it created it)."""
    import shutil

    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in set(run_dir.iterdir()) - before if run_dir.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@dataclass
class _Run:
    """One process's training state: data, model, optimisers and the counters that
    ``latest.pt`` holds. The phases of ``_train`` below read and advance it."""

    cfg: Config
    run_dir: Path
    env: distributed.DistEnv
    dataset: Any
    val_set: Any | None
    sampler: EpochSampler
    loader: DataLoader
    batches_per_epoch: int
    split: dict[str, Any]
    cupping_fits: list[Any]
    palette: dict[str, Any]  # {"palette": tissue colours} or {}
    model: Any
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LambdaLR
    sched_d: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    autocast: AutocastFactory = contextlib.nullcontext
    log: LossLog | None = None
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    minima: dict[str, dict[str, float]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)  # per-component sums of the epoch
    last: dict[str, float] = field(default_factory=dict)
    status: Literal["finished", "preempted", "max_steps"] = "finished"

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.ckpt_dir / "latest.pt"

    def result(self) -> TrainResult:
        return TrainResult(self.status, self.epoch, self.step, self.run_dir, self.last)


def _train(cfg: Config, run_dir: Path, *, stop: StopFlag | None, progress: bool
           ) -> TrainResult:
    """Set up, resume, then run epochs until done, stopped or at ``train.max_steps``."""
    cfg, env = _start_run(cfg, run_dir)
    run = _build_run(cfg, run_dir, env)
    if run.latest.exists():
        _resume(run)
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        run.model.wrap(lambda net: DDP(net, device_ids=ids))
    if cfg.train.compile:
        run.model.wrap(torch.compile)
    run.autocast = autocast_factory(env.device, cfg.train.amp)

    stop = (stop or StopFlag()).install()
    run.log = LossLog(run_dir, resume_step=run.step) if env.is_main else None
    if env.is_main:  # [status] who works on the run; `status` says "stopped" without one
        write_text_atomic(run_dir / WORKER_MARKER, json.dumps(worker_identity()) + "\n")
    if env.is_main:
        write_text_atomic(run_dir / "split.json", json.dumps(run.split, indent=2))
    try:
        if cfg.train.max_steps and run.step >= cfg.train.max_steps:  # re-run of a finished run
            return TrainResult("max_steps", run.epoch, run.step, run_dir, run.last)
        while run.epoch < cfg.train.epochs:
            stopped = _run_epoch(run, stop, progress)
            if stopped is not None:
                return stopped
            _end_epoch(run)
            if run.status == "max_steps" and run.epoch < cfg.train.epochs:
                return run.result()
            run.status = "finished"
        if env.is_main:
            write_text_atomic(run_dir / "DONE", dump_config(cfg))
        return run.result()
    finally:
        if run.log is not None:
            run.log.close()
        stop.restore()
        # A SLURM job preempted for a requeue keeps its marker: its job id stays queued.
        if env.is_main and not (run.status == "preempted" and os.environ.get("SLURM_JOB_ID")):
            (run_dir / WORKER_MARKER).unlink(missing_ok=True)


def _start_run(cfg: Config, run_dir: Path) -> tuple[Config, distributed.DistEnv]:
    """Refuse a changed resume, start the process group, write the run's config; returns
    the config as trained (a student takes its teacher's CT conventions)."""
    if cfg.model.variant == "distill":  # the student takes the teacher's CT conventions
        cfg = adopt_teacher(cfg)
    check_resume(run_dir, cfg)  # [refuse before writing] nothing of the run touched yet
    env = distributed.setup(cfg.train.device)
    if env.is_main:  # [device] the one start line: device, dtype, threads
        announce(str(env.device), autocast_dtype(cfg.train.amp))
    if env.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier(env)
    return cfg, env


def _build_run(cfg: Config, run_dir: Path, env: distributed.DistEnv) -> _Run:
    """Seed this rank, then build its data, loader, model, optimisers and schedulers."""
    seed_everything(cfg.train.seed + 1000 * env.rank)
    dataset, val_set, sampler, split = build_data(cfg, run_dir, env)
    cupping_fits = split.pop("cupping_fits", [])  # the training set's cupping fit(s)
    palette = {"palette": p} if (p := split.pop("palette", None)) else {}  # tissue colours
    if len(sampler.inner) < cfg.data.batch_size:
        raise InputError(f"{cfg.data.manifest}: too few patches per rank ({len(sampler.inner)}) "
                         f"for batch size {cfg.data.batch_size}")
    loader = make_loader(dataset, sampler, cfg, env.device)
    batches_per_epoch = len(sampler.inner) // cfg.data.batch_size

    model = build_model(cfg.model, cfg.loss, env.device, seed=cfg.train.seed, rank=env.rank)
    if cfg.train.channels_last and env.device.type == "cuda":
        for net in [*model.generators.values(), *model.discriminators.values()]:
            net.to(memory_format=torch.channels_last)
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g = torch.optim.Adam(model.parameters_g(), lr=cfg.train.lr, betas=betas)
    opt_d = torch.optim.Adam(model.parameters_d(), lr=cfg.train.lr, betas=betas)
    factor = lr_lambda(cfg.train.epochs, cfg.train.decay_epochs)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, factor)
    scaler = (torch.amp.GradScaler("cuda")
              if cfg.train.amp == "fp16" and env.device.type == "cuda" else None)
    return _Run(cfg, run_dir, env, dataset, val_set, sampler, loader, batches_per_epoch, split,
                cupping_fits, palette, model, opt_g, opt_d, sched_g, sched_d, scaler)


def _resume(run: _Run) -> None:
    """Load ``latest.pt``: weights, optimisers, schedulers, counters, this rank's RNG and
    image pools."""
    env = run.env
    ckpt = load_checkpoint(run.latest, map_location=env.device)
    check_architecture(ckpt["architecture"], run.cfg.model, source=str(run.latest))
    run.model.load_state_dict(ckpt["model"])
    run.opt_g.load_state_dict(ckpt["opt_g"])
    run.opt_d.load_state_dict(ckpt["opt_d"])
    run.sched_g.load_state_dict(ckpt["sched_g"])
    run.sched_d.load_state_dict(ckpt["sched_d"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.step, run.batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
    run.model.steps_done = run.step  # model.align_start counts from the run's first step
    run.minima = ckpt.get("minima", {})
    run.sums = dict(ckpt.get("epoch_sums", {}))
    set_rng_state(ckpt["rng"][min(env.rank, len(ckpt["rng"]) - 1)])
    pools = ckpt.get("pools_by_rank", [])
    if pools:  # same world size: every rank gets its own pools; else rank 0's
        own = pools[env.rank] if len(pools) == env.world_size else pools[0]
        for name, pool in run.model.pools.items():
            if name in own:
                pool.load_state_dict(own[name])
    if env.is_main:
        print(f"resuming {run.run_dir} at epoch {run.epoch}, step {run.step}", flush=True)


def _snapshot(run: _Run, reason: str) -> dict[str, Any]:
    """``latest.pt``'s contents; every rank must call it (the RNG and pool gathers)."""
    rngs = gather_object(rng_state(), run.env)
    pools = gather_object({n: p.state_dict() for n, p in run.model.pools.items()}, run.env)
    return {  # pools once, per rank, in pools_by_rank (not again in model)
        "architecture": run.model.architecture(), "config": to_dict(run.cfg),
        "model": run.model.state_dict(include=("generators", "discriminators")),
        "opt_g": run.opt_g.state_dict(),
        "opt_d": run.opt_d.state_dict(), "sched_g": run.sched_g.state_dict(),
        "sched_d": run.sched_d.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else {},
        "rng": rngs, "pools_by_rank": pools,
        "epoch": run.epoch, "step": run.step, "batch_in_epoch": run.batch_in_epoch,
        "minima": run.minima, "epoch_sums": dict(run.sums), "reason": reason,
        **({"cupping_fits": run.cupping_fits} if run.cupping_fits else {}), **run.palette,
    }


def _write_latest(run: _Run, reason: str) -> None:
    """Every rank snapshots; rank 0 writes ``latest.pt``; all wait for it."""
    payload = _snapshot(run, reason)  # every rank joins the RNG gather
    if run.env.is_main:
        save_checkpoint(run.latest, payload)
    distributed.barrier(run.env)


def _run_epoch(run: _Run, stop: StopFlag, progress: bool) -> TrainResult | None:
    """The steps of one epoch (from ``batch_in_epoch`` on a resume); a result when the run
    stops inside it (a signal, or ``train.max_steps`` before the epoch's last step), else
    None: the epoch's end-of-epoch work comes next."""
    cfg, env = run.cfg, run.env
    run.sampler.set_epoch(run.epoch, skip=run.batch_in_epoch * cfg.data.batch_size)
    run.dataset.set_epoch(run.epoch)
    bar = _progress(run.batches_per_epoch, run.batch_in_epoch, run.epoch, cfg, env, progress)
    t_wait = time.perf_counter()
    for batch in run.loader:
        t_step = time.perf_counter()
        _train_step(run, batch, t_step, t_step - t_wait, bar)
        stopping = distributed.any_rank(stop.requested, env)
        if stopping:
            _write_latest(run, f"signal {stop.signum}")
            run.status = "preempted"
            return run.result()
        if cfg.train.max_steps and run.step >= cfg.train.max_steps:
            run.status = "max_steps"
            if run.batch_in_epoch >= run.batches_per_epoch:
                break  # the epoch is complete: do its end-of-epoch work first
            _write_latest(run, "max_steps")
            return run.result()
        if cfg.train.checkpoint_every and run.step % cfg.train.checkpoint_every == 0:
            _write_latest(run, "periodic")
        t_wait = time.perf_counter()
    if bar is not None:
        bar.close()
    return None


def _train_step(run: _Run, batch: dict[str, Any], t_step: float, data_wait: float,
                bar: Any) -> None:
    """One optimisation step: losses averaged over the ranks, counters, log row, bar."""
    cfg, env = run.cfg, run.env
    batch_t = to_device(batch, env.device, cfg.train.channels_last)
    losses = run.model.train_step(batch_t, run.opt_g, run.opt_d, run.autocast, run.scaler)
    names = sorted(losses)
    mean = distributed.all_mean(
        torch.tensor([losses[k] for k in names], dtype=torch.float64,
                     device=env.device), env).tolist()
    run.last = last = dict(zip(names, mean, strict=True))
    run.step += 1
    run.batch_in_epoch += 1
    for k, v in last.items():
        run.sums[k] = run.sums.get(k, 0.0) + v
    step_s = time.perf_counter() - t_step
    if run.log is not None:
        run.log.write({"step": run.step, "epoch": run.epoch,
                       "lr": run.sched_g.get_last_lr()[0], **last,
                       "data_wait_s": round(data_wait, 6), "step_s": round(step_s, 6)})
    if bar is not None:
        bar.update(1)
        if run.step % max(cfg.train.log_every, 1) == 0:
            bar.set_postfix({k: f"{last[k]:.3f}" for k in _shown(last)})


def _end_epoch(run: _Run) -> None:
    """Epoch end: per-component epoch means (and validation) decide the paper's per-loss
    minima; log them, step the schedulers, write ``min-*.pt`` and ``latest.pt``."""
    cfg, env, model = run.cfg, run.env, run.model
    done = run.batch_in_epoch
    epoch_means = {k: v / max(done, 1) for k, v in run.sums.items()}
    if run.val_set is not None and (run.epoch + 1) % cfg.train.val_every == 0:
        epoch_means.update(validate(model, run.val_set, cfg, env.device))
    if run.log is not None:  # TensorBoard: epoch means, learning rates, sample grid
        run.log.epoch_end(run.step, epoch_means, {"G": run.sched_g.get_last_lr()[0],
                          "D": run.sched_d.get_last_lr()[0]}, model,
                          run.val_set if run.val_set is not None else run.dataset)
    run.epoch += 1
    run.batch_in_epoch = 0
    run.sums = {}
    run.sched_g.step()
    run.sched_d.step()
    improved = _update_minima(run.minima, epoch_means, run.epoch)
    if env.is_main:
        with open(run.run_dir / "epochs.jsonl", "a") as fh:
            fh.write(json.dumps({"epoch": run.epoch, **epoch_means}) + "\n")
        for name in improved:  # inference only: generators + conventions
            save_checkpoint(run.ckpt_dir / f"min-{name}.pt", {
                "architecture": model.architecture(), "config": to_dict(cfg),
                "model": model.generator_state_dict(), "epoch": run.epoch,
                "step": run.step, "minima": {name: run.minima[name]},
                "reason": f"minimum of {name}",
                **({"cupping_fits": run.cupping_fits} if run.cupping_fits else {}),
                **run.palette})
    _write_latest(run, "epoch")


def _update_minima(minima: dict[str, dict[str, float]], means: dict[str, float], epoch: int
                   ) -> list[str]:
    """Record new per-component minima (generator terms and validation), return which."""
    improved = []
    for name, value in means.items():
        if name.startswith("D_") or not math.isfinite(value):
            continue
        best = minima.get(name)
        if best is None or value < best["value"]:
            minima[name] = {"value": float(value), "epoch": float(epoch)}
            improved.append(name)
    return improved


def gather_object(obj: Any, env: distributed.DistEnv) -> list[Any]:
    """``obj`` of every rank (RNG states, image pools), so a resumed DDP run restores each
    rank's own stream; tensors come back on the CPU."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, _to_cpu(obj))
    return out


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _shown(losses: dict[str, float]) -> list[str]:
    keys = ["G_total", "D_hist", "pixel_ct2hist", "cycle_ct"]
    return [k for k in keys if k in losses]


def _progress(total: int, start: int, epoch: int, cfg: Config, env: distributed.DistEnv,
              enabled: bool) -> Any:
    if not (enabled and env.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                unit="it", dynamic_ncols=True, leave=False,
                disable=None)  # None: no bar when stderr is not a terminal (batch jobs, logs)
