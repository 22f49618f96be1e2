"""TensorBoard logging of training (hpcstain/train/logs.py): event files with the loss and
learning-rate scalars and a per-epoch CT / prediction / histology grid; training unchanged
when TensorBoard is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from micro import micro_config

from hpcstain.train.logs import TB_DIR, TB_NOTE, image_grid, read_losses
from hpcstain.train.trainer import train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpcstain.phantom import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs", n=4, seed=5, size=(64, 64))


def test_image_grid_layout() -> None:
    ct = -np.ones((2, 3, 4, 5), np.float32)            # black
    pred = np.zeros((2, 3, 4, 5), np.float32)          # mid grey
    hist = np.ones((2, 3, 4, 5), np.float32)           # white
    g = image_grid(ct, pred, hist, gap=2)
    assert g.shape == (3, 3 * 4 + 2 * 2, 2 * 5 + 2)
    assert g[:, :4, :5].max() == 0.0 and np.allclose(g[:, 6:10, 7:12], 0.5)
    assert g[:, 12:16].min() == 1.0


def test_training_writes_tensorboard_events(pairs: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = train(micro_config(pairs, "train.epochs=2", "train.checkpoint_every=0"), run,
                   progress=False)
    acc = EventAccumulator(str(run / TB_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/G_total", "loss/pixel_ct2hist", "loss/D_hist", "lr/lr", "lr/G",
                "lr/D", "epoch/G_total", "time/step_s"):
        assert tag in tags["scalars"], tag
    rows = read_losses(run)
    g_total = acc.Scalars("loss/G_total")
    assert [e.step for e in g_total] == [r["step"] for r in rows]
    assert np.allclose([e.value for e in g_total], [r["G_total"] for r in rows], rtol=1e-6)
    assert [e.step for e in acc.Scalars("epoch/G_total")] == [result.step // 2, result.step]
    images = acc.Images("samples")
    assert len(images) == 2
    assert images[0].height == 3 * 32 + 4 and images[0].width == 4 * 32 + 6


def test_training_runs_without_tensorboard(pairs: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    run = tmp_path / "run"
    result = train(micro_config(pairs, "train.epochs=1", "train.checkpoint_every=0"), run,
                   progress=False)
    assert result.status == "finished" and len(read_losses(run)) == result.step > 0
    assert not (run / TB_DIR).exists()
    assert capsys.readouterr().err.count(TB_NOTE) == 1
