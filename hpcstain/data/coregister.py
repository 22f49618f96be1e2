"""Co-registration of a pair: warp the histology onto its CT slice before training.

Real sections shrink, shear and warp against the CT slice they were cut from (docs/data.md,
"Misaligned pairs"). ``hpcstain register`` fits, per pair, a smooth field ``e`` that maps
the histology into the CT's geometry, ``registered = warp(histology, e)``
(:func:`hpcstain.models.registration.warp` conventions: ``registered(p) =
histology(p + e(p))``, pixels, (dy, dx)), and writes the warped slides as a new manifest.

The criterion is **mutual information** between the CT and each histology channel
(Parzen-window joint histograms, differentiable): it rewards any consistent mapping from
CT grey values to stain colours, so it needs neither a trained generator nor a guess of how
each tissue is stained. A photometric criterion against a generator's output (``model.align``)
lets the field hide the generator's colour errors; edges alone (``model.align_ngf``) are too
weak a signal on noisy slides (docs/results.md, "Learned alignment").

The field is an affine map plus a cubic-interpolated control grid (``spacing`` pixels), fitted
by Adam coarse-to-fine on an image pyramid (¼, ½, full working resolution; the working
resolution is the slide box-averaged to ≤ ``max_side`` pixels, so the cost does not grow
with a 4k slide), the affine part first. A fit that does not raise the mutual information
at the working resolution is discarded (identity field): an already aligned pair is left
as it is.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hpcstain.atomic import atomic_output, check_output
from hpcstain.data.manifest import OPTIONAL, REQUIRED, read_manifest, read_pair
from hpcstain.errors import InputError
from hpcstain.models.registration import smoothness, warp

BINS = 24                 # Parzen bins per image of the joint histograms
AFFINE_STEPS = ((4, 150), (2, 80))            # (pyramid factor, Adam steps)
DENSE_STEPS = ((4, 100), (2, 80), (1, 50))
AFFINE_LR, AFFINE_LR_DENSE, GRID_LR = 0.01, 0.002, 0.3
MIN_LEVEL_SIDE = 32       # pyramid levels smaller than this are skipped


@dataclass(frozen=True)
class Coregistration:
    """The fitted field of one pair and what it bought."""

    field: np.ndarray          # (2, H, W) float32, pixels (dy, dx): registered = warp(hist, field)
    mi_before: float           # mutual information CT vs histology (nats, summed over channels)
    mi_after: float
    accepted: bool             # False: the fit did not raise the MI, the field is zero

    @property
    def mean_shift(self) -> float:
        return float(np.hypot(self.field[0], self.field[1]).mean())

    @property
    def max_shift(self) -> float:
        return float(np.hypot(self.field[0], self.field[1]).max())


def min_max_scaled(img: Tensor) -> Tensor:
    """(B, C, H, W) → each image's channels stretched to [0, 1] between the 0.5/99.5 %iles."""
    flat = img.float().flatten(2)
    lo = torch.quantile(flat, 0.005, dim=2, keepdim=True)
    hi = torch.quantile(flat, 0.995, dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).view_as(img)


def _soft_bins(x: Tensor, bins: int) -> Tensor:
    """(B, N) in [0, 1] → (B, N, bins) Gaussian Parzen weights (σ half a bin), rows sum to 1."""
    centres = (torch.arange(bins, dtype=x.dtype, device=x.device) + 0.5) / bins
    w = torch.exp(-0.5 * ((x[..., None] - centres) * (2.0 * bins)) ** 2)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


def mutual_information(fixed: Tensor, moving: Tensor, bins: int = BINS) -> Tensor:
    """(B,) mutual information (nats) of ``fixed`` (B, 1, H, W) with each channel of
    ``moving`` (B, C, H, W), summed over the channels; both in [0, 1] (:func:`min_max_scaled`)."""
    n = fixed[0].numel()
    wa = _soft_bins(fixed.flatten(1), bins)                      # (B, N, bins)
    total = torch.zeros(fixed.shape[0], dtype=wa.dtype, device=wa.device)
    for c in range(moving.shape[1]):
        wb = _soft_bins(moving[:, c].flatten(1), bins)
        joint = wa.transpose(1, 2) @ wb / n                      # (B, bins, bins)
        pa, pb = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
        total = total + (joint * (torch.log(joint + 1e-10) - torch.log(pa * pb + 1e-10))
                         ).sum((1, 2))
    return total


