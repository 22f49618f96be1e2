"""CT levels from the CT alone: the raw (bone, background) intensities of §2.5.

Training finds bone with the histology's help (:func:`hpcstain.data.normalise.find_pair_rois`);
staining a CT without histology (``predict``, ``stain``) needs the same two levels from the
CT alone. :func:`estimate_ct_levels` is that one estimator, for a 2D slide or a (subsampled)
3D volume, robust to a metal implant of any size, the sample tube wall, air, cupping and
noise. The procedure (docs/volume.md, "CT levels"):

1. **Classes.** The CT is smoothed in-plane (Gaussian, σ = 1–2 px, more for noisier data)
   and its histogram split into modes (peaks between valleys, small or shallow ones merged).
   Class *membership* uses the smoothed values; every *level* is a median of raw values.
2. **Background** = the lowest mode holding ≥ 2 % of the voxels (air or resin); its level
   is the raw median within its half maximum. Its half width is the noise unit ``w``.
3. **Metal.** The densest mode T is metal when a *bone-like* mode A below it (contrast to
   background ≥ ``BONE_CONTRAST`` w: soft tissue, PEEK and resin sit within a few w of the
   background, bone far above) has at most half its contrast (Ti ≈ 2.5×, steel more; Mg ≈
   1×, PEEK < 1×) and a deep valley separates them. Repeated for the next densest mode.
   Metal voxels and a margin around them (partial volume) are left out.
4. **Bone** = raw median of the voxels above the half-contrast threshold (halfway between
   background and the 99th percentile of what is left), which is where the labelled bone of
   a blurred CT lies. A homogeneous implant inside that range (Mg: a narrow peak above its
   base, with denser bone above it) is found as solid blobs at its level and left out with
   a shell of 1.5× its inscribed radius (its rim, the degradation layer and new bone about
   it).
5. **Confidence** in [0, 1]: the smallest margin of the decisions above (metal ratio and
   gap, bone-likeness, masses). Below ``AMBIGUOUS`` the estimate is *ambiguous*: CT-only
   paths refuse it with one line naming what was found and the ``--bone-level``/
   ``--background-level`` to pass. A constant input or one without a bone-like class is an
   :class:`~hpcstain.errors.InputError`.

Pure functions over arrays; :func:`volume_levels` reads a strided subsample of a
:class:`~hpcstain.volume.io.VolumeSource` (each full-resolution plane is smoothed before
striding, so the classes see the same noise at any volume size).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from hpcstain.config import DataConfig
from hpcstain.errors import InputError

N_BINS = 512              # histogram bins over the 0.01–99.99 % range
SMOOTH_BINS = 2.0         # Gaussian smoothing of the histogram, in bins
MODE_MIN_MASS = 0.004     # a mode holds at least this fraction of the voxels ...
MODE_MIN_RATIO = 1.25     # ... and its peak is this much above its higher valley
BACKGROUND_MIN_MASS = 0.02
BONE_CONTRAST = 15.0      # bone-like: contrast ≥ this many background half-widths (smoothed)
MIN_CONTRAST = 6.0        # any bone (and a metal's reference class): at least this many
METAL_RATIO = 2.0         # metal: contrast ≥ this × the bone-like mode's
METAL_EVIDENCE = 6.5      # ... or however wide (reconstructed CT: beam hardening, starvation)
                          # when ratio × BROAD_WIDTH / (FWHM / contrast) reaches this …
BROAD_WIDTH = 0.2         # (bone, a mixture, is ≥ 0.16 of its contrast wide; metal narrower)
BROAD_LIKE = 0.7          # … above a reference of this × bone-like contrast
METAL_GAP = 0.35          # ... and valley ≤ this × the lower of the two peaks
BETWEEN_MAX = 0.05        # ... and no class of this share of the voxels in between
BONE_ALPHA = 0.5          # bone threshold: halfway between background and dense bone
DEGRADATION_FROM = 0.3    # modes above this fraction of the bone contrast, below an implant
NARROW_WIDTH = 1.4        # homogeneous (metal-like): FWHM ≤ this × the background's FWHM
IMPLANT_WIDTH = 1.4       # homogeneous implant in the bone range: FWHM ≤ this × background's
IMPLANT_MIN_MASS = 0.005  # a homogeneous implant in the bone range: core ≥ 0.5 % of voxels
IMPLANT_REL_WIDTH = 0.1   # ... or one whose FWHM is ≤ this × its contrast (hardened)
IMPLANT_PROMINENCE = 0.25  # an implant peak rises ≥ this fraction of its height above its base
IMPLANT_ABOVE = 0.2       # ... with ≥ this share of the bone window denser than it
IMPLANT_BAND = 2.0        # implant core: within this many of its peak's half widths
IMPLANT_SHELL = 1.5       # left out around the core: this × its inscribed radius
METAL_MARGIN = 2          # px (full resolution) left out around metal (partial volume)
IMPLANT_MARGIN = 4        # px around a homogeneous implant, at least (see IMPLANT_SHELL)
MIN_BONE_MASS = 0.01      # fewer bone voxels than this fraction: no bone
TAIL_MIN_MASS = 0.02      # unresolved material trailing the background: a class
AMBIGUOUS = 0.5           # confidence below this: the estimate is ambiguous
LEVELS_FLAGS = "--bone-level {bone:.6g} --background-level {background:.6g}"


class RawLevels(NamedTuple):
    """A CT's own bone and background levels, in its grey values (what ``levels`` reads)."""

    bone: float
    background: float


