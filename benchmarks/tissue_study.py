"""Where is tissue information lost? (issue 28, items 2–3): train a recipe on phantom pairs,
stain + fuse held-out near-cubic phantom volumes (seeds and materials never trained on)
along z, y and x, and score their tissue classes with ``hpcstain score``.

    .venv/bin/python benchmarks/tissue_study.py --out /tmp/ts --name F2 --config tissue-cpu \\
        --steps 1000 --sigma 0 --train-seeds 101,103,102,104 --orientation mixed,volume
    .venv/bin/python benchmarks/tissue_study.py --out /tmp/ts --name B \\
        --config modcyclegan-cpu --target histology --steps 300 data.patch_size=96
    .venv/bin/python benchmarks/tissue_study.py --out /tmp/ts --name F2 --sigma 0 \\
        --checkpoint /tmp/ts/F2/run/checkpoints/latest.pt --held mg:9101,ti:9102 --tag=-fresh
    .venv/bin/python benchmarks/tissue_study.py --out /tmp/ts --report B,F2,F2:-fresh
    .venv/bin/python benchmarks/tissue_study.py --out /tmp/ts --quick      # smoke run

1. Pairs: ``hpcstain phantom pairs`` of ``--size``² for each ``--train-seeds`` seed
   (``--pairs-per-seed`` each, ``--orientation`` mixed = sections along z, y, x), merged
   into one manifest (absolute paths); ``--register`` co-registers them first
   (``hpcstain register``, what a user with real slides does). ``--target truth`` trains
   against the exact, aligned truth stain (``truth/<id>.png``) in the histology column:
   the upper bound of item 2;
   ``--target histology`` against the phantom's real (misaligned, artefacted) histology.
   ``--extra ti:N,peek:M,ti:K:tomo`` adds N more Ti and M more PEEK pairs and K Ti pairs
   through the physical CT chain (seeds 501, 502, …, one per item) against the phantom's
   7:1:2 ratio.
2. Train ``--config`` (+ overrides) for ``--steps`` optimiser steps on every pair
   (epochs and LR decay rescaled to end at the last step), ``OMP_NUM_THREADS`` threads.
3. Held-out volumes (``--held``, e.g. ``mg:9001,ti:9002``; seeds ≠ every training seed):
   ``hpcstain phantom volume``, ``hpcstain stain`` (z, y, x), ``hpcstain fuse`` (mean) and
   ``--single-axis z`` (the paper's slice-wise volume), ``hpcstain score`` of both.
4. One row per volume: tissue Dice per class (stain read with the truth palette), mean over
   soft tissue / bone / degradation layer / implant, the CT-threshold baseline, slice-wise
   z, BV/TV (fused, truth), and the z-stripe ratio of issue 28: the mean squared neighbour
   difference along z over that along y and x (mean), each relative to the truth's, inside
   the sample. OUT/NAME/results.json keeps everything.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HPCSTAIN = str(Path(sys.executable).with_name("hpcstain"))
CLASSES = ("soft_tissue", "bone", "new_bone", "degradation", "implant")


def sh(cmd: list[str], log: list[str]) -> None:
    text = " ".join(shlex.quote(c) for c in cmd)
    log.append(text)
    print(f"$ {text}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def make_pairs(root: Path, seed: int, n: int, size: int, orientation: str,
               log: list[str], ct_slab: int = 0, physics: str = "render") -> Path:
    slab = f"-slab{ct_slab}" if ct_slab else ""
    if physics == "tomo":  # the tomography chain scans z sections only
        orientation = "z"
    tag = "-tomo" if physics == "tomo" else ""
    folder = root / f"pairs-s{seed}-n{n}-{size}-{orientation}{slab}{tag}"
    if not (folder / "manifest.csv").exists():
        sh([HPCSTAIN, "phantom", "pairs", str(folder), "--n", str(n), "--seed", str(seed),
            "--size", str(size), str(size), "--orientation", orientation, "--overwrite",
            *(["--ct-slab", str(ct_slab)] if ct_slab else []),
            *(["--physics", "tomo"] if physics == "tomo" else [])], log)
    return folder / "manifest.csv"


def merge_manifests(sources: list[tuple[Path, str | None, int]], out: Path, target: str
                    ) -> int:
    """Rows of every manifest (only ``material`` when given, the first ``n`` of them when
    ``n``) with absolute paths; with ``target == "truth"`` the histology column names the
    exact truth stain."""
    rows: list[dict[str, str]] = []
    fields: list[str] = []
    for manifest, material, n in sources:
        kept = 0
        with manifest.open() as fh:
            reader = csv.DictReader(fh)
            for name in reader.fieldnames or []:
                if name not in fields:
                    fields.append(name)
            for row in reader:
                if (material and row.get("material") != material) or (n and kept >= n):
                    continue
                kept += 1
                for key in ("ct", "histology", "mask", "truth", "ct_slab"):
                    if row.get(key):
                        row[key] = str((manifest.parent / row[key]).resolve())
                row["id"] = f"{manifest.parent.name}-{row['id']}"
                if target == "truth":
                    row["histology"] = row["truth"]
                rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
    return len(rows)


def train_run(profile: str, manifest: Path, n_pairs: int, steps: int, run_dir: Path,
              extra: list[str]) -> dict[str, Any]:
    from hpcstain.config import load_config
    from hpcstain.train.trainer import train

    base = [f"data.manifest={manifest}", "data.n_folds=0", "data.n_test=0",
            "data.num_workers=0", "train.checkpoint_every=0", *extra]
    cfg = load_config(profile, base)
    per_epoch = max(n_pairs * cfg.data.patches_per_pair // cfg.data.batch_size, 1)
    epochs = max(math.ceil(steps / per_epoch), 1)
    ratio = (cfg.train.decay_epochs / cfg.train.epochs) if cfg.train.epochs else 0.5
    decay = min(round(ratio * epochs), epochs)
    over = [*base, f"train.max_steps={steps}", f"train.epochs={epochs}",
            f"train.decay_epochs={decay}"]
    cfg = load_config(profile, over)
    print(f"[tissue] train {profile} {' '.join(extra)}: {n_pairs} pairs, {steps} steps "
          f"({epochs} epochs, decay {decay}), patch {cfg.data.patch_size}, batch "
          f"{cfg.data.batch_size} → {run_dir}", flush=True)
    t = time.perf_counter()
    result = train(cfg, run_dir, progress=False)
    return {"profile": profile, "overrides": over, "steps": result.step,
            "train_s": round(time.perf_counter() - t, 1), "status": result.status,
            "patches_seen": result.step * cfg.data.batch_size,
            "patch_size": cfg.data.patch_size}


def z_stripe_ratio(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Issue 28's measure: per axis the mean squared neighbour difference of ``pred`` over
    the truth's (inside the sample, both voxels of a pair in it); z over mean(y, x)."""
    p, t = pred[..., :3].astype(np.float32), truth[..., :3].astype(np.float32)
    rel = {}
    for axis, name in enumerate("zyx"):
        sl0 = [slice(None)] * 3
        sl1 = [slice(None)] * 3
        sl0[axis], sl1[axis] = slice(0, -1), slice(1, None)
        m = mask[tuple(sl0)] & mask[tuple(sl1)]
        dp = ((p[tuple(sl1)] - p[tuple(sl0)]) ** 2).sum(-1)[m].mean()
        dt = ((t[tuple(sl1)] - t[tuple(sl0)]) ** 2).sum(-1)[m].mean()
        rel[name] = float(dp / max(dt, 1e-9))
    rel["z_over_yx"] = rel["z"] / (0.5 * (rel["y"] + rel["x"]))
    return rel