class _Field:
    """Affine (2×3, normalised coordinates) + control grid (pixels) at working resolution."""

    def __init__(self, h: int, w: int, spacing: int) -> None:
        self.h, self.w = h, w
        self.affine = torch.zeros(2, 3, requires_grad=True)
        self.grid = torch.zeros(1, 2, max(2, math.ceil(h / spacing) + 1),
                                max(2, math.ceil(w / spacing) + 1), requires_grad=True)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                indexing="ij")
        self._coords = torch.stack([yy, xx, torch.ones_like(yy)])
        self._half = torch.tensor([h / 2.0, w / 2.0]).view(2, 1, 1)

    def at(self, factor: int) -> Tensor:
        """(1, 2, h/factor, w/factor) field in pixels of that level."""
        aff = (torch.einsum("ij,jhw->ihw", self.affine, self._coords) * self._half)[None]
        dense = aff + F.interpolate(self.grid, size=(self.h, self.w), mode="bicubic",
                                    align_corners=True)
        if factor == 1:
            return dense
        return F.avg_pool2d(dense, factor) / factor


def _pool(img: Tensor, factor: int) -> Tensor:
    return F.avg_pool2d(img, factor) if factor > 1 else img


def _working(img: np.ndarray, factor: int) -> Tensor:
    """(C, H, W) float array box-averaged by ``factor`` (cropped to a multiple) → (1, C, h, w)."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
    h, w = (t.shape[-2] // factor) * factor, (t.shape[-1] // factor) * factor
    return _pool(t[..., :h, :w], factor)


def fit_histology_warp(ct: np.ndarray, histology: np.ndarray, *, spacing: int = 16,
                       smooth: float = 0.05, max_side: int = 512,
                       seed: int = 0) -> Coregistration:
    """Fit the field that warps ``histology`` (H, W, C) onto ``ct`` (H, W); see the module.

    ``spacing``: control-point spacing in working-resolution pixels (smaller follows finer
    elastic warps, and fits noise sooner); ``smooth``: weight of the squared differences of
    neighbouring control points. Deterministic for given inputs and thread count.
    """
    if ct.ndim != 2 or histology.ndim != 3 or histology.shape[:2] != ct.shape:
        raise ValueError(f"CT {ct.shape} and histology {histology.shape}: expected (H, W) and "
                         "(H, W, C) of the same H, W")
    if min(ct.shape) < 8 or spacing < 2 or max_side < MIN_LEVEL_SIDE:
        raise ValueError(f"slide {ct.shape} must be >= 8 px, spacing {spacing} >= 2 and "
                         f"max_side {max_side} >= {MIN_LEVEL_SIDE}")
    torch.manual_seed(seed)
    big = max(ct.shape)
    factor = max(1, math.ceil(big / max_side))
    ct_w = min_max_scaled(_working(ct[None], factor))
    hist_w = min_max_scaled(_working(np.moveaxis(histology, -1, 0), factor))
    h, w = ct_w.shape[-2:]
    field = _Field(h, w, spacing)
    factors = {f for f, _ in AFFINE_STEPS + DENSE_STEPS} | {1}
    levels = {f: (_pool(ct_w, f), _pool(hist_w, f)) for f in sorted(factors, reverse=True)
              if f == 1 or min(h, w) // f >= MIN_LEVEL_SIDE}   # a tiny slide: full res only

    def misfit(f: int) -> Tensor:
        c, hs = levels[f]
        return -mutual_information(c, warp(hs, field.at(f))).mean()

    with torch.no_grad():
        before = float(-misfit(1))
    for stage, steps in (("affine", AFFINE_STEPS), ("dense", DENSE_STEPS)):
        groups = [{"params": [field.affine],
                   "lr": AFFINE_LR if stage == "affine" else AFFINE_LR_DENSE}]
        if stage == "dense":
            groups.append({"params": [field.grid], "lr": GRID_LR})
        opt = torch.optim.Adam(groups)
        for f, n in steps:
            if f not in levels:
                continue
            for _ in range(n):
                loss = misfit(f) + smooth * smoothness(field.grid)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        after = float(-misfit(1))
        d = field.at(1)
        if factor > 1:  # back to the slide's pixels (the cropped margin takes the edge value)
            d = F.interpolate(d * factor, scale_factor=factor, mode="bilinear",
                              align_corners=False)
            pad = (0, ct.shape[1] - d.shape[-1], 0, ct.shape[0] - d.shape[-2])
            d = F.pad(d, pad, mode="replicate")
    accepted = after > before
    out = d[0].numpy().astype(np.float32) if accepted else np.zeros((2, *ct.shape), np.float32)
    return Coregistration(out, before, after if accepted else before, accepted)


def apply_field(img: np.ndarray, field: np.ndarray, order: str = "bilinear") -> np.ndarray:
    """``img`` (H, W) or (H, W, C) resampled at ``p + field(p)``, same dtype (rounded and
    clipped for integer images); ``order`` "bilinear" or "nearest" (masks, labels)."""
    if order not in ("bilinear", "nearest"):
        raise ValueError(f"order {order!r}: expected 'bilinear' or 'nearest'")
    arr = np.asarray(img)
    chans = arr[..., None] if arr.ndim == 2 else arr
    t = torch.from_numpy(np.moveaxis(chans.astype(np.float32), -1, 0).copy())[None]
    disp = torch.from_numpy(np.ascontiguousarray(field, dtype=np.float32))[None]
    out = warp(t, disp, order)
    res = np.moveaxis(out[0].numpy(), 0, -1)
    res = res[..., 0] if arr.ndim == 2 else res
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        res = np.clip(np.rint(res), info.min, info.max)
    elif arr.dtype == bool:
        res = res > 0.5
    return res.astype(arr.dtype)


# --------------------------------------------------------------------------- manifests



def _file_stem(pair_id: str, used: set[str]) -> str:
    """A file name for ``pair_id``: path separators and odd characters become ``_``, and a
    name two ids would share gets a number."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", pair_id).strip(".") or "pair"
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def _boxes(boxes: tuple[tuple[int, int, int, int], ...]) -> str:
    return ";".join(f"{y0}:{y1},{x0}:{x1}" for y0, y1, x0, x1 in boxes)


