"""Stored (checkpoint) vs per-slide vs set-level cupping fits for a data.cupping=radial model.

    python benchmarks/cupping_fit.py pairs OUT N SEED [--cupping 0.15]   # cupped 128² pairs
    python benchmarks/cupping_fit.py measure CKPT TEST_MANIFEST TRAIN_MANIFEST OUT [--patch 32]

``measure`` prints each slide's own fitted depth (train and test sets) against the stored
training fit, then evaluates CKPT on TEST_MANIFEST with ``--cupping-fit`` checkpoint, set and
slide (model vs truth / vs histology: mean SSIM and PSNR over the scored patches, per pair
and overall). Results in docs/results.md ("Which fit predict and evaluate apply").
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def write_cupped_pairs(out: str, n: int, seed: int, cupping: float) -> Path:
    import hpcstain.phantom.pairs as pairs
    import hpcstain.phantom.render as render

    old = render.CUPPING, pairs.CUPPING
    render.CUPPING = pairs.CUPPING = cupping   # axial sections: render's; oblique: pairs'
    try:
        return pairs.write_pairs(out, n, seed, size=(128, 128))
    finally:
        render.CUPPING, pairs.CUPPING = old


def patch_means(rows: list[dict[str, str]], ref: str, pair: str | None = None
                ) -> tuple[float, float, int]:
    sel = [r for r in rows if r["method"] == "model" and r["reference"] == ref
           and (pair is None or r["pair"] == pair)]
    return (float(np.mean([float(r["ssim"]) for r in sel])),
            float(np.mean([float(r["psnr"]) for r in sel])), len(sel))


def measure(ckpt: str, test: str, train: str, out: str, patch: int) -> None:
    from hpcstain.ct.cupping import fit_cupping, fit_slides
    from hpcstain.data.manifest import read_manifest, read_pair
    from hpcstain.evaluate import evaluate_manifest
    from hpcstain.inference import load_generator

    stored = load_generator(ckpt).conventions.stored_fits
    print("stored fit:", {f"{k[0]}×{k[1]}": round(v.depth) for k, v in stored.items()})
    for name, manifest in (("train", train), ("test", test)):
        cts = [read_pair(p).ct for p in read_manifest(manifest)]
        own = [fit_cupping(c).depth for c in cts]
        pooled = fit_slides(cts)
        print(f"{name}: per-slide depths {[round(d) for d in own]} (min {min(own):.0f}, "
              f"median {np.median(own):.0f}, max {max(own):.0f}); set fit "
              + ", ".join(f"{v.depth:.0f}" for v in pooled.values()))
    res: dict[str, dict[str, tuple[float, float, int]]] = {}
    for choice in ("checkpoint", "set", "slide"):
        d = Path(out) / choice
        evaluate_manifest(test, ckpt, d, patch=patch, cupping_fit=choice, log=print)
        with open(d / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        res[choice] = {ref: patch_means(rows, ref) for ref in ("truth", "histology")}
        res[choice].update({p: patch_means(rows, "truth", p)
                            for p in sorted({r["pair"] for r in rows})})
    print("| fit | model vs truth SSIM / PSNR | model vs histology SSIM / PSNR | patches |")
    for choice, r in res.items():
        t, h = r["truth"], r["histology"]
        print(f"| {choice} | {t[0]:.4f} / {t[1]:.2f} | {h[0]:.4f} / {h[1]:.2f} | {t[2]} |")
    for key in [k for k in res["checkpoint"] if k not in ("truth", "histology")]:
        a, b = res["checkpoint"][key], res["slide"][key]
        print(f"{key} vs truth, checkpoint − slide: SSIM {a[0] - b[0]:+.4f}, "
              f"PSNR {a[1] - b[1]:+.3f} dB ({a[2]} patches)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pairs")
    p.add_argument("out")
    p.add_argument("n", type=int)
    p.add_argument("seed", type=int)
    p.add_argument("--cupping", type=float, default=0.15)
    m = sub.add_parser("measure")
    for name in ("checkpoint", "test", "train", "out"):
        m.add_argument(name)
    m.add_argument("--patch", type=int, default=32)
    args = ap.parse_args()
    if args.verb == "pairs":
        print(write_cupped_pairs(args.out, args.n, args.seed, args.cupping))
    else:
        measure(args.checkpoint, args.test, args.train, args.out, args.patch)


if __name__ == "__main__":
    main()
