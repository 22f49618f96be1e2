"""Teacher vs student generator throughput at a given thread count (issue #14's 2 threads).

    .venv/bin/python benchmarks/distill_threads.py TEACHER.pt STUDENT.pt --threads 2

Four 384² tiles per call (the default tiling's tile for 1024² planes), interleaved, best of 3.
"""

from __future__ import annotations

import argparse
import time

import torch

from hpcstain.inference import load_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("student")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gens = {"teacher": load_generator(args.teacher).fn,
            "student": load_generator(args.student).fn}
    x = torch.rand(4, 3, 384, 384) * 2 - 1
    best = dict.fromkeys(gens, float("inf"))
    for _ in range(3):
        for name, fn in gens.items():
            fn(x[:1])  # warm-up
            t = time.perf_counter()
            fn(x)
            best[name] = min(best[name], time.perf_counter() - t)
    mpx = {k: x.shape[0] * 384 * 384 / v / 1e6 for k, v in best.items()}
    print(f"threads {torch.get_num_threads()}: teacher {mpx['teacher']:.2f} Mpx/s, student "
          f"{mpx['student']:.2f} Mpx/s, ratio {mpx['student'] / mpx['teacher']:.2f}")


if __name__ == "__main__":
    main()