def register_pairs(manifest: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   spacing: int = 16, smooth: float = 0.05, max_side: int = 512,
                   overwrite: bool = False,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Co-register every pair of ``manifest``; write ``out``/manifest.csv and the warped slides.

    ``out`` gets ``histology/<id>.png`` (the slide in the CT's geometry; ids are made safe
    as file names), ``mask/<id>.png`` and ``extra_masks/<id>-<k>.png`` for masks the pair
    gives (drawn on the slide, so warped with it, nearest neighbour), ``fields/<id>.npy``
    ((2, H, W) float32, pixels: the field of :func:`apply_field`) and ``register.json``
    (per pair: mutual information before and after, mean and largest shift, whether the
    fit was kept). CT, truth and CT slabs are not moved; the new manifest names them by
    absolute path. Every pair is read and checked first; the folder appears complete or
    not at all (nothing is overwritten without ``overwrite``). Returns the new manifest's
    path.
    """
    from PIL import Image

    out = check_output(out, overwrite)
    pairs = read_manifest(manifest)               # every bad row is one InputError, first
    extra_cols = sorted({k for p in pairs for k in p.extra})
    report: dict[str, Any] = {"manifest": str(Path(manifest).resolve()), "spacing": spacing,
                              "smooth": smooth, "max_side": max_side, "pairs": {}}
    rows = []
    used: set[str] = set()
    with atomic_output(out, overwrite) as tmp:
        for sub in ("histology", "mask", "extra_masks", "fields"):
            (tmp / sub).mkdir(parents=True)
        for pair in pairs:
            try:
                images = read_pair(pair)
            except InputError as exc:
                raise InputError(f"{pair.source or pair.id} (id {pair.id}): {exc}") from None
            fit = fit_histology_warp(images.ct, images.histology, spacing=spacing,
                                     smooth=smooth, max_side=max_side)
            stem = _file_stem(pair.id, used)
            row = {"id": pair.id, "material": pair.material, "ct": pair.ct,
                   "histology": f"histology/{stem}.png", "mask": "",
                   "truth": pair.truth or "", "extra_masks": "",
                   "bone_roi": _boxes(pair.bone_roi),
                   "background_roi": _boxes(pair.background_roi),
                   "ct_slab": pair.ct_slab or "", **pair.extra}
            warped = apply_field(images.histology, fit.field)   # float, 0-255 scale
            Image.fromarray(np.clip(np.rint(warped), 0, 255).astype(np.uint8)).save(
                tmp / row["histology"])
            if images.mask is not None:
                row["mask"] = f"mask/{stem}.png"
                m = apply_field(images.mask.astype(np.uint8) * 255, fit.field, "nearest")
                Image.fromarray(m).save(tmp / row["mask"])
            extras = []
            for k, em in enumerate(images.extra_masks):
                extras.append(f"extra_masks/{stem}-{k}.png")
                m = apply_field(em.astype(np.uint8) * 255, fit.field, "nearest")
                Image.fromarray(m).save(tmp / extras[-1])
            row["extra_masks"] = ";".join(extras)
            np.save(tmp / "fields" / f"{stem}.npy", fit.field)
            report["pairs"][pair.id] = {
                "mi_before": round(fit.mi_before, 4), "mi_after": round(fit.mi_after, 4),
                "mean_shift_px": round(fit.mean_shift, 3),
                "max_shift_px": round(fit.max_shift, 3), "accepted": fit.accepted,
                "field": f"fields/{stem}.npy"}
            rows.append(row)
            if progress is not None:
                progress(f"{pair.id}: mutual information {fit.mi_before:.3f} -> "
                         f"{fit.mi_after:.3f}, mean shift {fit.mean_shift:.2f} px, largest "
                         f"{fit.max_shift:.2f} px{'' if fit.accepted else ' (not kept)'}")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*REQUIRED, *OPTIONAL, *extra_cols],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (tmp / "manifest.csv").write_text(buf.getvalue())
        (tmp / "register.json").write_text(json.dumps(report, indent=2) + "\n")
    return out / "manifest.csv"
