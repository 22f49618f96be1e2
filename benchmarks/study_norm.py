"""Stripes at the source (issue #13 item 4a): instance-norm statistics shared across slices.

Stains a phantom volume slice-wise along each axis with a checkpoint's generator, whole
planes per generator call, once with per-slice instance norm (the paper) and once per
``--sigmas`` value with the statistics smoothed over neighbouring slices
(:mod:`hpcstain.models.stack_norm`), and scores single-axis z and the 3-axis mean against
the phantom's truth in the model's colour space (:func:`hpcstain.metrics.volume.score_volume`).

    OMP_NUM_THREADS=1 python benchmarks/study_norm.py --checkpoint RUN/checkpoints/latest.pt \
        --volume phantom.zarr --sigmas 0,1,2,4 --out study-norm.json

The volume zarr is a ``hpcstain phantom volume`` output (arrays ct, stain, labels). The CT is
prepared exactly as ``stain`` prepares it (levels, Gaussian σ, §2.5 normalisation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def stain_axis(net: torch.nn.Module, ct: np.ndarray, axis: int, channels: int, sign: float,
               batch: int) -> np.ndarray:
    """(Z, Y, X) unit CT → (Z, Y, X, 3) uint8, whole planes along ``axis``, in order.

    ``batch`` ≥ the number of planes keeps the whole stack in one call (needed when the
    statistics are shared: the batch axis is the stacking axis).
    """
    from hpcstain.tiles import to_uint8

    stack = np.moveaxis(ct, axis, 0)
    outs = []
    with torch.inference_mode():
        for start in range(0, stack.shape[0], batch):
            x = torch.from_numpy(np.ascontiguousarray(stack[start:start + batch]))[:, None]
            y = net(sign * x.expand(-1, channels, -1, -1))
            outs.append(to_uint8(y.permute(0, 2, 3, 1).numpy()))
    return np.moveaxis(np.concatenate(outs), 0, axis)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--volume", required=True, help="phantom volume zarr (ct, stain, labels)")
    ap.add_argument("--sigmas", default="0,1,2,4")
    ap.add_argument("--ct-sigma", type=float, default=1.0,
                    help="3D Gaussian on the CT before staining (voxels; the paper's 1)")
    ap.add_argument("--out", default="study-norm.json")
    args = ap.parse_args()

    import zarr

    from hpcstain.checkpoint import load_checkpoint
    from hpcstain.ct.conventions import conventions_of
    from hpcstain.ct.prepare import prepare_block
    from hpcstain.inference import generator_net
    from hpcstain.metrics.volume import prepare_reference, score_volume
    from hpcstain.models.stack_norm import dependency_radius, share_statistics
    from hpcstain.volume import make_plan, open_volume
    from hpcstain.volume.fuse import fuse_mean

    ckpt = load_checkpoint(args.checkpoint)
    conv = conventions_of(ckpt)
    net = generator_net(ckpt, "ct2hist", args.checkpoint, "cpu")
    source = open_volume(f"{args.volume}:ct")
    plan = make_plan(source, chunk=64, axes="z,y,x", tile=256, step=192, window="hann",
                     sigma=args.ct_sigma, checkpoint=args.checkpoint)
    shape = source.shape
    ct = prepare_block(source, tuple(slice(0, n) for n in shape), plan.ct_recipe)
    group = zarr.open_group(args.volume, mode="r")
    ref = prepare_reference(shape, group["stain"][:], labels=group["labels"][:],
                            ct=group["ct"][:])
    sign = -1.0 if conv.invert_ct else 1.0
    rows: dict[str, dict] = {}
    for sigma in (float(s) for s in args.sigmas.split(",")):
        shared = share_statistics(net, sigma) if sigma > 0 else net
        t = time.perf_counter()
        per_axis = [stain_axis(shared, ct, a, conv.ct_channels, sign, batch=max(shape))
                    for a in range(3)]
        seconds = time.perf_counter() - t
        for name, pred in (("z", per_axis[0]), ("mean-zyx", fuse_mean(np.stack(per_axis)))):
            s = score_volume(pred, ref).summary
            key = f"{name} sigma={sigma:g} ct_sigma={args.ct_sigma:g}"
            rows[key] = {"psnr": s["psnr"], "psnr_calibrated": s["psnr_calibrated"],
                         "ssim": {f: s["planes"][f]["ssim"] for f in s["planes"]},
                         "stripe_ratio": s["stripe_ratio"], "stain_seconds_3axes": seconds,
                         "dependency_radius": dependency_radius(net, sigma)}
            r = rows[key]
            print(f"{key:22s} PSNR {r['psnr']:.2f} (cal. {r['psnr_calibrated']:.2f})  SSIM "
                  + " ".join(
                f"{f} {v:.3f}" for f, v in r["ssim"].items()) + "  stripes " + " ".join(
                f"{a} {v:.2f}" for a, v in r["stripe_ratio"].items()), flush=True)
    Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint,
                                          "volume": args.volume, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
