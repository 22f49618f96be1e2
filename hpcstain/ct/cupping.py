"""Self-calibrated cupping correction: a radial grey-value trend fitted on the CT itself.

Cupping (beam hardening, scatter) lowers a reconstruction's grey values towards the
rotation axis. The volume's z axis is the rotation axis; the correction is a low-order
even polynomial in the in-slice distance ``r`` from the axis centre ``(cy, cx)``::

    corrected = raw + sum_k a_k * (1 - min(r / R, 1) ** (2 k)),   k = 1 .. order

zero at and beyond ``R`` (by default the reconstruction circle, half the smaller in-plane
edge, centred on the plane), largest on the axis. Only the shape is identifiable from the
data: a constant offset is absorbed by the §2.5 level estimate that follows.

**Fit (no calibration scan).** The criterion is the seed's "bone grey value should not
depend on the radius", applied to every grey-level class the CT holds (bone, soft tissue,
resin/air, implant): the coefficients are those that remove the radial trend *within* the
classes. Procedure (:func:`fit_cupping`):

1. in-slice Gaussian smoothing (σ 1 px for the flatness test, σ 2 px for the classes);
   only *flat* voxels are used (in-plane gradient below its median inside ``R``), which
   keeps partial-volume voxels at edges out;
2. classes = the modes of the histogram of the (currently corrected) σ-2 values, cut at
   its clear valleys (both neighbouring peaks ≥ ``VALLEY_RATIO`` × the valley), modes
   under 2 % of the voxels merged into a neighbour; only class *interiors* count (no
   voxel of another class within ``CLASS_ERODE`` px in-plane: thin layers such as an
   implant's degradation zone do not leak into the class they border);
3. per class, the radial profile (median per 1-voxel ring, then a 5-ring running median
   that removes ring artefacts) is fitted by weighted least squares with the polynomial
   plus a constant; each class gives coefficient updates and their standard errors;
4. the update is the inverse-variance-weighted *median* over the classes (a class whose
   grey value varies with radius for anatomical reasons — cortical bone outside
   trabecular bone — is outvoted by the others), added to the coefficients; steps 2–4
   repeat until the update is under 2 grey values (at most ``iterations`` times; without
   a fixed point, the state whose classes asked for the smallest change is returned).

Everything here is a pure function of arrays and global coordinates: the correction of a
block depends only on the block's values and where it lies, so a chunked application
equals the whole-volume one (tested). A volume run fits once at plan time and records
the parameters in ``plan.json`` (:mod:`hpcstain.volume.plan`). Sets of 2D slides get one
fit per slide size (:func:`fit_slides`); training stores its fits in the checkpoint
(:func:`fits_record`) and ``predict``/``evaluate`` apply them (:func:`slide_fits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from hpcstain.errors import InputError, UsageError

MODEL = "radial-even-poly"
FLAT_QUANTILE = 0.5              # flat voxels: in-plane gradient below this quantile
CLASS_SIGMA = 2.0                # px, smoothing of the values the classes are cut from
EDGE_SIGMA = 1.0                 # px, smoothing before the flatness test
MIN_CLASS_MASS = 0.02            # histogram modes holding less are merged
MIN_CLASS_VOXELS = 500
CLASS_ERODE = 2                  # px; class voxels this close to another class are left out
VALLEY_RATIO = 1.25              # a class boundary: both neighbouring peaks ≥ this × valley
MIN_RING_VOXELS = 10             # a ring (1-voxel radial bin) of a class needs this many
RING_MEDIAN = 5                  # rings; running median over the radial profile
MAX_ORDER = 3
MAX_FIT_VOXELS = 4_000_000       # the fit reads at most this many voxels (strided planes)


@dataclass(frozen=True)
class Cupping:
    """Fitted radial correction (all lengths in voxels of the full-resolution volume)."""

    centre_yx: tuple[float, float]
    radius: float
    coeffs: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def order(self) -> int:
        return len(self.coeffs)

    @property
    def depth(self) -> float:
        """Grey values added on the axis (the correction's maximum for positive coeffs)."""
        return float(sum(self.coeffs))

    def profile(self, r: np.ndarray | float) -> np.ndarray:
        """Correction (grey values, float64) at in-slice distances ``r`` from the axis."""
        rho = np.minimum(np.asarray(r, np.float64) / self.radius, 1.0)
        out = np.zeros(rho.shape)
        for k, a in enumerate(self.coeffs, start=1):
            out += a * (1.0 - rho ** (2 * k))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"model": MODEL, "centre_yx": [float(c) for c in self.centre_yx],
                "radius": float(self.radius), "coeffs": [float(a) for a in self.coeffs],
                "depth": round(self.depth, 3), "info": dict(self.info)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Cupping:
        try:
            if data.get("model") != MODEL:
                raise ValueError(f"model {data.get('model')!r}, expected {MODEL!r}")
            cy, cx = (float(v) for v in data["centre_yx"])
            c = cls((cy, cx), float(data["radius"]),
                    tuple(float(a) for a in data["coeffs"]), dict(data.get("info", {})))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise InputError(f"{source}: bad cupping record ({exc})") from None
        check_cupping(c, source)
        return c


def check_cupping(c: Cupping, source: str = "cupping") -> Cupping:
    if not (c.radius > 0 and math.isfinite(c.radius) and all(map(math.isfinite, c.centre_yx))
            and all(map(math.isfinite, c.coeffs)) and 1 <= c.order <= MAX_ORDER):
        raise InputError(f"{source}: bad cupping parameters (radius {c.radius}, centre "
                         f"{c.centre_yx}, {c.order} coefficients)")
    return c


def default_geometry(plane: tuple[int, int]) -> tuple[tuple[float, float], float]:
    """Reconstruction centre and circle of an (ny, nx) plane: the centre of the plane and
    half its smaller edge."""
    ny, nx = plane
    return ((ny - 1) / 2.0, (nx - 1) / 2.0), min(ny, nx) / 2.0


# --------------------------------------------------------------------------- apply


def correction_map(c: Cupping, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The correction (float32 (len(ys), len(xs))) at global voxel rows ``ys``, cols ``xs``."""
    dy = np.asarray(ys, np.float64)[:, None] - c.centre_yx[0]
    dx = np.asarray(xs, np.float64)[None, :] - c.centre_yx[1]
    return c.profile(np.sqrt(dy * dy + dx * dx)).astype(np.float32)


def apply_cupping(block: np.ndarray, c: Cupping | None, origin_yx: tuple[int, int] = (0, 0)
                  ) -> np.ndarray:
    """Corrected float32 copy of ``block`` (…, Y, X) whose first voxel sits at global
    ``origin_yx`` (a pure function of the values and the global coordinates)."""
    data = np.asarray(block, np.float32)
    if c is None:
        return data
    ny, nx = data.shape[-2:]
    cmap = correction_map(c, np.arange(origin_yx[0], origin_yx[0] + ny),
                          np.arange(origin_yx[1], origin_yx[1] + nx))
    return data + cmap


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Corrected float values back to the input's dtype (rounded and clipped for integers)."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return np.clip(np.rint(values), info.min, info.max).astype(dt)
    return values.astype(dt)


# --------------------------------------------------------------------------- fit


def _basis(rho: np.ndarray, order: int) -> np.ndarray:
    r = np.minimum(rho, 1.0)
    return np.stack([1.0 - r ** (2 * k) for k in range(1, order + 1)], axis=-1)


def _class_cuts(values: np.ndarray, bins: int = 256, min_mass: float = MIN_CLASS_MASS
                ) -> np.ndarray:
    """Class boundaries: the clear valleys of the smoothed histogram (both neighbouring
    peaks at least ``VALLEY_RATIO`` × the valley), modes under ``min_mass`` merged."""
    lo, hi = np.percentile(values, [0.2, 99.8])
    if not hi > lo:
        return np.zeros(0)
    hist, edges = np.histogram(values, bins, (lo, hi))
    h = ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0)
    valleys = [i for i in range(1, bins - 1) if h[i] < h[i - 1] and h[i] <= h[i + 1]]
    while valleys:   # drop the shallowest valley until every one left is clear
        bounds = [0, *valleys, bins]
        ratio = [min(h[bounds[j]:v + 1].max(), h[v:bounds[j + 2]].max()) / max(h[v], 1e-12)
                 for j, v in enumerate(valleys)]
        j = int(np.argmin(ratio))
        if ratio[j] >= VALLEY_RATIO:
            break
        valleys.pop(j)
    cuts = [float(edges[i + 1]) for i in valleys]
    while cuts:
        mass = np.bincount(np.searchsorted(cuts, values), minlength=len(cuts) + 1) / values.size
        j = int(np.argmin(mass))
        if mass[j] >= min_mass:
            break
        if j == 0:
            cuts.pop(0)
        elif j == len(cuts):
            cuts.pop()
        else:
            cuts.pop(j - 1 if mass[j - 1] < mass[j + 1] else j)
    return np.asarray(cuts)


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    cw = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cw, cw[-1] / 2.0)])


def _class_update(values: np.ndarray, rings: np.ndarray, radius: float, order: int
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(coefficient update, standard errors) from one class's radial profile, or None."""
    n_rings = int(rings.max()) + 1
    idx = np.argsort(rings, kind="stable")
    rs, vs = rings[idx], values[idx]
    starts = np.searchsorted(rs, np.arange(n_rings))
    ends = np.searchsorted(rs, np.arange(n_rings), side="right")
    counts = ends - starts
    ok = np.flatnonzero(counts >= MIN_RING_VOXELS)
    if ok.size < RING_MEDIAN + order + 2:
        return None
    prof = np.array([np.median(vs[starts[i]:ends[i]]) for i in ok])
    h = RING_MEDIAN // 2
    prof = np.array([np.median(prof[max(0, j - h):j + h + 1]) for j in range(ok.size)])
    x = np.column_stack([np.ones(ok.size), _basis((ok + 0.5) / radius, order)])
    w = np.sqrt(counts[ok].astype(np.float64))
    xw = x * w[:, None]
    beta, *_ = np.linalg.lstsq(xw, prof * w, rcond=None)
    res = prof - x @ beta
    dof = max(1, ok.size - order - 1)
    s2 = float(np.sum((w * res) ** 2) / dof)
    cov = np.linalg.pinv(xw.T @ xw) * s2
    se = np.sqrt(np.maximum(np.diag(cov)[1:], 1e-12))
    # the CT lost ``a (1 - rho^2k)``: its profile has -a on the basis
    return -beta[1:], se


@dataclass(frozen=True)
class _FitData:
    """The arrays one cupping fit iterates over (flat voxels of the sample)."""

    smooth_full: np.ndarray   # the sample smoothed in-plane (classes are cut from it)
    flat: np.ndarray          # the flat voxels inside the circle
    smooth: np.ndarray        # their smoothed values (float64)
    raw: np.ndarray           # their raw values
    rings: np.ndarray         # their 1-px ring of the sample grid
    basis: np.ndarray         # their radial basis (n, order)
    basis2d: np.ndarray       # the plane's radial basis (ny, nx, order)
    radius: float             # the circle's radius in sample px
    order: int


def _class_updates(d: _FitData, coeffs: np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, float]]]:
    """One fixed-point step: cut the corrected flat voxels into grey-level classes (their
    interiors only, no voxel within ``CLASS_ERODE`` px of another class) and ask each class
    for the coefficient update that flattens its radial profile, with its weight."""
    corr = d.basis @ coeffs
    cls_values = d.smooth + corr
    cuts = _class_cuts(cls_values)
    cls = np.searchsorted(cuts, cls_values)
    if CLASS_ERODE > 0:
        full = np.searchsorted(cuts, d.smooth_full + (d.basis2d @ coeffs).astype(np.float32))
        k = (1, 2 * CLASS_ERODE + 1, 2 * CLASS_ERODE + 1)
        interior = (ndimage.minimum_filter(full, k) == ndimage.maximum_filter(full, k))[d.flat]
    else:
        interior = np.ones(cls.shape, bool)
    updates, weights, classes = [], [], []
    for i in range(len(cuts) + 1):
        m = (cls == i) & interior
        if m.sum() < MIN_CLASS_VOXELS:
            continue
        got = _class_update(d.raw[m] + corr[m], d.rings[m], d.radius, d.order)
        if got is None:
            continue
        updates.append(got[0])
        weights.append(1.0 / got[1] ** 2)
        classes.append({"level": round(float(np.median(cls_values[m])), 1),
                        "voxels": int(m.sum()), "update": round(float(got[0][0]), 2),
                        "se": round(float(got[1][0]), 2)})
    return updates, weights, classes


