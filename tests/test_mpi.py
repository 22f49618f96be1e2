"""`mpirun -n N hpcstain stain --executor mpi` equals the in-process executor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _why_not() -> str | None:
    if shutil.which("mpirun") is None:
        return "no mpirun on PATH (Debian: openmpi-bin)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install 'hpcstain[mpi]')"
    return None


_WHY = _why_not()
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]


def test_mpi_ranks_stain_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    import zarr
    from micro import micro_config

    from hpcstain.phantom import write_pairs, write_volume_file
    from hpcstain.train.trainer import train

    manifest = write_pairs(tmp_path / "pairs", n=3, seed=4, size=(64, 64))
    cfg = micro_config(manifest, "data.patches_per_pair=2", "train.max_steps=1")
    train(cfg, tmp_path / "model", progress=False)
    ckpt = tmp_path / "model/checkpoints/latest.pt"
    vol = write_volume_file(tmp_path / "vol.zarr", (16, 40, 40), "ti", seed=3)
    common = [str(vol), "--checkpoint", str(ckpt), "--chunk", "16", "--tile", "32",
              "--step", "16", "--no-progress"]
    cli = [sys.executable, "-m", "hpcstain.cli", "stain"]
    # Same thread count on both sides: byte-equal float32 outputs need the same summation order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cli, *common, "--out", str(tmp_path / "local")], check=True,
                   capture_output=True, timeout=300, env=env)
    out = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3",
                          *cli, *common, "--out", str(tmp_path / "mpi"), "--executor", "mpi"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    # 7 slabs: 1 along z (16 deep), 3 along y and 3 along x (40 / 16); every rank stains
    assert out.stdout.count("stained 7 unit(s)") == 1  # rank 0 reports the whole run
    for axis in "zyx":
        a = zarr.open_array(str(tmp_path / f"local/axis-{axis}.zarr"), mode="r")[:]
        b = zarr.open_array(str(tmp_path / f"mpi/axis-{axis}.zarr"), mode="r")[:]
        assert np.array_equal(a, b), axis
    records = list((tmp_path / "mpi/done").rglob("*.json"))
    assert len(records) == 7
    # fuse's chunk groups on the same ranks (rank 0 prepares the image and the pyramid)
    fuse = [sys.executable, "-m", "hpcstain.cli", "fuse", "--no-progress", "--levels", "2"]
    subprocess.run([*fuse, str(tmp_path / "local")], check=True, capture_output=True,
                   timeout=300, env=env)
    out = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3",
                          *fuse, str(tmp_path / "mpi"), "--executor", "mpi"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("fused 9 new chunk(s)") == 1  # 1×3×3 chunks of 16
    for level in ("0", "1", "disagreement/0", "disagreement/1"):
        a = zarr.open_array(str(tmp_path / f"local/fused.ome.zarr/{level}"), mode="r")[:]
        b = zarr.open_array(str(tmp_path / f"mpi/fused.ome.zarr/{level}"), mode="r")[:]
        assert np.array_equal(a, b), level