class TargetLevels(NamedTuple):
    """The levels a checkpoint was trained on, 16-bit scale (§2.5: raw levels map here)."""

    bone: float
    background: float


# the paper's §2.5 levels (30000, 10000): the training default, written in config.DataConfig
DEFAULT_TARGET = TargetLevels(DataConfig.ct_bone_level, DataConfig.ct_background_level)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LevelClass:
    """One class of the CT histogram: its role, raw level, value window and share."""

    name: str          # background | soft tissue | bone | implant | metal | other
    level: float       # raw median (for background and bone: the estimated level)
    lo: float          # window of (smoothed) values that belong to the class
    hi: float
    fraction: float    # share of all voxels
    excluded: bool = False   # left out of the bone level (metal, implant)

    def line(self) -> str:
        ex = ", excluded" if self.excluded else ""
        return (f"{self.name:<12} {self.level:>10.6g}   [{self.lo:.6g}, {self.hi:.6g}]  "
                f"{100 * self.fraction:5.1f} %{ex}")


@dataclass(frozen=True)
class LevelEstimate:
    """Estimated raw (bone, background) CT levels and how they were found."""

    bone: float
    background: float
    classes: tuple[LevelClass, ...] = ()
    thresholds: dict[str, float] = field(default_factory=dict)
    confidence: float = 1.0
    notes: tuple[str, ...] = ()
    alternative: tuple[float, float] | None = None   # the other reading when ambiguous
    name: str = "CT"
    smoothing: float = 0.0

    @property
    def ambiguous(self) -> bool:
        return self.confidence < AMBIGUOUS

    @property
    def levels(self) -> RawLevels:
        return RawLevels(self.bone, self.background)

    def flags(self, levels: tuple[float, float] | None = None) -> str:
        bone, background = levels or self.levels
        return LEVELS_FLAGS.format(bone=bone, background=background)

    def summary(self) -> str:
        """One line: levels, confidence, and (when ambiguous) what to pass instead."""
        text = (f"CT levels of {self.name}: bone {self.bone:.6g}, background "
                f"{self.background:.6g} (confidence {self.confidence:.2f}")
        text += ", AMBIGUOUS)" if self.ambiguous else ")"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        if self.ambiguous:
            text += f"; pass {self.flags()} to accept this reading"
            if self.alternative is not None:
                text += f", or {self.flags(self.alternative)} for the other"
        return text

    def lines(self) -> list[str]:
        """The report printed by ``hpcstain levels`` and ``hpcstain stain --plan-only``."""
        out = [f"levels: bone {self.bone:.6g}, background {self.background:.6g}  "
               f"(confidence {self.confidence:.2f}{', AMBIGUOUS' if self.ambiguous else ''})",
               f"flags:  {self.flags()}"]
        if self.classes:
            out.append(f"classes of {self.name} (in-plane smoothing σ = {self.smoothing:g} px):")
            out += ["  " + c.line() for c in self.classes]
        if self.thresholds:
            out.append("thresholds: " + ", ".join(f"{k} {v:.6g}" for k, v in
                                                  self.thresholds.items()))
        out += [f"note: {n}" for n in self.notes]
        if self.ambiguous and self.alternative is not None:
            out.append(f"other reading: {self.flags(self.alternative)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"bone": self.bone, "background": self.background,
                "confidence": self.confidence, "ambiguous": self.ambiguous,
                "notes": list(self.notes), "thresholds": dict(self.thresholds),
                "alternative": list(self.alternative) if self.alternative else None,
                "classes": [c.__dict__ for c in self.classes]}


def require_confident(est: LevelEstimate) -> LevelEstimate:
    """``est`` unless it is ambiguous; then an InputError with the one-line summary."""
    if est.ambiguous:
        raise InputError(est.summary())
    return est


# --------------------------------------------------------------------------- histogram


@dataclass(frozen=True)
class _Mode:
    peak: float
    lo: float
    hi: float
    mass: float
    height: float
    fwhm: float


@dataclass
class _Hist:
    counts: np.ndarray
    smooth: np.ndarray
    edges: np.ndarray
    total: int

    @property
    def width(self) -> float:
        return float(self.edges[1] - self.edges[0])

    def index(self, value: float) -> int:
        return int(np.clip(np.searchsorted(self.edges, value) - 1, 0, self.smooth.size - 1))

    def half_max(self, i: int, frac: float = 0.5) -> tuple[int, int]:
        s, level = self.smooth, self.smooth[i] * frac
        j = i
        while j > 0 and s[j] > level:
            j -= 1
        k = i
        while k < s.size - 1 and s[k] > level:
            k += 1
        return j, k

    def first_below(self, a: float, b: float, level: float) -> float:
        """First value above ``a`` (at most ``b``) where the smoothed count is <= ``level``."""
        i0, i1 = self.index(a), self.index(b)
        below = np.flatnonzero(self.smooth[i0:i1 + 1] <= level)
        return float(self.edges[i0 + int(below[0])]) if below.size else float(b)

    def sharp_below(self, m: _Mode, reach: float = 1.5, level: float = 0.35) -> bool:
        """``reach`` FWHM below the peak of ``m`` the count is under ``level`` × the peak."""
        i = self.index(m.peak)
        a = max(i - max(round(reach * m.fwhm / self.width), 1), 0)
        return bool(self.smooth[a] < level * self.smooth[i])

    def valley(self, a: float, b: float) -> tuple[float, float]:
        """Lowest smoothed count between values ``a`` < ``b``: (value, count)."""
        i0, i1 = self.index(a), max(self.index(b), self.index(a) + 1)
        i = i0 + int(np.argmin(self.smooth[i0:i1]))
        return float(self.edges[i]), float(self.smooth[i])


