"""The 3D study: slice-wise z (the paper) against 2- and 3-axis fusions, scored fairly.

    .venv/bin/python benchmarks/study_3d.py --checkpoint CKPT --out study3d/ \
        [--shape 96 96 96] [--volumes mg:401,ti:402] [--quick]

For each held-out phantom volume (materials and seeds never trained on; near-cubic, as
real scans are), the volume engine stains every slice along z, y and x once with the CLI's
default tiling; every fusion of axis subsets is then computed from those per-axis outputs
and scored with :mod:`hpcstain.metrics.volume` against the §2.5-normalised truth inside the
sample mask: PSNR, SSIM per plane family and the stripe ratio per axis (1 = no excess
stripes). Orthoview PNGs of the truth and of every configuration go to ``--out``; the
markdown table is printed and written to ``--out/table.md``. A 2.5D checkpoint
(``model.context_slices`` k > 1) is fed its k planes per slice by the engine (the plan
takes k from the checkpoint), so the same command scores it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from paper_study import stain_axes

FUSIONS = [("z", "single"), ("z,y", "mean"), ("z,y,x", "mean"), ("z,y,x", "median"),
           ("z,y,x", "consistency"), ("y", "single"), ("x", "single")]


def study_volume(checkpoint: Path, out: Path, material: str, seed: int,
                 shape: tuple[int, int, int]) -> dict[str, Any]:
    import zarr

    from hpcstain.metrics.volume import prepare_reference, score_volume
    from hpcstain.phantom import write_volume_file
    from hpcstain.tiles import DEFAULT_TILING
    from hpcstain.volume import make_plan, open_volume
    from hpcstain.volume.fuse import fuse_block

    name = f"{material}-{seed}"
    vol = out / f"{name}.zarr"
    if not vol.exists():
        write_volume_file(vol, shape, material, seed=seed)
    group = zarr.open_group(str(vol), mode="r")
    reference = prepare_reference(shape, group["stain"][:], labels=group["labels"][:],
                                  ct=group["ct"][:])
    t = DEFAULT_TILING
    plan = make_plan(open_volume(f"{vol}:ct"), chunk=64, axes="z,y,x", tile=t.tile,
                     step=t.step, window=t.window, max_tile=t.max_tile, sigma=1.0,
                     checkpoint=str(checkpoint))
    preds, per_axis_s = stain_axes(out / f"{name}-stain", plan)
    rows = []
    for axes_text, method in FUSIONS:
        axes = tuple(axes_text.split(","))
        rgb = fuse_block(np.stack([preds[a] for a in axes]), tuple("zyx".index(a) for a in axes),
                         "mean" if method == "single" else method)
        s = score_volume(rgb, reference).summary
        rows.append({"axes": axes_text, "method": method, "psnr": s["psnr"],
                     "psnr_cal": s["psnr_calibrated"],
                     **{f"ssim_{f}": s["planes"][f]["ssim"] for f in ("xy", "xz", "yz")},
                     **{f"stripe_{a}": s["stripe_ratio"][a] for a in "zyx"},
                     "stain_s": round(per_axis_s * len(axes), 1)})
        save_orthoview(rgb, out / f"{name}-orthoview-{axes_text.replace(',', '')}-{method}.png")
    save_orthoview(reference.rgb, out / f"{name}-orthoview-truth.png")
    return {"volume": name, "shape": list(shape), "rows": rows,
            "mask_fraction": reference.info["mask_fraction"]}


def save_orthoview(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    from hpcstain.view import orthoviews

    Image.fromarray(orthoviews(rgb)).save(path)


def fmt(v: Any, digits: int) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| volume | axes | fusion | PSNR | PSNR cal. | SSIM XY | SSIM XZ | SSIM YZ | "
             "stripe z | stripe y | stripe x | stain s |", "|" + "---|" * 12]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {res['volume']} | {r['axes']} | {r['method']} | "
                         f"{fmt(r['psnr'], 2)} | {fmt(r.get('psnr_cal'), 2)} | "
                         f"{fmt(r['ssim_xy'], 3)} | "
                         f"{fmt(r['ssim_xz'], 3)} | {fmt(r['ssim_yz'], 3)} | "
                         f"{fmt(r['stripe_z'], 2)} | {fmt(r['stripe_y'], 2)} | "
                         f"{fmt(r['stripe_x'], 2)} | {r['stain_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    p.add_argument("--volumes", default="mg:401,ti:402", help="material:seed,...")
    p.add_argument("--quick", action="store_true", help="32³ volumes (a smoke run)")
    args = p.parse_args()
    shape = (32, 32, 32) if args.quick else tuple(args.shape)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for item in args.volumes.split(","):
        material, seed = item.split(":")
        results.append(study_volume(args.checkpoint, args.out, material, int(seed), shape))
    text = table(results)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text, end="")


if __name__ == "__main__":
    main()