def fit_cupping(sample: np.ndarray, ys: np.ndarray | None = None, xs: np.ndarray | None = None,
                *, plane: tuple[int, int] | None = None,
                centre_yx: tuple[float, float] | None = None, radius: float | None = None,
                order: int = 1, iterations: int = 12, name: str = "CT") -> Cupping:
    """Fit the radial correction to a CT sample (Z, Y, X) (or one (Y, X) slide).

    ``ys``/``xs`` are the global voxel rows/columns of the sample's grid (default
    ``arange``: the sample is whole planes); ``plane`` is the full volume's (ny, nx) (the
    default centre and radius come from it; default: the sample's own extent).
    ``centre_yx`` and ``radius`` override the reconstruction centre/circle.
    """
    v = np.asarray(sample, np.float32)
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3 or min(v.shape) < 1:
        raise InputError(f"{name}: cupping fit needs a (Z, Y, X) volume or a 2D slide, got "
                         f"shape {np.shape(sample)}")
    if not 1 <= int(order) <= MAX_ORDER:
        raise UsageError(f"cupping order {order!r}: expected 1..{MAX_ORDER}")
    if not np.all(np.isfinite(v)):
        raise InputError(f"{name}: NaN/Inf in the CT; replace them before fitting cupping")
    _, ny, nx = v.shape
    ys = np.arange(ny, dtype=np.float64) if ys is None else np.asarray(ys, np.float64)
    xs = np.arange(nx, dtype=np.float64) if xs is None else np.asarray(xs, np.float64)
    centre0, radius0 = default_geometry(plane or (ny, nx))
    centre = tuple(float(c) for c in (centre_yx or centre0))
    radius = float(radius or radius0)
    if not radius > 0:
        raise UsageError(f"cupping radius {radius!r}: expected > 0 voxels")
    step = float(ys[1] - ys[0]) if ys.size > 1 else 1.0   # px of the sample in voxels
    r = np.sqrt((ys[:, None] - centre[0]) ** 2 + (xs[None, :] - centre[1]) ** 2)
    inside2d = r < radius
    zero = Cupping((centre[0], centre[1]), radius, (0.0,) * int(order))
    edge = ndimage.gaussian_filter(v, (0, EDGE_SIGMA, EDGE_SIGMA))
    grad = np.hypot(ndimage.sobel(edge, axis=1), ndimage.sobel(edge, axis=2))
    inside = np.broadcast_to(inside2d, v.shape)
    if not inside.any():
        return _with_info(zero, "no voxels inside the reconstruction circle", 0, [])
    flat = (grad < np.quantile(grad[inside], FLAT_QUANTILE)) & inside
    if flat.sum() < MIN_CLASS_VOXELS:
        return _with_info(zero, "no flat regions (constant CT)", 0, [])
    rr = np.broadcast_to(r, v.shape)[flat]
    smooth_full = ndimage.gaussian_filter(v, (0, CLASS_SIGMA, CLASS_SIGMA))
    data = _FitData(smooth_full=smooth_full, flat=flat,
                    smooth=smooth_full[flat].astype(np.float64), raw=v[flat].astype(np.float64),
                    rings=np.floor(rr / step).astype(np.int64),   # 1-px rings of the sample
                    basis=_basis(rr / radius, int(order)), basis2d=_basis(r / radius, int(order)),
                    radius=radius / step, order=int(order))
    coeffs = np.zeros(int(order))
    classes: list[dict[str, float]] = []
    best: tuple[float, np.ndarray, list[dict[str, float]]] | None = None
    it = 0
    for it in range(1, iterations + 1):
        updates, weights, classes = _class_updates(data, coeffs)
        if not updates:
            return _with_info(zero, "no grey-level class spans enough radii", it, [])
        u, w = np.asarray(updates), np.asarray(weights)
        delta = np.array([_weighted_median(u[:, k], w[:, k]) for k in range(int(order))])
        size = float(np.max(np.abs(delta)))
        if best is None or size < best[0]:
            best = (size, coeffs.copy(), classes)
        coeffs = coeffs + delta
        if size < 2.0:
            break
    else:   # no fixed point (the classes flip between states): the most self-consistent
        assert best is not None  # state seen, i.e. the one whose classes asked least change
        coeffs, classes = best[1], best[2]
    noise = float(1.4826 * np.median(np.abs(np.diff(v, axis=-1))) / math.sqrt(2.0))
    out = Cupping((centre[0], centre[1]), radius, tuple(float(a) for a in coeffs))
    converged = bool(best is not None and best[0] < 2.0)
    # [no silent wrong answers] a fit without a fixed point says so, with what remained
    return _with_info(out, "fitted" if converged else "not converged", it, classes,
                      noise=noise, voxels=int(flat.sum()), converged=converged,
                      residual=round(float(best[0]) if best is not None else 0.0, 1))