def _histogram(flat: np.ndarray) -> _Hist:
    lo, hi = np.percentile(flat, [0.01, 99.99])
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    counts, edges = np.histogram(flat, bins=N_BINS, range=(lo, hi))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), SMOOTH_BINS, mode="constant")
    return _Hist(counts, smooth, edges, int(flat.size))


def _modes(h: _Hist) -> list[_Mode]:
    """Peaks of the smoothed histogram between valleys; weak ones merged into neighbours."""
    s = h.smooth
    left = np.concatenate([[-1.0], s[:-1]])
    right = np.concatenate([s[1:], [-1.0]])
    peaks = list(np.flatnonzero((s > left) & (s >= right))) or [int(np.argmax(s))]
    bounds = [0] + [a + int(np.argmin(s[a:b + 1])) for a, b in itertools.pairwise(peaks)] + [s.size]
    segs = [[bounds[i], bounds[i + 1], p] for i, p in enumerate(peaks)]

    def strength(i: int) -> float:
        lo, hi, p = segs[i]
        vl = float(s[lo]) if i > 0 else 0.0
        vr = float(s[hi]) if i < len(segs) - 1 else 0.0
        mass = h.counts[lo:hi].sum() / h.total
        return min(mass / MODE_MIN_MASS, (s[p] / max(vl, vr, 1e-12) - 1) / (MODE_MIN_RATIO - 1))

    while len(segs) > 1:
        scores = [strength(i) for i in range(len(segs))]
        i = int(np.argmin(scores))
        if scores[i] >= 1.0:
            break
        vl = float(s[segs[i][0]]) if i > 0 else -1.0
        vr = float(s[segs[i][1]]) if i < len(segs) - 1 else -1.0
        a, b = sorted((i, i - 1 if vl >= vr else i + 1))
        p = segs[a][2] if s[segs[a][2]] >= s[segs[b][2]] else segs[b][2]
        segs[a:b + 1] = [[segs[a][0], segs[b][1], p]]
    centres = 0.5 * (h.edges[:-1] + h.edges[1:])
    out = []
    for lo, hi, p in segs:
        j, k = h.half_max(p)
        out.append(_Mode(float(centres[p]), float(h.edges[lo]), float(h.edges[hi]),
                         float(h.counts[lo:hi].sum() / h.total), float(s[p]),
                         (k - j) * h.width))
    return out


# --------------------------------------------------------------------------- smoothing


def noise_sigma(values: np.ndarray) -> float:
    """Robust noise σ from differences of neighbours along the last axis."""
    d = np.diff(np.asarray(values, np.float64), axis=-1)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


SIGMAS = (0.0, 1.0, 2.0, 3.0)   # in-plane smoothing tried, px


