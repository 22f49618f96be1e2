"""The smallest training config the tests use: a 4-wide, 1-block modified CycleGAN."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcstain.config import Config, load_config
from hpcstain.train.trainer import StopFlag

MICRO = ["data.patch_size=32", "data.patches_per_pair=4", "data.batch_size=2",
         "data.n_folds=0", "data.n_test=0", "model.ngf=4", "model.ndf=4", "model.n_blocks=1"]


def micro_config(manifest: str | Path, *extra: str) -> Config:
    """``modcyclegan-tiny`` shrunk further; ``extra`` overrides win."""
    return load_config("modcyclegan-tiny", [f"data.manifest={manifest}", *MICRO, *extra])


def untrained_generator_checkpoint(path: Path, **model: object) -> Path:
    """A tiny untrained generator (ngf 4, 1 block; ``model`` overrides ``cfg.model``
    fields) saved like a ``min-*.pt``."""
    from hpcstain.checkpoint import save_checkpoint
    from hpcstain.config import to_dict
    from hpcstain.models import architecture_of, build_model

    cfg = Config()
    cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks = 4, 4, 1
    for key, value in model.items():
        setattr(cfg.model, key, value)
    net = build_model(cfg.model, cfg.loss, "cpu", seed=0)
    return save_checkpoint(path, {"architecture": architecture_of(cfg.model),
                                  "config": to_dict(cfg), "model": net.generator_state_dict()})


def fails_after(fn: Callable[[Any], Any], calls: int) -> Callable[[Any], Any]:
    """``fn`` for its first ``calls`` calls, then RuntimeError("job killed") (a job killed
    part-way through a run)."""
    count = [0]

    def dies(batch: Any) -> Any:
        count[0] += 1
        if count[0] > calls:
            raise RuntimeError("job killed")
        return fn(batch)

    return dies



class StopAfter(StopFlag):
    """A stop flag that trips after ``n`` polls (one poll per training step), like SIGUSR1."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.polls, self.signum = n, 0, signal.SIGUSR1

    @property  # type: ignore[override]
    def requested(self) -> bool:
        self.polls += 1
        return self.polls >= self.n

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


# tiny distillation runs (tests/test_distill*.py): a small student, few patches and planes
MICRO_DISTILL = ["model.ngf=8", "model.n_blocks=1", "data.patch_size=32",
                 "data.patches_per_pair=4", "data.batch_size=4", "data.n_folds=0",
                 "data.n_test=1", "distill.slices_per_axis=3", "distill.mask_margin=2",
                 "data.min_mask_coverage=0.1", "train.checkpoint_every=0",
                 "train.log_every=1000"]
