"""Does a run's learned alignment field recover the phantom's known displacement?

    .venv/bin/python benchmarks/align_field.py RUN HELD_PAIRS_DIR --misalignment 3 \
        [--seed 202 --n 6 --size 128]

RUN is a ``bench_align.py`` run (``OUT/runs/s3-on``); HELD_PAIRS_DIR the held-out pairs
it was scored on (``OUT/pairs-s202-n6-128-m3``), re-rendered here with the same seed,
count, size and strength to capture each slide's true warp (the histology pixel ``p``
shows the CT position ``p + u(p)``; the 2× render grid averaged to slide pixels). Inside
each slide's mask it prints the mean true displacement, the mean error of the learned
field ``d = R(G(ct), hist)`` against ``u``, the mean learned ``|d|``, and the masked ℓ1
of G's output vs the normalised histology: unwarped, warped by ``d`` and warped by ``u``,
and the same three for the edge term of ``model.align_ngf`` (``edge_misfit`` of the CT vs
the histology; it does not involve G, so it shows whether a field finds the geometry).
A run without a registration net scores the zero field.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpcstain.phantom.pairs as pairs
from hpcstain.checkpoint import load_checkpoint
from hpcstain.config import from_dict
from hpcstain.data.manifest import read_manifest
from hpcstain.data.sampler import load_slide
from hpcstain.inference import generator_net
from hpcstain.models.gans import REGISTRATION
from hpcstain.models.registration import build_registration, edge_misfit, warp


def true_fields(seed: int, n: int, size: int, strength: float) -> list[np.ndarray]:
    """(2, H, W) true displacement (dy, dx) of every pair, in the order of write_pairs."""
    fields: list[np.ndarray] = []
    original = pairs._warp

    def spy(rng: np.random.Generator, labels: np.ndarray, scale: float,
            k: float = 1.0) -> Any:
        r, c = original(rng, labels, scale, k)
        h, w = labels.shape
        f = pairs.SUPERSAMPLE
        grid = (np.arange(f * h) + 0.5) / f - 0.5
        rr, cc = np.meshgrid(grid, grid[: f * w], indexing="ij")
        fields.append(np.stack([r - rr, c - cc]).reshape(2, h, f, w, f).mean(axis=(2, 4)))
        return r, c

    materials = pairs.allocate_materials(n, seed)
    sample_seeds = np.random.default_rng([int(seed), 0x5EED]).integers(0, 2**62, size=n)
    pairs._warp = spy  # type: ignore[assignment]
    try:
        for i in range(n):
            pairs.render_pair(materials[i], int(sample_seeds[i]), (size, size), seed, i, "z",
                              strength)
    finally:
        pairs._warp = original  # type: ignore[assignment]
    return fields


def masked_l1_sum(img: torch.Tensor, ref: torch.Tensor, m: torch.Tensor) -> float:
    return float(((img - ref).abs().mean(1)[0] * m).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("pairs", type=Path, help="the held-out pairs folder (with manifest.csv)")
    p.add_argument("--misalignment", type=float, required=True)
    p.add_argument("--seed", type=int, default=202)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.run / "checkpoints" / "latest.pt")
    cfg = from_dict(ckpt["config"])
    gen = generator_net(ckpt, "ct2hist", str(args.run), "cpu")
    reg = None
    if REGISTRATION in ckpt["model"]["generators"]:
        reg = build_registration(cfg.model.histology_channels, cfg.model.align_width)
        reg.load_state_dict(ckpt["model"]["generators"][REGISTRATION])
        reg.eval()
    fields = true_fields(args.seed, args.n, args.size, args.misalignment)
    sums = dict.fromkeys(("true", "error", "learned", "l1", "l1_d", "l1_u", "mask"), 0.0)
    edges: dict[str, list[float]] = {"0": [], "d": [], "u": []}  # per slide, averaged
    for pair, u in zip(read_manifest(args.pairs / "manifest.csv"), fields, strict=True):
        slide = load_slide(pair, cfg.data)
        ct = torch.from_numpy(slide.ct)[None, None].expand(1, cfg.model.ct_channels, -1, -1)
        hist = torch.from_numpy(slide.histology)[None]
        m = torch.from_numpy(slide.mask.astype(np.float32))
        ut = torch.from_numpy(u).float()
        with torch.no_grad():
            fake = gen(ct)
            d = reg(fake, hist)[0] if reg is not None else torch.zeros_like(ut)

            sums["l1"] += masked_l1_sum(fake, hist, m)
            sums["l1_d"] += masked_l1_sum(warp(fake, d[None]), hist, m)
            sums["l1_u"] += masked_l1_sum(warp(fake, ut[None]), hist, m)
            for name, field in (("0", torch.zeros_like(ut)), ("d", d), ("u", ut)):
                edges[name].append(edge_misfit(warp(ct, field[None]), hist, m[None, None])
                                   .item())
        sums["true"] += float((ut.norm(dim=0) * m).sum())
        sums["error"] += float(((d - ut).norm(dim=0) * m).sum())
        sums["learned"] += float((d.norm(dim=0) * m).sum())
        sums["mask"] += float(m.sum())
    k = {name: v / max(sums["mask"], 1.0) for name, v in sums.items()}
    print(f"{args.run.name}: inside the mask, true displacement {k['true']:.2f} px, field error "
          f"{k['error']:.2f} px, learned |d| {k['learned']:.2f} px; l1(G, hist) {k['l1']:.4f}"
          f" -> warped by d {k['l1_d']:.4f} (by the true field {k['l1_u']:.4f}); edge misfit "
          f"of the CT {np.mean(edges['0']):.4f} -> warped by d {np.mean(edges['d']):.4f} "
          f"(by the true field {np.mean(edges['u']):.4f})")


if __name__ == "__main__":
    main()
