"""Loss logs: one JSONL and one CSV row per step, TensorBoard when it is installed.

TensorBoard (``pip install 'hpcstain[tb]'``) event files go to ``RUN_DIR/tensorboard/``:
per step ``loss/<name>``, ``lr/<name>`` and ``time/<name>`` scalars; per epoch
``epoch/<name>`` (the epoch means the trainer keeps, validation included), ``lr/G`` and
``lr/D``, and an image ``samples``: CT / prediction / histology rows of the first
validation patches (else the first training patches, fixed at the first epoch end). On a
resume, events past the resumed step are purged. Without TensorBoard training runs
unchanged and one note says so.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.atomic import write_text_atomic

TB_DIR = "tensorboard"
TB_NOTE = ("note: TensorBoard not installed (pip install 'hpcstain[tb]'); losses are logged "
           "to losses.jsonl/.csv only")
SAMPLES = 4          # patches in the per-epoch image grid


def open_tensorboard(log_dir: Path, purge_step: int | None = None) -> Any:
    """A ``SummaryWriter`` for ``log_dir``, or None (with a one-line note) without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(TB_NOTE, file=sys.stderr, flush=True)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def scalar_tag(name: str) -> str:
    """TensorBoard tag of a per-step log column: ``lr/…``, ``time/…`` or ``loss/…``."""
    if name.startswith("lr"):
        return f"lr/{name}"
    if name.endswith("_s"):
        return f"time/{name}"
    return f"loss/{name}"


def image_grid(ct: Any, prediction: Any, histology: Any, gap: int = 2) -> np.ndarray:
    """(3, H, W) float32 in [0, 1]: rows CT (first channel, grey) / prediction / histology,
    one column per patch, from (N, C, h, w) tensors or arrays in [-1, 1]."""
    rows = []
    for images in (ct, prediction, histology):
        a = np.asarray(images.detach().float().cpu() if hasattr(images, "detach") else images,
                       dtype=np.float32)
        a = np.repeat(a[:, :1], 3, axis=1) if a.shape[1] != 3 else a
        rows.append(np.clip((a + 1.0) / 2.0, 0.0, 1.0))
    n, _, h, w = rows[0].shape
    grid = np.ones((3, 3 * h + 2 * gap, n * w + (n - 1) * gap), np.float32)
    for r, a in enumerate(rows):
        for c in range(n):
            grid[:, r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = a[c]
    return grid


class LossLog:
    """Append-only per-step loss log; safe to reopen after a resume (rows past the
    resumed step are dropped so the log matches the restored state)."""

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.jsonl = run_dir / "losses.jsonl"
        self.csv = run_dir / "losses.csv"
        self._fields: list[str] | None = None
        self._truncate(resume_step)
        self._tb: Any = None
        self._samples: dict[str, Any] | None = None
        if tensorboard:
            self._tb = open_tensorboard(run_dir / TB_DIR, resume_step + 1 if resume_step
                                        else None)

    def _truncate(self, step: int) -> None:
        if not self.jsonl.exists():
            return
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        rows = [r for r in rows if r.get("step", 0) <= step]
        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        if self.csv.exists():
            self.csv.unlink()
        self._fields = None
        for r in rows:
            self._write_csv(r)

    def _write_csv(self, row: dict[str, Any]) -> None:
        if self._fields is None:
            if self.csv.exists():
                with open(self.csv, newline="") as fh:
                    self._fields = next(csv.reader(fh), None) or list(row)
            else:
                self._fields = list(row)
                with open(self.csv, "w", newline="") as fh:
                    csv.DictWriter(fh, fieldnames=self._fields).writeheader()
        with open(self.csv, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._fields, extrasaction="ignore").writerow(row)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._write_csv(row)
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, int | float):
                    self._tb.add_scalar(scalar_tag(k), v, step)

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def epoch_end(self, step: int, means: Mapping[str, float],
                  lr: Mapping[str, float] | None = None, model: Any = None,
                  samples: Any = None) -> None:
        """TensorBoard only, at global ``step``: epoch means, learning rates, and (with
        ``model`` and a patch dataset ``samples``) the CT / prediction / histology grid of
        its first patches."""
        if self._tb is None:
            return
        for k, v in means.items():
            self._tb.add_scalar(f"epoch/{k}", v, step)
        for k, v in (lr or {}).items():
            self._tb.add_scalar(f"lr/{k}", v, step)
        if model is not None and samples is not None and len(samples):
            if self._samples is None:  # fixed from the first epoch end on
                import torch

                items = [samples[i] for i in range(min(SAMPLES, len(samples)))]
                self._samples = {k: torch.stack([it[k] for it in items])
                                 for k in ("ct", "ct_context", "histology") if k in items[0]}
            ct = self._samples["ct"].to(model.device)
            fake = model.stain(self._samples.get("ct_context", self._samples["ct"])
                               .to(model.device))
            self._tb.add_image("samples", image_grid(ct, fake, self._samples["histology"]),
                               step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_losses(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