def held_volume(root: Path, material: str, seed: int, edge: int, log: list[str],
                physics: str = "render") -> Path:
    tag = "-tomo" if physics == "tomo" else ""
    path = root / f"held-{material}-s{seed}-{edge}{tag}.zarr"
    if not path.exists():
        sh([HPCSTAIN, "phantom", "volume", str(path), "--shape", str(edge), str(edge),
            str(edge), "--material", material, "--seed", str(seed),
            *(["--physics", "tomo"] if physics == "tomo" else [])], log)
    return path


def score_volume(vol: Path, checkpoint: Path, work: Path, log: list[str],
                 stain_args: list[str]) -> dict[str, Any]:
    import zarr

    from hpcstain.score import read_rgb

    st = work / "stain"
    sh([HPCSTAIN, "stain", f"{vol}:ct", "--checkpoint", str(checkpoint), "--out", str(st),
        "--axes", "z,y,x", "--overwrite", "--no-progress", *stain_args], log)
    sh([HPCSTAIN, "fuse", str(st), "--no-progress"], log)
    sh([HPCSTAIN, "fuse", str(st), "--single-axis", "z", "--out", "slicewise-z.ome.zarr",
        "--no-progress"], log)
    out: dict[str, Any] = {}
    group = zarr.open_group(str(vol), mode="r")
    labels = group["labels"][:]
    truth = group["stain"][:]
    mask = labels > 1
    for name, image in (("fused", "fused.ome.zarr"), ("slicewise_z", "slicewise-z.ome.zarr")):
        rep = work / f"score-{name}"
        sh([HPCSTAIN, "score", str(st / image), "--reference", str(vol), "--out", str(rep),
            "--overwrite"], log)
        summary = json.loads((rep / "summary.json").read_text())
        tissue = summary.get("tissue", {})
        out[name] = {"tissue": tissue, "stripe_ratio": summary.get("stripe_ratio"),
                     "psnr": summary.get("psnr")}
        pred = np.moveaxis(read_rgb(st / image)[:3], 0, -1) if read_rgb(
            st / image).shape[0] in (3, 4) else read_rgb(st / image)
        out[name]["stripes"] = z_stripe_ratio(pred, truth, mask)
    out["n_voxels"] = int(mask.sum())
    return out