def smoothing_for(values: np.ndarray) -> float:
    """First in-plane σ to try (px): 0 when the noise is under 1 % of the 1–99 % value range
    (or the planes are tiny), 1 under 4 %, else 2; more is tried when classes do not separate."""
    v = np.asarray(values, np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return 0.0
    p1, p99 = np.percentile(finite, [1, 99])
    ratio = noise_sigma(v) / max(float(p99 - p1), 1e-12)
    want = min(0.0 if ratio < 0.01 else 1.0 if ratio < 0.04 else 2.0, max_smoothing(v.shape))
    return max(x for x in SIGMAS if x <= want)


def max_smoothing(shape: tuple[int, ...]) -> float:
    """Largest in-plane σ worth trying on planes of ``shape``: 1/64 of the smaller edge."""
    return min(shape[-2:]) / 64.0


def smooth_planes(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over the last two axes (NaN/Inf replaced by the median first)."""
    v = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(v)
    if bad.any():
        v = np.where(bad, np.median(v[~bad]) if (~bad).any() else 0.0, v)
    if sigma <= 0:
        return v
    return ndimage.gaussian_filter(v, sigma, axes=(v.ndim - 2, v.ndim - 1), mode="nearest")


# --------------------------------------------------------------------------- estimator


def _px(full_res_px: int, stride: int) -> int:
    """A margin of ``full_res_px`` full-resolution px on a grid of spacing ``stride`` (≥ 1)."""
    return max(1, math.ceil(full_res_px / max(int(stride), 1)))


def _solid(v: np.ndarray, level: float, half: float, min_voxels: int) -> np.ndarray:
    """Large solid blobs of ``|v - level| <= half`` (an opening removes thin structures)."""
    core = ndimage.binary_opening(np.abs(v - level) <= half, iterations=2)
    lab, n = ndimage.label(core)
    if n == 0:
        return core
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return np.isin(lab, np.flatnonzero(sizes >= min_voxels))


def _margin(ratio: float, edge: float, span: float) -> float:
    """0 at ``edge``, 1 at ``span`` (in log ratio) or more away from it."""
    return float(min(abs(math.log(max(ratio, 1e-12) / edge)) / math.log(span), 1.0))


def estimate_ct_levels(values: np.ndarray, name: str = "CT", *, stride: int = 1,
                       smoothed: dict[float, np.ndarray] | None = None,
                       sigma: float | None = None) -> LevelEstimate:
    """Raw (bone, background) levels of a CT slide (H, W) or volume sample (Z, Y, X).

    Classes are found on the in-plane smoothed CT: from σ = :func:`smoothing_for` up through
    ``SIGMAS`` until an unambiguous reading is found (``sigma`` fixes one σ). ``smoothed``
    maps σ → the smoothed CT when the caller made it (e.g. from full-resolution planes before
    striding). ``stride`` is the voxel spacing of ``values`` in full-resolution px (margins
    scale). Raises InputError for a constant input or one without a bone-like class; an
    ambiguous result is returned with ``confidence < AMBIGUOUS`` (see
    :func:`require_confident`).
    """
    raw = np.asarray(values, dtype=np.float64)
    if raw.ndim not in (2, 3):
        raise InputError(f"{name}: expected a 2D slide or a 3D volume, got {raw.ndim}D")
    finite = np.isfinite(raw)
    if finite.sum() < 64:
        raise InputError(f"{name}: only {int(finite.sum())} finite value(s); cannot estimate "
                         "CT levels")
    lo_v, hi_v = float(raw[finite].min()), float(raw[finite].max())
    if lo_v == hi_v:
        raise InputError(f"{name}: constant CT ({lo_v:g} everywhere): no bone or "
                         "background to find; pass --bone-level/--background-level")
    if sigma is not None:
        sigmas = [float(sigma)]
    else:
        start = smoothing_for(raw) if smoothed is None else min(smoothed)
        top = max_smoothing(raw.shape) if smoothed is None else max(smoothed)
        sigmas = [x for x in SIGMAS if start <= x <= max(top, start)]
        if smoothed is not None:
            sigmas = [x for x in sigmas if x in smoothed]
    best: LevelEstimate | None = None
    first_error: InputError | None = None
    for k, sg in enumerate(sigmas):
        try:
            est = _estimate_once(raw, finite, _smoothed(raw, smoothed, sg), name, stride, sg)
        except InputError as exc:
            first_error = first_error or exc
            continue
        if not est.ambiguous:
            return _unless_metal_missed(est, raw, finite, smoothed, sigmas[k + 1:], name,
                                        stride)
        best = est if best is None or est.confidence > best.confidence else best
    if best is not None:
        return best
    assert first_error is not None
    raise first_error


def _smoothed(raw: np.ndarray, smoothed: dict[float, np.ndarray] | None, sigma: float
              ) -> np.ndarray:
    return smoothed[sigma] if smoothed is not None and sigma in smoothed \
        else smooth_planes(raw, sigma)


def _unless_metal_missed(est: LevelEstimate, raw: np.ndarray, finite: np.ndarray,
                         smoothed: dict[float, np.ndarray] | None, later: list[float],
                         name: str, stride: int) -> LevelEstimate:
    """``est``, unless a smoother reading finds (or suspects) metal where ``est`` read bone.

    A reconstructed metal is broad (beam hardening, starvation) and the tissue below it an
    unresolved shoulder of the background; at one smoothing the metal can look like the
    only tissue mode, with nothing in that histogram to doubt it (a Ti screw read as bone
    at 3.6× the bone's level, confidence 1.00). Smoothing more resolves the tissue below
    it. So a reading without metal is checked at the next smoothings: the first confident
    one that calls ``est``'s bone metal wins; one that doubts between the two (ambiguous,
    with the other reading as its alternative) is returned instead, so the CT-only paths
    stop with both readings rather than stain on a confident wrong one.
    """
    if any(c.name == "metal" for c in est.classes):
        return est
    # metal lies ≥ METAL_RATIO × the bone's contrast above the background: a reading whose
    # bone is not that far below est's does not say est's bone is metal
    below = est.background + (est.bone - est.background) / METAL_RATIO
    for sg in later:
        try:
            other = _estimate_once(raw, finite, _smoothed(raw, smoothed, sg), name, stride, sg)
        except InputError:
            continue
        note = f"at {est.smoothing:g} px smoothing the class at {est.bone:.6g} read as bone"
        if (not other.ambiguous and other.thresholds.get("metal_lo", math.inf) <= est.bone
                and other.bone <= below):
            return replace(other, notes=(*other.notes, note))
        if (other.ambiguous and other.alternative is not None
                and min(other.bone, other.alternative[0]) <= below):
            return replace(other, notes=(*other.notes, note + f", at {sg:g} px maybe metal"))
    return est


def _estimate_once(raw: np.ndarray, finite: np.ndarray, smoothed: np.ndarray, name: str,
                   stride: int, sigma: float) -> LevelEstimate:
    v = np.asarray(smoothed, dtype=np.float64)
    flat = v[finite]
    hist = _histogram(flat)
    modes = _modes(hist)
    notes: list[str] = []
    conf: list[float] = [1.0]
    bg, w, background, bg_win = _background(hist, modes, raw, v, finite, notes, conf)
    g_hi = bg.peak + 2 * w
    tissue = sorted((m for m in modes if m.peak > g_hi and m.mass >= MODE_MIN_MASS),
                    key=lambda m: m.peak)
    if not tissue or (tissue[-1].peak - bg.peak) / w < MIN_CONTRAST:
        top = f"{tissue[-1].peak:.6g}" if tissue else "none"
        raise InputError(f"{name}: no bone found: no class lies well above the background "
                         f"{background:.6g} (densest class: {top}); pass "
                         "--bone-level/--background-level if the sample has bone")
    tissue, metals, metal_t, alternative_cut = _metals(hist, flat, tissue, bg, w, notes, conf)
    bone, win, classes_extra, thr = _bone_level(hist, raw, v, finite, bg.peak, w, g_hi, metal_t,
                                                 modes, tissue, stride, name, notes, conf)
    alternative = None
    if alternative_cut is not None or (metals and min(conf) < AMBIGUOUS):
        cut = alternative_cut if alternative_cut is not None else math.inf
        try:
            alt_bone = _bone_level(hist, raw, v, finite, bg.peak, w, g_hi, cut, modes,
                                   [m for m in tissue + metals if m.peak < cut], stride, name,
                                   [], [])[0]
            alternative = (alt_bone, background)
        except InputError:
            alternative = None
    main = max((m for m in tissue if thr["bone"] < m.peak), key=lambda m: m.mass, default=None)
    hidden = float(((flat > bg.peak + 4 * w) & (flat < bg.hi)).mean())
    if (not metals and not classes_extra and main is not None
            and main.fwhm <= NARROW_WIDTH * 2 * w and hidden > 0.05):
        notes.append(f"the bone class ({main.peak:.6g}) is homogeneous like an implant while "
                     f"{100 * hidden:.0f} % of the voxels trail the background unresolved")
        conf.append(0.4)
    classes = [LevelClass("background", background, bg.peak - w, bg.peak + w,
                          float(bg_win.sum() / flat.size))]
    classes += _soft_tissue(tissue, raw, v, finite, thr["bone"], bg.peak, w)
    classes.append(LevelClass("bone", bone, thr["bone"], min(metal_t, float(hist.edges[-1])),
                              float(win.sum() / flat.size)))
    classes += classes_extra
    classes += [LevelClass("metal", _median_in(raw, v, finite, m.lo, m.hi), m.lo, m.hi,
                           m.mass, excluded=True) for m in metals]
    thresholds = {"background_hi": bg.peak + w, "bone_lo": thr["bone"]}
    if metals:
        thresholds["metal_lo"] = metal_t
    if bone <= background:
        raise InputError(f"{name}: estimated bone level {bone:.6g} is not above the background "
                         f"{background:.6g}; pass --bone-level/--background-level")
    return LevelEstimate(bone=bone, background=background, classes=tuple(classes),
                         thresholds=thresholds, confidence=round(float(min(conf)), 3),
                         notes=tuple(notes), alternative=alternative, name=name,
                         smoothing=float(sigma))


def _background(hist: _Hist, modes: list[_Mode], raw: np.ndarray, v: np.ndarray,
                finite: np.ndarray, notes: list[str], conf: list[float]
                ) -> tuple[_Mode, float, float, np.ndarray]:
    """The background mode, its half width w (the noise unit), its raw median level and
    the voxels of its ±w window."""
    bg = next((m for m in modes if m.mass >= BACKGROUND_MIN_MASS), None)
    if bg is None:
        bg = max(modes, key=lambda m: m.mass)
        notes.append(f"no mode holds {100 * BACKGROUND_MIN_MASS:g} % of the voxels; "
                     "background is the largest one")
        conf.append(0.6)
    ip = hist.index(bg.peak)
    j, _ = hist.half_max(ip)
    w = max(ip - j, 1) * hist.width
    bg_win = finite & (v >= bg.peak - w) & (v <= bg.peak + w)
    return bg, w, float(np.median(raw[bg_win])), bg_win


def _metals(hist: _Hist, flat: np.ndarray, tissue: list[_Mode], bg: _Mode, w: float,
            notes: list[str], conf: list[float]
            ) -> tuple[list[_Mode], list[_Mode], float, float | None]:
    """Metal: the densest modes far above a bone-like mode, across a deep valley.

    The bone-like mode may be unresolved: on reconstructed CT, soft tissue and bone often
    trail the background as one shoulder, with the metal the only peak above it. The dense
    end of that shoulder (:func:`_tail_mode`) then stands in for the bone-like mode.

    Returns the tissue modes below the metal, the metal modes, the metal threshold (inf
    without metal) and, when the densest class's reading is ambiguous, the cut of the other
    reading.
    """
    metal_t, metals = math.inf, []
    alternative_cut: float | None = None
    tail = _tail_mode(hist, flat, bg, w)
    while len(tissue) >= 2 or (tail is not None and tissue):
        top = tissue[-1]
        likes = [m for m in tissue[:-1] if (m.peak - bg.peak) / w >= MIN_CONTRAST
                 and m.mass >= 0.01]
        refs = [max(likes, key=lambda m: m.mass)] if likes else []
        if (tail is not None and tail.peak < top.lo
                and (tail.peak - bg.peak) / w >= MIN_CONTRAST):
            refs.append(tail)   # tried when the resolved reference does not find metal
        tail = None
        if not refs:
            break
        tests = [_metal_test(hist, tissue, top, ref, bg, w,
                             unresolved=(ref is refs[-1] and len(refs) > 1) or not likes)
                 for ref in refs]
        test = next((t for t in tests if t.is_metal), None)
        if test is None:   # not metal: as sure as the least sure reference
            test = min(tests, key=lambda t: t.confidence)
        conf.append(test.confidence)
        if test.confidence < AMBIGUOUS:
            what = "metal" if test.is_metal else "the densest tissue"
            notes.append(f"class at {top.peak:.6g} read as {what} ({test.ratio:.2f}× the "
                         f"contrast of {test.ref.peak:.6g}, valley {test.depth:.2f} of the peaks)")
            alternative_cut = None if test.is_metal else test.valley
        if not test.is_metal:
            break
        metals.append(top)
        ref, vs = test.ref, test.valley_count
        metal_t = hist.first_below(ref.peak, test.valley,
                                   vs + 0.02 * (min(ref.height, top.height) - vs))
        tissue = [m for m in tissue if m.peak < metal_t]
    return tissue, metals, metal_t, alternative_cut


@dataclass(frozen=True)
class _MetalTest:
    ref: _Mode
    is_metal: bool
    confidence: float
    ratio: float
    depth: float
    valley: float
    valley_count: float


def _metal_test(hist: _Hist, tissue: list[_Mode], top: _Mode, ref: _Mode, bg: _Mode,
                w: float, unresolved: bool = False) -> _MetalTest:
    """Is ``top`` metal above the bone-like ``ref``, and how sure is that reading? An
    ``unresolved`` reference (the dense end of material trailing the background) is a rough
    level: a wide ``top`` is then surely not metal only at half the broad-metal evidence."""
    between = max((m.mass for m in tissue if ref.peak < m.peak < top.peak), default=0.0)
    ratio = (top.peak - bg.peak) / max(ref.peak - bg.peak, hist.width)
    vx, vs = hist.valley(ref.peak, top.peak)
    depth = vs / max(min(ref.height, top.height), 1e-12)
    like = (ref.peak - bg.peak) / w / BONE_CONTRAST
    narrow = (2 * w * NARROW_WIDTH) / max(top.fwhm, hist.width)   # > 1: homogeneous
    m_ratio = _margin(ratio, METAL_RATIO, 1.25)
    m_depth = _margin(max(depth, 1e-3), METAL_GAP, 2.0)
    m_like, m_narrow = _margin(like, 1.0, 1.5), _margin(narrow, 1.0, 1.25)
    # a reconstructed metal is broadened by beam hardening and photon starvation: it is
    # metal when it lies far enough above a bone-like class for its width
    evidence = ratio * BROAD_WIDTH / max(top.fwhm / max(top.peak - bg.peak, hist.width), 1e-3)
    m_broad = _margin(evidence, METAL_EVIDENCE, 1.25)
    m_unsure = _margin(evidence, METAL_EVIDENCE, 2.0)
    gaps = depth <= METAL_GAP and between < BETWEEN_MAX
    homogeneous = ratio >= METAL_RATIO and narrow >= 1 and gaps
    broad = (not homogeneous and ratio >= METAL_RATIO and evidence >= METAL_EVIDENCE
             and like >= BROAD_LIKE and gaps)
    if homogeneous:   # all gates; a reference that is not bone-like costs confidence
        c = min(m_ratio, m_depth, m_narrow, 1.0 if like >= 1 else 0.6 + 0.4 * m_like)
    elif broad:
        c = min(m_broad, m_depth)
    elif unresolved:   # a rough reference: doubt only a deep valley short of the ratio
        c = 1.0 if depth > METAL_GAP or between >= BETWEEN_MAX else min(m_unsure, 1.0)
    else:          # one clear reason suffices
        c = max(m_ratio if ratio < METAL_RATIO else 0.0,
                m_depth if depth > METAL_GAP else 0.0,
                m_narrow if narrow < 1 else 0.0,
                _margin(between, BETWEEN_MAX, 2.0) if between >= BETWEEN_MAX else 0.0)
    return _MetalTest(ref, homogeneous or broad, c, ratio, depth, vx, vs)


def _tail_mode(hist: _Hist, flat: np.ndarray, bg: _Mode, w: float) -> _Mode | None:
    """The unresolved material trailing the background (from 4 half widths above its peak to
    the end of its histogram segment) as a mode at its dense end (75th percentile), or None
    when it holds under ``TAIL_MIN_MASS`` of the voxels."""
    lo, hi = bg.peak + 4 * w, bg.hi
    sel = flat[(flat > lo) & (flat < hi)]
    if sel.size < TAIL_MIN_MASS * flat.size:
        return None
    peak = float(np.percentile(sel, 75))
    return _Mode(peak, lo, hi, float(sel.size / flat.size), float(hist.smooth[hist.index(peak)]),
                 hi - lo)


def _soft_tissue(tissue: list[_Mode], raw: np.ndarray, v: np.ndarray, finite: np.ndarray,
                 bone_lo: float, bg_peak: float, w: float) -> list[LevelClass]:
    """The tissue modes below the bone threshold and short of bone-like contrast."""
    return [LevelClass("soft tissue", _median_in(raw, v, finite, m.lo, m.hi), m.lo, m.hi,
                       m.mass)
            for m in tissue if m.hi <= bone_lo and (m.peak - bg_peak) / w < BONE_CONTRAST]


def _median_in(raw: np.ndarray, v: np.ndarray, finite: np.ndarray, lo: float, hi: float
               ) -> float:
    sel = finite & (v >= lo) & (v < hi)
    return float(np.median(raw[sel])) if sel.any() else float("nan")


def _bone_level(hist: _Hist, raw: np.ndarray, v: np.ndarray, finite: np.ndarray, g: float,
                w: float,
                g_hi: float, metal_t: float, modes: list[_Mode], tissue: list[_Mode],
                stride: int, name: str, notes: list[str], conf: list[float]
                ) -> tuple[float, np.ndarray, list[LevelClass], dict[str, float]]:
    """Raw median of the bone class below ``metal_t`` (and outside implants)."""
    keep = finite & (v > g_hi) & (v < metal_t)
    if math.isfinite(metal_t):
        metal = (raw >= metal_t) & (v >= metal_t)
        keep &= ~ndimage.binary_dilation(metal, iterations=_px(METAL_MARGIN, stride))
    total = int(finite.sum())
    if keep.sum() < max(MIN_BONE_MASS * total, 16):
        raise InputError(f"{name}: no bone found below the metal at {metal_t:.6g}; pass "
                         "--bone-level/--background-level")
    p_top = float(np.percentile(v[keep], 99))
    t = g + BONE_ALPHA * (p_top - g)
    win = keep & (raw > t)
    extra: list[LevelClass] = []
    implant = _implant(hist, modes, raw, v, win, g, w, t, min(metal_t, float(hist.edges[-1])),
                       tissue, p_top, stride, notes, conf)
    if implant is not None:
        ring, t, cls = implant
        keep &= ~ring
        extra.append(cls)
        win = keep & (raw > t)
    n = int(win.sum())
    if n < max(MIN_BONE_MASS * total, 16):
        raise InputError(f"{name}: no bone found ({n} voxel(s) above the bone threshold "
                         f"{t:.6g}); pass --bone-level/--background-level")
    if n < 0.02 * total:
        notes.append(f"bone is only {100 * n / total:.2f} % of the voxels")
        conf.append(0.6)
    return float(np.median(raw[win])), win, extra, {"bone": float(t)}


def _implant_peak(hist: _Hist, modes: list[_Mode], win_v: np.ndarray, lo: float, hi: float,
                  g: float, w: float, shoulder: bool) -> tuple[float, float] | None:
    """(level, half width) of a homogeneous implant inside the bone window (Mg), or None.

    The candidate is the largest mode between ``lo`` and ``hi``. It is homogeneous when its
    FWHM is ≤ ``IMPLANT_WIDTH`` × the background's (and it falls sharply below), or ≤
    ``IMPLANT_REL_WIDTH`` × its contrast (a hardened implant). Failing that, its width is
    also taken at half its rise above its base (the higher count at its segment's ends), on
    its narrower side: measured so, a narrow peak on a broad shoulder (the implant on top of
    trabecular bone, the degradation layer and low-flux noise) stays narrow. That reading
    also needs denser material above the peak (≥ ``IMPLANT_ABOVE`` of the window, more than
    ``IMPLANT_BAND`` half widths up): an implant in the bone range sits below cortical bone,
    while the densest class of a sample without one is bone, whose top can be as narrow.
    Only tried (``shoulder``) without metal: beside a metal, hardened bone streaks above
    the cortical peak and would pass for the denser material.
    """
    inside = [m for m in modes if lo < m.peak < hi]
    if not inside:
        return None
    m = max(inside, key=lambda m: m.mass)
    if ((m.fwhm <= IMPLANT_WIDTH * 2 * w and hist.sharp_below(m))
            or m.fwhm <= IMPLANT_REL_WIDTH * (m.peak - g)):
        return m.peak, 0.5 * m.fwhm
    if not shoulder:
        return None
    s, i = hist.smooth, hist.index(m.peak)
    ia, ib = hist.index(m.lo), min(hist.index(m.hi), s.size - 1)
    base = max(float(s[ia]), float(s[ib]))
    if s[i] - base < IMPLANT_PROMINENCE * s[i]:
        return None
    half = base + 0.5 * (float(s[i]) - base)
    j, k = i, i
    while j > ia and s[j] > half:
        j -= 1
    while k < ib and s[k] > half:
        k += 1
    hw = max(min(i - j, k - i), 1) * hist.width
    if hw > max(IMPLANT_WIDTH * w, 0.5 * IMPLANT_REL_WIDTH * (m.peak - g)):
        return None
    if float((win_v > m.peak + IMPLANT_BAND * hw).mean()) < IMPLANT_ABOVE:
        return None
    return m.peak, hw


def _implant(hist: _Hist, modes: list[_Mode], raw: np.ndarray, v: np.ndarray,
             win: np.ndarray, g: float, w: float, t: float, top: float, tissue: list[_Mode],
             p_top: float, stride: int, notes: list[str], conf: list[float]
             ) -> tuple[np.ndarray, float, LevelClass] | None:
    """A homogeneous implant inside the bone window (Mg) and its surroundings to leave out:
    (voxels, new bone threshold, its class), or None.

    Its core is the large solid blobs within ``IMPLANT_BAND`` half widths of its level; the
    zone left out grows that core by ``IMPLANT_SHELL`` × its inscribed radius (or by
    ``IMPLANT_MARGIN`` px where that leaves too little bone): the implant's own rim
    (hardened, partial volume), the degradation layer and the new bone about it, which sit
    inside the bone window below bone.
    """
    found = _implant_peak(hist, modes, v[win], t, top, g, w, shoulder=top >= hist.edges[-1])
    if found is None:
        return None
    level, hw = found
    total = int(np.isfinite(raw).sum())
    min_voxels, margin = max(int(0.002 * total), 8), _px(IMPLANT_MARGIN, stride)
    wide = _solid(v, level, max(1.5 * w, IMPLANT_BAND * hw), min_voxels)
    if wide.sum() < IMPLANT_MIN_MASS * total:
        return None
    radius = float(ndimage.distance_transform_edt(wide).max())
    # the wide zone first; where it leaves too little bone, the narrow core and margin
    for core, shell in ((wide, max(margin, round(IMPLANT_SHELL * radius))),
                        (_solid(v, level, 1.5 * w, min_voxels), margin)):
        ring = ndimage.binary_dilation(core, iterations=shell) if core.any() else core
        rest = int((win & ~ring).sum())
        if core.any() and rest >= 0.15 * win.sum() and rest >= MIN_BONE_MASS * total:
            break
    else:
        notes.append(f"homogeneous class at {level:.6g} kept as bone (too little else above "
                     "the bone threshold)")
        conf.append(0.8)
        return None
    for d in tissue:   # a degradation layer below the implant
        if level > d.peak > g + DEGRADATION_FROM * (p_top - g):
            t = max(t, hist.valley(d.peak, level)[0])
    cls = LevelClass("implant", float(np.median(raw[core])), level - hw, level + hw,
                     float(core.sum() / total), excluded=True)
    return ring, t, cls


# --------------------------------------------------------------------------- ROIs, volumes


def level_masks(ct: np.ndarray, est: LevelEstimate, smoothed: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(bone, background) boolean masks of ``ct`` whose raw means are the estimated levels.

    Each mask holds the voxels of the class (by smoothed value) whose raw value lies within
    a band centred on the level, so its mean equals the level up to the asymmetry of the
    distribution inside the band (≪ 1 %).
    """
    raw = np.asarray(ct, dtype=np.float64)
    v = smooth_planes(raw, est.smoothing) if smoothed is None else smoothed
    finite = np.isfinite(raw)
    out = []
    for level, lo, hi in ((est.bone, est.thresholds["bone_lo"],
                           est.thresholds.get("metal_lo", np.inf)),
                          (est.background, -np.inf, est.thresholds["background_hi"])):
        cls = finite & (v > lo) & (v < hi)
        dev = np.abs(raw - level)
        half = float(np.percentile(dev[cls], 50)) if cls.any() else 0.0
        out.append(cls & (dev <= max(half, 1e-9)))
    bone, background = out
    return bone & ~background, background & ~bone


def subsample_stride(shape: tuple[int, ...], max_voxels: int) -> int:
    """Stride k per axis so that every k-th voxel of ``shape`` is at most ``max_voxels``."""
    total = float(np.prod(shape))
    return max(1, math.ceil((total / max(int(max_voxels), 1)) ** (1 / 3)))


def sample_source(source: Any, max_voxels: int = 2_000_000
                  ) -> tuple[np.ndarray, dict[float, np.ndarray], int]:
    """(raw sample, σ → smoothed sample, stride k) of a VolumeSource (or a 3D array):
    every k-th plane.

    Each plane is read whole, smoothed at full resolution (every σ that may be tried), then
    strided by k, so the classes see the same noise whatever the stride.
    """
    k = subsample_stride(tuple(source.shape), max_voxels)
    nz, ny, nx = (int(n) for n in source.shape)
    read = source.read if hasattr(source, "read") else source.__getitem__
    raws: list[np.ndarray] = []
    smooths: dict[float, list[np.ndarray]] = {}
    for z0 in range(0, nz, k):
        plane = np.asarray(read((slice(z0, z0 + 1), slice(0, ny), slice(0, nx)))[0],
                           dtype=np.float64)
        if not smooths:
            start, top = smoothing_for(plane), max_smoothing(plane.shape)
            smooths = {sg: [] for sg in SIGMAS if start <= sg <= max(top, start)}
        # copies, not views: a strided view keeps its whole plane alive (74 full 1024²
        # float64 planes and their smoothed twins held 1.8 GiB for a 1 GiB volume)
        raws.append(plane[::k, ::k].copy())
        for sg, out in smooths.items():
            out.append(smooth_planes(plane, sg)[::k, ::k].copy())
    return np.stack(raws), {sg: np.stack(p) for sg, p in smooths.items()}, k


def volume_levels(source: Any, max_voxels: int = 2_000_000) -> LevelEstimate:
    """Levels of a VolumeSource (or a 3D array) from a strided sample (at most
    ``max_voxels`` voxels): the reading ``stain`` plans with."""
    raw, smoothed, k = sample_source(source, max_voxels)
    return estimate_ct_levels(raw, str(getattr(source, "spec", "volume")), stride=k,
                              smoothed=smoothed)


# --------------------------------------------------------------------------- plot


def plot_levels(values: np.ndarray, est: LevelEstimate, path: str | os.PathLike[str],
                smoothed: np.ndarray | None = None) -> None:
    """Histogram PNG (log counts) of the smoothed CT with the classes and levels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = np.asarray(values, np.float64)
    v = smooth_planes(raw, est.smoothing) if smoothed is None else smoothed
    flat = v[np.isfinite(raw)]
    lo, hi = np.percentile(flat, [0.01, 99.99])
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.hist(flat, bins=N_BINS, range=(lo, hi), color="0.35", histtype="stepfilled", log=True)
    colours = {"background": "tab:blue", "soft tissue": "tab:cyan", "bone": "tab:purple",
               "implant": "tab:olive", "metal": "tab:red"}
    for c in est.classes:
        a, b = max(c.lo, lo), min(c.hi, hi)
        if b > a:
            ax.axvspan(a, b, color=colours.get(c.name, "tab:gray"), alpha=0.15,
                       label=f"{c.name} ({100 * c.fraction:.1f} %)")
    for level, label, colour in ((est.background, "background", "tab:blue"),
                                 (est.bone, "bone", "tab:purple")):
        ax.axvline(level, color=colour, lw=2)
        ax.annotate(f"{label} {level:.6g}", (level, 0.97), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8)
    for key, x in est.thresholds.items():
        if lo <= x <= hi:
            ax.axvline(x, color="k", lw=0.8, ls="--")
            ax.annotate(key, (x, 0.03), xycoords=("data", "axes fraction"), rotation=90,
                        va="bottom", ha="right", fontsize=7)
    ax.set_xlabel("CT value (in-plane smoothed; levels are medians of raw values)")
    ax.set_ylabel("voxels")
    ax.set_title(f"{est.name}: confidence {est.confidence:.2f}"
                 + (" (AMBIGUOUS)" if est.ambiguous else ""), fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
