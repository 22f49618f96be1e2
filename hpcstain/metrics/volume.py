"""Scores of a stained volume in the model's colour space: PSNR, SSIM per plane family,
stripe ratios per axis and slice profiles (pure functions over in-memory arrays).

The model outputs §2.5-normalised colours (white-balanced, contrast-stretched histology
space), so the reference stain is put through the same normalisation before any
comparison, as the 2D ``evaluate`` does for the phantom truth: white balance from the mean
colour of the reference's background ROI, one stretch between ``f_min`` (1st percentile of
bone) and ``f_max`` (99th percentile of background). ROIs: from phantom labels (bone =
``BONE_LABELS``, which hold lacunae and vessels as the 2D auto-ROIs do; background = the
resin/air label), else from the CT and the reference (:func:`find_pair_rois`), else from the
reference alone (slide background; all stained tissue stands in for bone).

Everything is scored inside a **sample mask**: from labels (everything but resin/air and
the tube wall), else from the CT (above the lowest of three multi-Otsu classes, or above a
given threshold), else the whole volume.

Definitions (V a (Z, Y, X[, C]) volume, M the mask, e_a the unit step along axis a):

* ``E_a(V)`` = mean over voxel pairs (v, v + e_a) with *both* voxels in M of
  ``|V(v + e_a) - V(v)|²`` (averaged over channels): the first-difference energy along a.
* **stripe ratio** along a, with a reference R: ``E_a(P) / E_a(R)``. 1 = as smooth as the
  truth along that axis; per-slice offsets or flicker along a push it above 1; blur below.
* **anisotropy** ``A_a(V) = E_a(V) / mean_{b≠a} E_b(V)`` (the masked stripe index of
  :mod:`hpcstain.metrics.stripes`); it is scale-free, so any linear map of V (gain, offset,
  hence any CT normalisation) leaves it unchanged.
* **stripe ratio without a reference**: ``A_a(P) / A_a(CT)`` - the prediction's excess
  directional roughness over that of the CT it was stained from (the CT's own anisotropy,
  from the sample's structure and the scanner's noise, is what a slice-consistent stain
  inherits). Without a CT either: ``A_a(P)`` alone.
* PSNR (L = 255): pooled over all masked voxels (inf when equal); per plane family, the
  mean over slices holding mask voxels of each slice's masked PSNR (capped at
  ``PSNR_CAP``).
* **colour-calibrated PSNR**: the PSNR after the per-channel affine map ``a_c·P + b_c``
  (clipped to [0, 255]) that best fits the prediction to the reference over the masked
  voxels (least squares). A global colour cast (gain, offset per channel) costs nothing
  here, so what is left is structure: where each tissue is and how it is stained relative
  to the others. Reported beside the plain PSNR, never instead of it.
* SSIM per plane family (XY = z-slices, XZ = y-slices, YZ = x-slices): the
  scikit-image-exact SSIM map of :mod:`hpcstain.metrics.similarity` (7×7 window, border of
  3 cropped, channel mean) of every slice, averaged over the masked pixels of all slices
  (a slice weighs by its mask area). Outside the mask both volumes take one fill colour
  (the reference's mean background colour), so voxels outside never change a score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from hpcstain.ct.levels import volume_levels
from hpcstain.ct.outside import OUTSIDE_TEST, outside_of_sample
from hpcstain.data.normalise import (
    Rois,
    Stretch,
    apply_stretch,
    find_pair_rois,
    histology_stretch,
    signed_to_rgb8,
    slide_background,
)
from hpcstain.errors import InputError
from hpcstain.geometry import AXES
from hpcstain.metrics.similarity import WIN_SIZE, ssim_map
from hpcstain.phantom.sample import BONE_LABELS, LABELS

FAMILIES = (("xy", 0), ("xz", 1), ("yz", 2))    # plane family → the axis slicing it
PSNR_CAP = 100.0
GROUP = 8                                        # slices per SSIM filtering pass
BACKGROUND_LABEL = LABELS["background"]         # resin / air
OUTSIDE_LABELS = (LABELS["background"], LABELS["tube"])
DARK_FRACTION = 0.35                             # opaque implant: < 35 % of background light


# --------------------------------------------------------------------------- inputs


def as_rgb_volume(volume: np.ndarray, what: str = "volume") -> np.ndarray:
    """(Z, Y, X, 3|4) or (3|4, Z, Y, X) → uint8 (Z, Y, X, 3) (alpha dropped)."""
    a = np.asarray(volume)
    if a.ndim != 4 or (a.shape[-1] not in (3, 4) and a.shape[0] not in (3, 4)):
        raise InputError(f"{what}: expected an RGB(A) volume (Z, Y, X, 3|4) or "
                         f"(3|4, Z, Y, X), got shape {a.shape}")
    if a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        if a.dtype.kind not in "uif":
            raise InputError(f"{what}: expected a numeric volume, got {a.dtype}")
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if min(a.shape[:3]) < 2:
        raise InputError(f"{what}: need at least 2 voxels per axis, got shape {a.shape[:3]}")
    return np.ascontiguousarray(a)


def _check_shape(arr: np.ndarray | None, shape: tuple[int, ...], what: str) -> None:
    if arr is not None and tuple(arr.shape[:3]) != tuple(shape):
        raise InputError(f"{what} has shape {tuple(arr.shape[:3])}, the prediction "
                         f"{tuple(shape)}")


def sample_mask(shape: tuple[int, int, int], labels: np.ndarray | None = None,
                ct: np.ndarray | None = None, ct_threshold: float | str | None = "auto"
                ) -> tuple[np.ndarray, str]:
    """(mask, how): labels ≠ resin/air/tube; else CT above a threshold; else everything.

    ``ct_threshold``: ``"auto"`` (:func:`ct_sample_mask`: fuse's outside test at the levels
    the CT itself reads), a number (raw CT units), or None (no CT mask).
    """
    if labels is not None:
        return ~np.isin(labels, OUTSIDE_LABELS), "labels"
    if ct is not None and ct_threshold is not None:
        if ct_threshold == "auto":
            return ct_sample_mask(ct)
        t = float(ct_threshold)
        return ct > t, f"ct > {t:.6g}"
    return np.ones(shape, dtype=bool), "all"


def ct_sample_mask(ct: np.ndarray) -> tuple[np.ndarray, str]:
    """[issue 23] (mask, how): the sample of a CT alone, as ``stain`` and ``fuse`` would see
    it: the CT's own levels (:func:`hpcstain.ct.levels.volume_levels`, the reading ``stain``
    plans with), then fuse's outside test (:func:`hpcstain.ct.outside.outside_of_sample`).
    Where the levels cannot be read with confidence, the lowest of three multi-Otsu
    thresholds instead, and ``how`` says why (a mask for scoring, not a stain: nothing is
    painted from it)."""
    try:
        est = volume_levels(ct)
        why = "levels ambiguous" if est.ambiguous else ""
    except InputError as exc:
        est, why = None, str(exc).split(";")[0]
    if est is not None and not est.ambiguous:
        whole = tuple(slice(0, int(n)) for n in ct.shape)
        outside = outside_of_sample(np.asarray(ct), whole, whole, est.levels)
        return ~outside, (f"fuse's outside test ({OUTSIDE_TEST}) at the CT's levels "
                          f"{est.bone:.6g} / {est.background:.6g}")
    from skimage.filters import threshold_multiotsu

    sample = np.asarray(ct[::2, ::2, ::2], dtype=np.float64)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        return np.ones(ct.shape, dtype=bool), "all (flat CT)"
    t = float(threshold_multiotsu(np.clip(sample, lo, hi), classes=3)[0])
    return ct > t, f"ct > {t:.6g} (multi-Otsu; {why})"


def reference_rois(reference: np.ndarray, labels: np.ndarray | None = None,
                   ct: np.ndarray | None = None) -> Rois:
    """Bone and background ROIs of a reference stain volume (for §2.5)."""
    if labels is not None:
        background = labels == BACKGROUND_LABEL
        if not background.any():
            background = np.isin(labels, OUTSIDE_LABELS)
        return Rois(np.isin(labels, BONE_LABELS), background, "labels")
    if ct is not None:
        return find_pair_rois(ct, reference)
    bg = ndimage.binary_opening(slide_background(reference), iterations=1)
    colour = np.median(reference[bg], axis=0) if bg.any() else reference.reshape(-1, 3).max(0)
    dark = reference.max(axis=-1) < DARK_FRACTION * float(colour.max())
    tissue = ~ndimage.binary_dilation(bg, iterations=2) & ~ndimage.binary_dilation(dark)
    return Rois(tissue, ndimage.binary_erosion(bg, iterations=2), "auto-reference")


def normalise_reference(reference: np.ndarray, rois: Rois, c: float = 0.0,
                        c_prime: float = 0.0) -> tuple[np.ndarray, Stretch]:
    """Raw reference RGB → uint8 in the model's §2.5 space, with its constants."""
    for name in ("bone", "background"):
        if not getattr(rois, name).any():
            raise InputError(f"reference: empty {name} ROI ({rois.method}); cannot "
                             "normalise (give labels, or --no-normalise)")
    stretch = histology_stretch(reference, rois, c, c_prime)
    return signed_to_rgb8(apply_stretch(reference, stretch)), stretch


