"""Does the fuse disagreement map (issue #17 item 5) predict the real error on a phantom?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/confidence_study.py RUN_DIR PHANTOM.zarr \
        [--methods mean,consistency]

``RUN_DIR`` is a finished 3-axis stain run of the phantom volume ``PHANTOM.zarr`` (written by
``hpcstain phantom volume``: ``ct``, the truth ``stain`` and ``labels``). The run is fused
with each method into ``conf-<method>.ome.zarr`` (confidence on). The truth is normalised
into the model's colour space exactly as the fair 3D scoring does
(:func:`hpcstain.metrics.volume.prepare_reference`: §2.5 with label ROIs, sample mask);
the per-voxel error is the RMS over RGB of fused − normalised truth (uint8 units). Inside
the sample mask (voxels painted as background excluded) it prints the Spearman rank
correlation of disagreement vs error, the mean error per disagreement decile (ties broken
at random, seed 0) and the same correlation within each tissue label, as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import zarr
from scipy.stats import spearmanr

from hpcstain.metrics.volume import prepare_reference
from hpcstain.phantom.sample import LABELS
from hpcstain.volume import fuse_run
from hpcstain.volume.fuse import DISAGREEMENT


def study(run: Path, volume: str, method: str, reference, labels: np.ndarray) -> dict:
    out = f"conf-{method}.ome.zarr"
    shutil.rmtree(run / out, ignore_errors=True)
    shutil.rmtree(run / "done" / f"conf-{method}", ignore_errors=True)
    fuse_run(run, method=method, out=out)
    root = zarr.open_group(str(run / out), mode="r")
    rgb = np.moveaxis(np.asarray(root["0"][...]), 0, -1)[..., :3]
    conf = np.asarray(root[DISAGREEMENT]["0"][0])
    painted = np.all(rgb == 250, axis=-1) & (conf == 0)
    err = np.sqrt(((rgb.astype(np.float32) - reference.rgb.astype(np.float32)) ** 2).mean(-1))
    sel = reference.mask & ~painted
    e, d = err[sel], conf[sel].astype(np.float64)
    order = np.lexsort((np.random.default_rng(0).random(d.size), d))
    n = d.size // 10
    deciles = [float(e[order[k * n:(k + 1) * n]].mean()) for k in range(10)]
    names = {v: k for k, v in LABELS.items()}
    per_label = {}
    for code in np.unique(labels[sel]):
        m = sel & (labels == code)
        if m.sum() >= 1000:
            per_label[names[int(code)]] = {
                "fraction": round(float(m.sum() / sel.sum()), 3),
                "spearman": round(float(spearmanr(conf[m], err[m]).statistic), 3),
                "error": round(float(err[m].mean()), 1),
                "disagreement": round(float(conf[m].mean()), 1)}
    top = labels[sel][order[:n]]
    return {"voxels": int(sel.sum()), "painted_in_mask": round(float(
                (painted & reference.mask).sum() / reference.mask.sum()), 4),
            "spearman": round(float(spearmanr(d, e).statistic), 3),
            "error_mean": round(float(e.mean()), 1),
            "disagreement_median": float(np.median(d)),
            "error_by_decile": [round(v, 1) for v in deciles],
            "most_confident_decile_labels": {
                names[int(k)]: round(float(v / n), 3)
                for k, v in zip(*np.unique(top, return_counts=True), strict=True)},
            "per_label": per_label}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("volume")
    p.add_argument("--methods", default="mean")
    args = p.parse_args()
    group = zarr.open_group(args.volume, mode="r")
    truth, labels = group["stain"][:], group["labels"][:]
    reference = prepare_reference(truth.shape[:3], truth, labels=labels, ct=group["ct"][:])
    print(json.dumps({"run": str(args.run_dir), "volume": args.volume,
                      "mask_fraction": round(float(reference.mask.mean()), 3),
                      "methods": {m: study(args.run_dir, args.volume, m, reference, labels)
                                  for m in args.methods.split(",")}}, indent=1))


if __name__ == "__main__":
    main()
