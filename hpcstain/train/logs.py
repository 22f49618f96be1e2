"""Loss logs: one JSONL and one CSV row per step, TensorBoard when it is installed."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hpcstain.atomic import write_text_atomic


class LossLog:
    """Append-only per-step loss log; safe to reopen after a resume (rows past the
    resumed step are dropped so the log matches the restored state)."""

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.jsonl = run_dir / "losses.jsonl"
        self.csv = run_dir / "losses.csv"
        self._fields: list[str] | None = None
        self._truncate(resume_step)
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL/CSV are enough
                self._tb = None

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
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_losses(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