@dataclass
class Reference:
    """What a prediction is scored against: normalised stain (or none), mask, CT."""

    rgb: np.ndarray | None          # uint8 (Z, Y, X, 3) in the model's colour space
    mask: np.ndarray                # bool (Z, Y, X)
    ct: np.ndarray | None = None
    fill: np.ndarray = field(default_factory=lambda: np.full(3, 255, np.uint8))
    info: dict[str, Any] = field(default_factory=dict)


def prepare_reference(shape: tuple[int, int, int], reference: np.ndarray | None = None, *,
                      labels: np.ndarray | None = None, ct: np.ndarray | None = None,
                      mask: np.ndarray | None = None, normalise: bool = True,
                      stretch_c: float = 0.0, stretch_c_prime: float = 0.0,
                      ct_threshold: float | str | None = "auto") -> Reference:
    """Normalise the reference (§2.5) and build the sample mask, once for many predictions."""
    shape = tuple(int(n) for n in shape[:3])  # type: ignore[assignment]
    rgb = None if reference is None else as_rgb_volume(reference, "reference")
    for arr, what in ((rgb, "reference"), (labels, "labels"), (ct, "CT"), (mask, "mask")):
        _check_shape(arr, shape, what)
    if mask is not None:
        m, how = np.asarray(mask, dtype=bool), "given"
    else:
        m, how = sample_mask(shape, labels, ct, ct_threshold)
    if not m.any():
        raise InputError(f"sample mask ({how}) is empty")
    info: dict[str, Any] = {"mask": how, "mask_fraction": float(m.mean()),
                            "reference": "none" if rgb is None else "given",
                            "normalised": False}
    fill = np.full(3, 255, np.uint8)
    if rgb is not None:
        rois = reference_rois(rgb, labels, ct)
        if normalise:
            rgb, stretch = normalise_reference(rgb, rois, stretch_c, stretch_c_prime)
            info.update(normalised=True, rois=rois.method,
                        stretch={"gains": list(stretch.gains), "f_min": stretch.f_min,
                                 "f_max": stretch.f_max, "c": stretch_c,
                                 "c_prime": stretch_c_prime})
        outside = rois.background & ~m
        if outside.any():
            fill = np.rint(rgb[outside].mean(axis=0)).astype(np.uint8)
        elif (~m).any():
            fill = np.rint(rgb[~m].mean(axis=0)).astype(np.uint8)
    ct_f = None if ct is None else np.asarray(ct, dtype=np.float32)
    return Reference(rgb, m, ct_f, fill, info)


