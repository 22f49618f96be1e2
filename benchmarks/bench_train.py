"""Training throughput on CPU: iterations/s and the share of step time spent waiting for data.

    .venv/bin/python benchmarks/bench_train.py [--steps 30] [--paper-steps 3] [--workers 2]

Trains the tiny and the paper-size modified CycleGAN for a few steps on phantom pairs and
reads the per-step timings the trainer logs (step_s, data_wait_s) from losses.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from hpcstain.config import load_config
from hpcstain.phantom import write_pairs
from hpcstain.train.logs import read_losses
from hpcstain.train.trainer import train


def measure(profile: str, manifest: Path, steps: int, workers: int, out: Path,
            extra: list[str]) -> dict[str, float]:
    cfg = load_config(profile, [f"data.manifest={manifest}", "data.n_folds=0", "data.n_test=0",
                                f"train.max_steps={steps}", f"data.num_workers={workers}",
                                "train.checkpoint_every=0", *extra])
    train(cfg, out, progress=False)
    rows = read_losses(out)[1:]  # the first step pays for worker start-up
    step = statistics.median(r["step_s"] for r in rows)
    wait = statistics.median(r["data_wait_s"] for r in rows)
    return {"it_per_s": 1.0 / (step + wait), "step_s": step, "data_wait_s": wait,
            "wait_fraction": wait / (step + wait), "patch": cfg.data.patch_size,
            "batch": cfg.data.batch_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--paper-steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_pairs(root / "pairs", n=4, seed=1, size=(384, 384))
        rows = [("modcyclegan-tiny", measure("modcyclegan-tiny", manifest, args.steps,
                                             args.workers, root / "tiny", [])),
                ("modcyclegan (paper size)", measure("modcyclegan", manifest,
                                                     args.paper_steps + 1, args.workers,
                                                     root / "paper", []))]
    print("| model | patch × batch | it/s | step s | data wait s | wait share |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['patch']}² × {r['batch']} | {r['it_per_s']:.2f} | "
              f"{r['step_s']:.3f} | {r['data_wait_s']:.4f} | {100 * r['wait_fraction']:.1f} % |")


if __name__ == "__main__":
    main()