def row_of(name: str, material: str, res: dict[str, Any]) -> dict[str, Any]:
    from hpcstain.metrics.tissue import CT_BASELINE, STAIN_TRUTH, TRUTH

    fused = res["fused"]["tissue"]["readings"] if "readings" in res["fused"]["tissue"] else \
        res["fused"]["tissue"]
    z = res["slicewise_z"]["tissue"].get("readings", res["slicewise_z"]["tissue"])
    f, c, t = fused[STAIN_TRUTH], fused[CT_BASELINE], fused[TRUTH]
    return {"name": name, "material": material, "n_voxels": res["n_voxels"],
            "dice": f["dice"], "mean": f["mean_dice_ct_separable"],
            "ct_dice": c["dice"], "ct_mean": c["mean_dice_ct_separable"],
            "z_mean": z[STAIN_TRUTH]["mean_dice_ct_separable"],
            "bv_tv": f["morphometry"]["bv_tv"], "bv_tv_truth": t["morphometry"]["bv_tv"],
            "bv_tv_z": z[STAIN_TRUTH]["morphometry"]["bv_tv"],
            "z_stripe": res["fused"]["stripes"]["z_over_yx"],
            "z_stripe_slicewise": res["slicewise_z"]["stripes"]["z_over_yx"]}


def fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("| run | vol | N vox | soft | bone | new bone | degr. | implant | mean4 | CT mean4 "
          "| CT bone | slice-z mean4 | BV/TV fused / z / truth | z-stripe fused / z |")
    print("|" + "---|" * 14)
    for r in rows:
        d, c = r["dice"], r["ct_dice"]
        print(f"| {r['name']} | {r['material']} | {r['n_voxels']} | "
              + " | ".join(fmt(d.get(k)) for k in CLASSES)
              + f" | **{fmt(r['mean'])}** | {fmt(r['ct_mean'])} | {fmt(c.get('bone'))} | "
              f"{fmt(r['z_mean'])} | {fmt(r['bv_tv'])} / {fmt(r['bv_tv_z'])} / "
              f"{fmt(r['bv_tv_truth'])} | {fmt(r['z_stripe'])} / "
              f"{fmt(r['z_stripe_slicewise'])} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="run")
    p.add_argument("--config", default="tissue-cpu")
    p.add_argument("--target", choices=("truth", "histology"), default="truth")
    p.add_argument("--register", action="store_true",
                   help="with --target histology: co-register the pairs first "
                   "(hpcstain register), as a user with real slides would")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--train-seeds", default="101,102,103")
    p.add_argument("--pairs-per-seed", type=int, default=16)
    p.add_argument("--extra", default="",
                   help="MATERIAL:N[:tomo],...: N more pairs of that material (seeds 501, 502, …; "
                   "through the physical CT chain with :tomo) on top of the 7:1:2 mix, e.g. "
                   "ti:12,peek:6,ti:8:tomo")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--ct-slab", type=int, default=0,
                   help="write K CT planes about each section (for model.context_slices=K)")
    p.add_argument("--orientation", default="mixed",
                   help="phantom pairs --orientation; a comma list is cycled over the seeds "
                   "(mixed,volume: sections through the implant and anywhere)")
    p.add_argument("--physics", default="render",
                   help="phantom pairs --physics per training seed, a comma list cycled "
                   "over the seeds (render,tomo: one checkpoint for both kinds of CT)")
    p.add_argument("--held", default="mg:9001,ti:9002",
                   help="MATERIAL:SEED[:tomo], comma-separated (tomo: the held-out volume "
                   "through the physical CT chain)")
    p.add_argument("--edge", type=int, default=128,
                   help="held-out volume edge (the phantom sample scales with the array: "
                   "keep it equal to --size, the training slides' edge)")
    p.add_argument("--sigma", type=float, default=1.0,
                   help="hpcstain stain --sigma: its 3D Gaussian of the CT in voxels "
                   "(1.0, the engine's default; 0 off)")
    p.add_argument("--tag", default="", help="suffix of the held-out result folders")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="score this checkpoint instead of training")
    p.add_argument("--report", default="",
                   help="only print the rows of these runs (comma-separated NAMEs in OUT)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.report:
        rows = []
        for n in args.report.split(","):  # NAME or NAME:TAG
            name, _, tag = n.partition(":")
            rows += [{**r, "name": name + tag} for r in json.loads(
                (args.out / name / f"results{tag}.json").read_text())["rows"]]
        print_rows(rows)
        return
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.quick:
        args.train_seeds, args.pairs_per_seed, args.size, args.steps = "101", 4, 64, 4
        args.edge, args.held = 32, "mg:9001"
        args.overrides = ["model.ngf=4", "data.patch_size=32", "data.patches_per_pair=2",
                          *args.overrides]
    log: list[str] = []
    seeds = [int(s) for s in args.train_seeds.split(",") if s]
    held = [(f[0], int(f[1]), f[2] if len(f) > 2 else "render")
            for f in (h.split(":") for h in args.held.split(","))]
    assert not {s for _, s, _ in held} & set(seeds), "held-out seeds must be unseen"
    root = args.out
    work = root / args.name
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.checkpoint is None:
        kinds = args.orientation.split(",")  # one per seed, cycled: e.g. mixed,volume
        physics = args.physics.split(",")
        sources: list[tuple[Path, str | None, int]] = [
            (make_pairs(root, s, args.pairs_per_seed, args.size, kinds[i % len(kinds)], log,
                        args.ct_slab, physics[i % len(physics)]), None, 0)
            for i, s in enumerate(seeds)]
        share = {"mg": 0.7, "ti": 0.1, "peek": 0.2}  # the phantom's mix: ask for enough
        for k, item in enumerate(f for f in args.extra.split(",") if f):
            material, n, *kind = item.split(":")  # MATERIAL:N[:tomo]
            folder = make_pairs(root, 501 + k, math.ceil(int(n) / share[material] * 1.3),
                                args.size, args.orientation, log, args.ct_slab,
                                kind[0] if kind else "render")
            sources.append((folder, material, int(n)))
        manifest = work / "manifest.csv"
        n_pairs = merge_manifests(sources, manifest, args.target)
        result["n_pairs"] = n_pairs
        if args.register:
            assert args.target == "histology", "--register co-registers the histology"
            reg = work / "registered"
            if not (reg / "manifest.csv").exists():
                sh([HPCSTAIN, "register", str(manifest), "--out", str(reg), "--quiet",
                    "--overwrite"], log)
            manifest = reg / "manifest.csv"
        result["train"] = train_run(args.config, manifest, n_pairs, args.steps,
                                    work / "run", args.overrides)
        print(f"[tissue] trained in {result['train']['train_s']} s on {n_pairs} pairs "
              f"({result['train']['patches_seen']} patches seen)", flush=True)
        checkpoint = work / "run" / "checkpoints" / "latest.pt"
    else:
        checkpoint = args.checkpoint
    rows = []
    t = time.perf_counter()
    for material, seed, kind in held:
        vol = held_volume(root, material, seed, args.edge, log, kind)
        label = material + ("-tomo" if kind == "tomo" else "")
        # one folder per volume (two volumes of one material no longer share one)
        res = score_volume(vol, checkpoint, work / f"held-{label}-s{seed}{args.tag}", log,
                           ["--sigma", str(args.sigma)])
        result[f"held_{label}"] = res
        rows.append(row_of(args.name, label, res))
    result["rows"] = rows
    result["score_s"] = round(time.perf_counter() - t, 1)
    result["commands"] = log
    (work / f"results{args.tag}.json").write_text(json.dumps(result, indent=2, default=str))
    print()
    print_rows(rows)
    print(f"\n[tissue] results: {work / f'results{args.tag}.json'}")


if __name__ == "__main__":
    main()