# --------------------------------------------------------------------------- metrics


def _idx(axis: int, sl: slice) -> tuple[slice, ...]:
    return tuple(sl if a == axis else slice(None) for a in range(3))


def _channels(volume: np.ndarray) -> np.ndarray:
    v = np.asarray(volume, dtype=np.float32)
    return v[..., None] if v.ndim == 3 else v


def _pair_energy(volume: np.ndarray, mask: np.ndarray, axis: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Squared first difference along ``axis`` (channel mean) and the both-in-mask pairs."""
    v = _channels(volume)
    d = np.diff(v, axis=axis)
    e = np.einsum("...c,...c->...", d, d) / np.float32(v.shape[-1])
    both = mask[_idx(axis, slice(None, -1))] & mask[_idx(axis, slice(1, None))]
    return e, both


def diff_energy(volume: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """``E_a``: mean squared first difference along ``axis`` over pairs inside the mask."""
    e, both = _pair_energy(volume, mask, axis)
    n = int(both.sum())
    return float(e[both].sum(dtype=np.float64) / n) if n else float("nan")


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return float("nan")
    if den == 0:
        return 1.0 if num == 0 else float("inf")
    return float(num / den)


def anisotropy(volume: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """``A_a = E_a / mean of the two other E_b`` per axis (the masked stripe index)."""
    e = [diff_energy(volume, mask, a) for a in range(3)]
    return {name: _ratio(e[a], float(np.mean([e[b] for b in range(3) if b != a])))
            for a, name in enumerate(AXES)}


def stripe_ratios(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray
                  ) -> dict[str, float]:
    """``E_a(prediction) / E_a(reference)`` per axis (1 = no excess stripes)."""
    return {name: _ratio(diff_energy(prediction, mask, a), diff_energy(reference, mask, a))
            for a, name in enumerate(AXES)}


def ct_stripe_ratios(prediction: np.ndarray, ct: np.ndarray, mask: np.ndarray
                     ) -> dict[str, float]:
    """``A_a(prediction) / A_a(CT)`` per axis (scale-free: raw CT units are fine)."""
    p, c = anisotropy(prediction, mask), anisotropy(ct, mask)
    return {name: _ratio(p[name], c[name]) for name in AXES}


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 255.0
                ) -> float:
    """PSNR (dB) pooled over the masked voxels and channels; inf when equal there."""
    d = a[mask].astype(np.float64) - b[mask].astype(np.float64)
    mse = float((d * d).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def colour_calibration(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel gain and offset (each (C,)) of the least-squares fit ``gain·P + offset ≈
    R`` over the masked voxels; a channel that is constant in P gets gain 0 and R's mean."""
    p = prediction[mask].astype(np.float64)
    r = reference[mask].astype(np.float64)
    pm, rm = p.mean(axis=0), r.mean(axis=0)
    var = ((p - pm) ** 2).mean(axis=0)
    cov = ((p - pm) * (r - rm)).mean(axis=0)
    gain = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
    return gain, rm - gain * pm


def calibrated_psnr(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                    data_range: float = 255.0) -> tuple[float, np.ndarray, np.ndarray]:
    """PSNR (dB) over the masked voxels after :func:`colour_calibration` (clipped to the
    data range), with the gains and offsets used."""
    gain, offset = colour_calibration(prediction, reference, mask)
    fitted = np.clip(prediction[mask].astype(np.float64) * gain + offset, 0.0, data_range)
    d = fitted - reference[mask].astype(np.float64)
    mse = float((d * d).mean())
    return (float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)), gain, offset


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, win: int) -> np.ndarray:
    """Full SSIM map (N, H, W), channel mean, of two (N, H, W, C) float64 stacks (skimage
    formula, as :func:`hpcstain.metrics.similarity.ssim_batch` before its border crop)."""
    return ssim_map(x, y, data_range, win).mean(axis=-1)


