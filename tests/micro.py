"""The smallest training config the tests use: a 4-wide, 1-block modified CycleGAN."""

from __future__ import annotations

from pathlib import Path

from hpcstain.config import Config, load_config

MICRO = ["data.patch_size=32", "data.patches_per_pair=4", "data.batch_size=2",
         "data.n_folds=0", "data.n_test=0", "model.ngf=4", "model.ndf=4", "model.n_blocks=1"]


def micro_config(manifest: str | Path, *extra: str) -> Config:
    """``modcyclegan-tiny`` shrunk further; ``extra`` overrides win."""
    return load_config("modcyclegan-tiny", [f"data.manifest={manifest}", *MICRO, *extra])
