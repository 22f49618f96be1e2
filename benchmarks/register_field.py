"""How well does ``hpcstain register`` recover the phantom's known misalignment?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/register_field.py --out /tmp/reg \
        [--strengths 0,3 --seed 202 --n 6 --size 256 --spacing 16]

For every strength S, ``--n`` phantom pairs of ``--size``² from ``--seed`` are rendered
(``hpcstain phantom pairs --misalignment S``, written under OUT once) with each slide's
true warp captured (``align_field.true_fields``: the histology pixel ``p`` shows the CT at
``p + u(p)``). ``fit_histology_warp`` fits ``e`` with ``registered(p) = hist(p + e(p))``,
so a perfect fit has ``e = -u`` to first order. Inside each slide's mask it prints the mean
true displacement, the mean residual ``|e + u|``, the mean ``|e|``, the mutual information
before and after, and the seconds per pair. Results: docs/results.md, "Co-registration".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align_field import true_fields

from hpcstain.data.coregister import fit_histology_warp
from hpcstain.data.manifest import read_manifest, read_pair
from hpcstain.phantom import write_pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the phantom pairs")
    p.add_argument("--strengths", default="0,3")
    p.add_argument("--seed", type=int, default=202)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--spacing", type=int, default=16)
    p.add_argument("--smooth", type=float, default=0.05)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| misalignment S | true displacement px | residual px | fitted |e| px | "
          "MI before → after | s per pair |")
    print("|---|---|---|---|---|---|")
    for s in (float(v) for v in args.strengths.split(",") if v.strip()):
        folder = args.out / f"pairs-s{args.seed}-n{args.n}-{args.size}-m{s:g}"
        if not (folder / "manifest.csv").exists():
            write_pairs(folder, args.n, seed=args.seed, size=(args.size, args.size),
                        misalignment=s)
        fields = true_fields(args.seed, args.n, args.size, s)
        rows = []
        for pair, u in zip(read_manifest(folder / "manifest.csv"), fields, strict=True):
            im = read_pair(pair)
            inside = im.mask if im.mask is not None else np.ones(u.shape[1:], bool)
            t = time.perf_counter()
            fit = fit_histology_warp(im.ct, im.histology, spacing=args.spacing,
                                     smooth=args.smooth)
            rows.append((np.hypot(*u)[inside].mean(), np.hypot(*(fit.field + u))[inside].mean(),
                         np.hypot(*fit.field)[inside].mean(), fit.mi_before, fit.mi_after,
                         time.perf_counter() - t))
        m = np.mean(rows, axis=0)
        print(f"| {s:g} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.3f} → {m[4]:.3f} | "
              f"{m[5]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