def family_scores(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                  fill: Sequence[int] | np.ndarray, axis: int, data_range: float = 255.0,
                  win: int = WIN_SIZE) -> dict[str, float | int | None]:
    """Masked SSIM and mean slice PSNR of the slices perpendicular to ``axis``."""
    p = np.moveaxis(np.where(mask[..., None], prediction, np.asarray(fill, np.uint8)), axis, 0)
    r = np.moveaxis(np.where(mask[..., None], reference, np.asarray(fill, np.uint8)), axis, 0)
    m = np.moveaxis(mask, axis, 0)
    pad = (win - 1) // 2
    total, count, psnrs = 0.0, 0, []
    for i in range(0, p.shape[0], GROUP):
        x = p[i:i + GROUP].astype(np.float64)
        y = r[i:i + GROUP].astype(np.float64)
        mm = m[i:i + GROUP]
        se = ((x - y) ** 2).mean(axis=-1)
        for k in range(len(mm)):
            n = int(mm[k].sum())
            if n:
                mse = float(se[k][mm[k]].mean())
                psnrs.append(PSNR_CAP if mse == 0 else
                             min(PSNR_CAP, 10 * math.log10(data_range**2 / mse)))
        if min(x.shape[1:3]) < win:
            continue
        s = _ssim_map(x, y, data_range, win)[:, pad:x.shape[1] - pad, pad:x.shape[2] - pad]
        valid = mm[:, pad:x.shape[1] - pad, pad:x.shape[2] - pad]
        total += float(s[valid].sum())
        count += int(valid.sum())
    return {"ssim": total / count if count else None,
            "psnr": float(np.mean(psnrs)) if psnrs else None,
            "slices": len(psnrs)}