def _with_info(c: Cupping, status: str, iterations: int, classes: list[dict[str, float]],
               **extra: Any) -> Cupping:
    info = {"status": status, "iterations": iterations, "classes": classes, **extra}
    return Cupping(c.centre_yx, c.radius, c.coeffs, info)


# --------------------------------------------------------------------------- volumes


def fit_sample_planes(shape: tuple[int, int, int], max_voxels: int = MAX_FIT_VOXELS
                      ) -> tuple[int, int]:
    """(z stride, in-plane stride) so that a fit reads at most ``max_voxels`` voxels."""
    nz, ny, nx = shape
    s = max(1, math.ceil(math.sqrt(ny * nx / max_voxels)))
    per_plane = math.ceil(ny / s) * math.ceil(nx / s)
    planes = max(1, max_voxels // per_plane)
    return max(1, math.ceil(nz / planes)), s


def fit_source(source: Any, *, centre_yx: tuple[float, float] | None = None,
               radius: float | None = None, order: int = 1,
               max_voxels: int = MAX_FIT_VOXELS) -> Cupping:
    """Fit on a :class:`~hpcstain.volume.io.VolumeSource` (strided planes of the volume)."""
    nz, ny, nx = source.shape
    zs, s = fit_sample_planes((nz, ny, nx), max_voxels)
    planes = [np.asarray(source.read((slice(z, z + 1), slice(0, ny), slice(0, nx))),
                         np.float32)[0, ::s, ::s] for z in range(zs // 2, nz, zs)]
    c = fit_cupping(np.stack(planes), np.arange(0, ny, s), np.arange(0, nx, s),
                    plane=(ny, nx), centre_yx=centre_yx, radius=radius, order=order,
                    name=str(getattr(source, "spec", "CT")))
    return Cupping(c.centre_yx, c.radius, c.coeffs,
                   {**c.info, "z_stride": zs, "plane_stride": s})


# --------------------------------------------------------------------------- slide sets

Shape = tuple[int, int]
FIT_CHOICES = ("checkpoint", "slide", "set")   # predict/evaluate --cupping-fit


def check_fit_choice(choice: str) -> str:
    c = str(choice).strip().lower()
    if c not in FIT_CHOICES:
        raise UsageError(f"--cupping-fit {choice!r}: choose one of {', '.join(FIT_CHOICES)}")
    return c


def fit_slides(cts: Sequence[np.ndarray], order: int = 1) -> dict[Shape, Cupping]:
    """The training rule: **one** fit per group of equally sized 2D axial CT slides, on all
    of the group's slides together (strided to ≤ ``MAX_FIT_VOXELS``): shape → fit.

    Axial sections of one acquisition share the scanner's cupping, and one slide alone
    holds too few voxels for a stable fit. ``info["slides"]`` counts the group's slides.
    """
    groups: dict[Shape, list[int]] = {}
    for i, ct in enumerate(cts):
        if np.ndim(ct) != 2:
            raise InputError(f"CT slide {i}: cupping fit of slides needs 2D slides, got shape "
                             f"{np.shape(ct)}")
        groups.setdefault((int(ct.shape[0]), int(ct.shape[1])), []).append(i)
    out: dict[Shape, Cupping] = {}
    for (ny, nx), idx in sorted(groups.items()):
        step = max(1, math.ceil(math.sqrt(len(idx) * ny * nx / MAX_FIT_VOXELS)))
        stack = np.stack([np.asarray(cts[i])[::step, ::step] for i in idx])
        c = fit_cupping(stack, np.arange(0, ny, step), np.arange(0, nx, step), plane=(ny, nx),
                        order=order, name=f"{len(idx)} CT slides of {ny}×{nx}")
        out[(ny, nx)] = Cupping(c.centre_yx, c.radius, c.coeffs,
                                {**c.info, "slides": len(idx), "plane_stride": step})
    return out


def fits_record(fits: Mapping[Shape, Cupping]) -> list[dict[str, Any]]:
    """Plain (checkpoint- and JSON-safe) record of per-shape fits: ``[{"shape": [ny, nx],
    "slides": n, "fit": Cupping.to_dict()}, …]``."""
    import json

    rows = [{"shape": [int(s) for s in shape], "slides": int(c.info.get("slides", 0)),
             "fit": c.to_dict()} for shape, c in sorted(fits.items())]
    return json.loads(json.dumps(rows))   # plain Python types only (weights_only loading)


def fits_from_record(record: Any, source: str = "checkpoint") -> dict[Shape, Cupping]:
    """Inverse of :func:`fits_record`; a damaged record is one InputError naming ``source``."""
    if record is None:
        return {}
    out: dict[Shape, Cupping] = {}
    try:
        for row in record:
            ny, nx = (int(v) for v in row["shape"])
            out[(ny, nx)] = Cupping.from_dict(row["fit"], source)
            int(out[(ny, nx)].info.get("slides", 0))  # fits_record (info, pinning) needs it
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{source}: bad stored cupping fits ({exc})") from None
    return out


def resolve_cupping(source: Any, cupping: Any, trained: str | None, override: bool = False,
                    what: str = "checkpoint") -> Cupping | None:
    """A volume's cupping correction (a fitted :class:`Cupping`) or None.

    ``cupping``: None follows the checkpoint's training mode ``trained`` (``radial`` → fit,
    else none); ``"auto"`` fits, ``"none"`` does not; a Cupping is used as given. Staining
    with a preprocessing other than the checkpoint's (``what`` names it) is refused (the
    generator would see CT it was never trained on) unless ``override``.
    """
    if cupping is None:
        want = "radial" if trained == "radial" else "none"
    elif isinstance(cupping, Cupping):
        want = "radial"
    elif str(cupping).strip().lower() in ("auto", "radial", "none"):
        want = "none" if str(cupping).strip().lower() == "none" else "radial"
    else:
        raise UsageError(f"cupping {cupping!r}: choose auto or none")
    if trained is not None and want != trained and not override:
        asked = "auto" if want == "radial" else "none"
        raise UsageError(f"{what}: trained with cupping correction {trained!r} "
                         f"(data.cupping) but this run asks for --cupping {asked}; the "
                         "generator would see CT preprocessed differently from its training "
                         "data. Drop --cupping to follow the checkpoint, or pass "
                         "--cupping-override to stain anyway")
    if want == "none":
        return None
    return cupping if isinstance(cupping, Cupping) else fit_source(source)


def volume_fit_line(c: Cupping) -> str:
    """``cupping: +5411 grey values on the axis (y, x = 31.5, 31.5), 0 at r >= 32.0 ...``."""
    centre = ", ".join(f"{v:.1f}" for v in c.centre_yx)
    warn = ("; WARNING: the fit did not converge (its classes still asked for "
            f"{c.info.get('residual')} grey values; check it with `hpcstain cupping VOL "
            "--json`)" if c.info.get("converged") is False else "")
    return (f"cupping: +{c.depth:.0f} grey values on the axis (y, x = {centre}), "
            f"0 at r >= {c.radius:.1f} voxels; coefficients "
            f"{', '.join(f'{a:.1f}' for a in c.coeffs)}{warn}")


def describe_fit(c: Cupping) -> str:
    """``+2688 grey values on the axis (16 slides, curvature 0.164 grey/px²)``."""
    n = c.info.get("slides")
    who = f"{n} slide{'s' if n != 1 else ''}, " if n else ""
    return (f"{c.depth:+.0f} grey values on the axis ({who}curvature "
            f"{c.coeffs[0] / c.radius ** 2:.3f} grey/px²)")


def slide_fits(read: Callable[[int], np.ndarray], n: int, stored: Mapping[Shape, Cupping],
               choice: str = "checkpoint", names: Sequence[str] | None = None
               ) -> tuple[list[Cupping], str | None]:
    """The correction of each of ``n`` CT slides (``read(i)`` → (H, W)) and one note line
    (None when there is nothing to say) — how ``predict`` and ``evaluate`` apply a
    ``radial`` checkpoint:

    * ``checkpoint`` (default): a slide of a shape the model was trained on takes the
      training set's stored fit (exactly the training preprocessing); slides of other shapes
      (or every slide, for a checkpoint without stored fits) get the training *rule*: one
      fit over all the given slides of that shape — noted;
    * ``set``: the training rule on the given slides, ignoring the stored fits;
    * ``slide``: every slide fitted alone (the old behaviour; unstable on small slides).

    Only the slides that are set-fitted are kept in memory until the fit.
    """
    choice = check_fit_choice(choice)
    names = list(names) if names is not None else [f"CT slide {i}" for i in range(n)]
    out: list[Cupping | None] = [None] * n
    pending: dict[int, np.ndarray] = {}
    for i in range(n):
        ct = np.asarray(read(i))
        shape = (int(ct.shape[0]), int(ct.shape[1])) if ct.ndim == 2 else (-1, -1)
        if choice == "slide":
            out[i] = fit_cupping(ct, name=names[i])
        elif choice == "checkpoint" and shape in stored:
            out[i] = stored[shape]
        else:
            pending[i] = ct
    fitted = fit_slides(list(pending.values())) if pending else {}
    for i, ct in pending.items():
        out[i] = fitted[(int(ct.shape[0]), int(ct.shape[1]))]
    final = [c for c in out if c is not None]
    assert len(final) == n
    if not fitted:
        return final, None
    done = "; ".join(f"{ny}×{nx}: {describe_fit(c)}" for (ny, nx), c in fitted.items())
    if choice == "set":
        why = "--cupping-fit set"
    elif not stored:
        why = "the checkpoint stores no training fit (trained before fits were recorded)"
    else:
        trained = ", ".join(f"{ny}×{nx}" for ny, nx in sorted(stored))
        why = f"no training fit for this slide size (the checkpoint has {trained})"
    return final, (f"cupping: {why}; fitted one correction over the given slides of each "
                   f"size: {done}")