def profiles(volume: np.ndarray, mask: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per axis: per-slice mean (``mean``, length n) and per-slice-pair first-difference
    energy (``energy``, length n-1) inside the mask; NaN where a slice has no mask voxel."""
    v = _channels(volume)
    vm = v.mean(axis=-1)
    out: dict[str, dict[str, np.ndarray]] = {}
    for a, name in enumerate(AXES):
        other = tuple(b for b in range(3) if b != a)
        n = mask.sum(axis=other)
        s = np.where(mask, vm, 0.0).sum(axis=other, dtype=np.float64)
        e, both = _pair_energy(v, mask, a)
        nb = both.sum(axis=other)
        se = np.where(both, e, 0.0).sum(axis=other, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = {"mean": np.where(n > 0, s / np.maximum(n, 1), np.nan),
                         "energy": np.where(nb > 0, se / np.maximum(nb, 1), np.nan)}
    return out


# --------------------------------------------------------------------------- one volume


@dataclass
class VolumeScore:
    summary: dict[str, Any]                          # JSON-ready (non-finite as strings)
    profiles: dict[str, dict[str, dict[str, np.ndarray]]]   # series → axis → mean/energy
    table: str


def _json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


def score_volume(prediction: np.ndarray, reference: np.ndarray | Reference | None = None,
                 **prepare: Any) -> VolumeScore:
    """Score a predicted RGB(A) volume against a reference (see the module docstring).

    ``reference``: a raw reference stain (normalised here; ``prepare`` takes the keywords
    of :func:`prepare_reference`: labels, ct, mask, normalise, stretch_c, ...), a prepared
    :class:`Reference` (to score many predictions against one truth), or None (stripe
    ratios against the CT's own anisotropy when ``ct`` is given).
    """
    pred = as_rgb_volume(prediction, "prediction")
    ref = reference if isinstance(reference, Reference) else \
        prepare_reference(pred.shape[:3], reference, **prepare)
    _check_shape(ref.mask, pred.shape[:3], "mask")
    m = ref.mask
    summary: dict[str, Any] = {"shape_zyx": list(pred.shape[:3]), **ref.info,
                               "mask_voxels": int(m.sum())}
    series = {"prediction": profiles(pred, m)}
    summary["anisotropy_prediction"] = anisotropy(pred, m)
    if ref.rgb is not None:
        _check_shape(ref.rgb, pred.shape[:3], "reference")
        summary["psnr"] = masked_psnr(pred, ref.rgb, m)
        cal, gain, offset = calibrated_psnr(pred, ref.rgb, m)
        summary["psnr_calibrated"] = cal
        summary["colour_calibration"] = {"gain": [round(float(g), 4) for g in gain],
                                         "offset": [round(float(o), 2) for o in offset]}
        summary["planes"] = {fam: family_scores(pred, ref.rgb, m, ref.fill, axis)
                             for fam, axis in FAMILIES}
        summary["stripe_ratio"] = stripe_ratios(pred, ref.rgb, m)
        summary["stripe_ratio_against"] = "reference"
        summary["anisotropy_reference"] = anisotropy(ref.rgb, m)
        series["reference"] = profiles(ref.rgb, m)
    elif ref.ct is not None:
        _check_shape(ref.ct, pred.shape[:3], "CT")
        summary["stripe_ratio"] = ct_stripe_ratios(pred, ref.ct, m)
        summary["stripe_ratio_against"] = "ct anisotropy"
        summary["anisotropy_ct"] = anisotropy(ref.ct, m)
        series["ct"] = profiles(ref.ct, m)
    else:
        summary["stripe_ratio"] = dict(summary["anisotropy_prediction"])
        summary["stripe_ratio_against"] = "none (prediction anisotropy)"
    summary = _json(summary)
    return VolumeScore(summary, series, format_table(summary))


# --------------------------------------------------------------------------- report


def _f(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def format_table(summary: dict[str, Any], title: str = "") -> str:
    """Markdown: SSIM/PSNR per plane family, stripe ratio and anisotropy per axis."""
    lines = [title] if title else []
    lines.append(f"Mask: {summary['mask']} ({summary['mask_fraction']:.1%} of "
                 f"{'×'.join(str(n) for n in summary['shape_zyx'])} voxels); reference: "
                 f"{summary['reference']}"
                 + (f", §2.5-normalised (ROIs: {summary['rois']}, f_min "
                    f"{summary['stretch']['f_min']:.1f}, f_max "
                    f"{summary['stretch']['f_max']:.1f})" if summary.get("normalised") else "")
                 + ".")
    lines.append("")
    if "planes" in summary:
        lines += ["| planes | SSIM ↑ | PSNR ↑ (dB, slice mean) | slices |", "|---|---|---|---|"]
        for fam, axis in FAMILIES:
            s = summary["planes"][fam]
            lines.append(f"| {fam.upper()} ({AXES[axis]}-slices) | {_f(s['ssim'], 3)} | "
                         f"{_f(s['psnr'], 2)} | {s['slices']} |")
        lines.append(f"| volume | – | {_f(summary['psnr'], 2)} (pooled) | – |")
        if "psnr_calibrated" in summary:
            lines.append(f"| volume, colour-calibrated | – | "
                         f"{_f(summary['psnr_calibrated'], 2)} (pooled) | – |")
        lines.append("")
    extra = ("anisotropy_reference" if "anisotropy_reference" in summary else
             "anisotropy_ct" if "anisotropy_ct" in summary else None)
    head = ["axis", f"stripe ratio → 1 (vs {summary['stripe_ratio_against']})",
            "anisotropy prediction"]
    if extra:
        head.append(extra.replace("_", " "))
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in AXES:
        cells = [name, _f(summary["stripe_ratio"][name], 3),
                 _f(summary["anisotropy_prediction"][name], 3)]
        if extra:
            cells.append(_f(summary[extra][name], 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
