"""A physical CT chain for the phantom (``--physics tomo``): the sample is scanned, not rendered.

Per z-slice (parallel beam, rotation axis along z through the volume centre):

1. **Materials.** Every label is a material with a density ρ, an electron density
   (ρ·Z/A) and a photoelectric mass coefficient at 30 keV (``MATERIALS``, fitted to NIST
   XCOM totals at 30/60/100 keV within ~10 %). The renderer's per-voxel attenuation
   (maturity, texture, pitting) scales the density, so bone maturity still shows.
2. **Energy dependence** (Alvarez–Macovski basis): μ(x, E) = P(x)·(30 keV/E)³ +
   n_e(x)·σ_KN(E), photoelectric + Compton (Klein–Nishina). Ti's photoelectric term is
   ~27× its Compton term at 30 keV, tissue's about equal: metal hardens far more. Two
   maps per slice (P and n_e) are blurred by the imaging PSF (3D Gaussian, with a z halo
   like the renderer's), projected once each; every energy bin is a cheap combination.
3. **Spectrum**: 5 bins (``POLY_BINS``, a filtered white beam about ``energy_kev``) or
   one (``mono``); energy-integrating detector.
4. **Propagation-based phase contrast** (optional, ``phase_distance`` m): the transport-
   of-intensity equation along the detector row, I_z = I₀ + z·∂ᵤ(I₀ ∂ᵤΔ), Δ = ∫δ dl with
   δ = r_e λ² n_e / 2π per energy bin: bright/dark edge fringes.
5. **Detector**: Gaussian blur along the row, fixed residual gain errors per column plus a
   few defective columns (rings; ``rings`` strength, 0 = off) and a small per-pixel part,
   Poisson counts at ``flux`` photons per pixel and projection in the flat field (0 =
   noiseless); zero counts (photon starvation behind Ti) are clamped at 0.5.
6. **Paganin** retrieval (optional, ``paganin`` = δ/β at ``energy_kev``), then −log and
   filtered back-projection (ramp × window, matched pixel-driven projector/back-projector:
   numpy, checked against ``skimage.transform.radon/iradon`` in the tests; skimage's
   radon is ~5× slower here, 1 s per 256² slice).
7. **Grey scale**: uint16 = ``grey_offset`` + ``grey_scale`` · μ[1/cm] (beamline-like;
   not the renderer's air 10000 / bone 30000).

Physical scale: the sample radius (tube ≈ 0.97 r) is ``sample_radius_mm`` (3 mm, the
paper's ~6 mm block), whatever the grid: transmissions and starvation are those of the
real sample; finer grids show finer fringes for the same distance (fringe ∝ z/pixel²).
All random terms are keyed by (seed, absolute slice index) or (seed, detector column), so
a slab equals the same slices of the whole volume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

from hpcstain.errors import UsageError
from hpcstain.phantom.render import SCREW_ATTENUATION, attenuation, stain
from hpcstain.phantom.sample import LABELS, Sample, Tissue, tissue_at

R_E_CM = 2.8179403e-13          # classical electron radius (cm)
N_A = 6.02214076e23
HC_KEV_CM = 12.398420e-8         # λ[cm] = HC / E[keV]
ME_KEV = 510.999
E_REF = 30.0                     # keV, reference energy of the photoelectric coefficients
PSF_SIGMA = 0.6                  # voxels, 3D Gaussian imaging PSF (object side)
PSF_HALO = 3                     # slices each side; int(4 * 0.6 + 0.5)
POLY_BINS = ((0.62, 0.12), (0.80, 0.26), (1.00, 0.30), (1.25, 0.21), (1.60, 0.11))
FILTERS = ("ramp", "shepp-logan", "hann")
PHYSICS = ("render", "tomo")


@dataclass(frozen=True)
class Material:
    """ρ (g/cm³), Z/A, photoelectric mass coefficient at 30 keV (cm²/g)."""

    rho: float
    z_over_a: float
    pe30: float


# Photoelectric at 30 keV = NIST XCOM total − Klein–Nishina (ρ·Z/A·N_A·σ_KN); the ~E⁻³ law
# then reproduces the 60 keV totals within ~5 % (water 0.204 vs 0.206 cm²/g, cortical bone
# 0.312 vs 0.315, Ti 0.75 vs 0.766). Mg/PEEK/polypropylene/Mg(OH)₂ from Z⁴/A scaling of
# Al, C and O; ICRU soft tissue and cortical bone.
MATERIALS: dict[str, Material] = {
    "air": Material(0.0, 0.5, 0.0),
    "polypropylene": Material(0.90, 0.571, 0.065),      # sample tube
    "soft_tissue": Material(1.03, 0.550, 0.176),
    "cortical_bone": Material(1.92, 0.515, 1.146),
    "new_bone": Material(1.45, 0.530, 0.62),           # low-mineralised woven bone
    "degradation": Material(1.70, 0.500, 0.41),         # Mg(OH)₂ / phosphate layer
    "mg": Material(1.738, 0.494, 0.77),
    "ti": Material(4.506, 0.460, 4.80),
    "peek": Material(1.32, 0.520, 0.088),
}
# label → (material, the renderer's nominal attenuation of it): density ∝ render / nominal
LABEL_MATERIAL: dict[str, tuple[str, float]] = {
    "background": ("air", 1.0), "tube": ("polypropylene", 0.12),
    "soft_tissue": ("soft_tissue", 0.17), "cortical_bone": ("cortical_bone", 0.96),
    "trabecular_bone": ("cortical_bone", 0.96), "new_bone": ("new_bone", 0.55),
    "degradation": ("degradation", 0.42), "vessel": ("soft_tissue", 0.17),
    "lacuna": ("soft_tissue", 0.17),
}


@dataclass(frozen=True)
class TomoParams:
    """Knobs of the physical CT chain (``hpcstain phantom ... --physics tomo``)."""

    flux: float = 10000.0            # photons / detector pixel / projection (0: noiseless)
    rings: float = 1.0               # detector gain-error strength (0: no rings)
    phase_distance: float = 0.0      # propagation distance, m (0: absorption only)
    paganin: float = 0.0             # δ/β of the Paganin filter (0: off)
    spectrum: str = "poly"           # "poly" (5 bins) or "mono"
    energy_kev: float = 40.0         # mean energy of the spectrum
    angles: int = 0                  # projections over 180° (0: ⌈π/2 · detector width⌉)
    sample_radius_mm: float = 3.0    # physical size of 1 normalised unit
    grey_offset: float = 4000.0      # uint16 of μ = 0
    grey_scale: float = 6000.0       # uint16 per 1/cm
    detector_blur: float = 0.5       # detector PSF σ along the row (pixels)
    filter: str = "shepp-logan"      # FBP window: ramp, shepp-logan, hann

    def attrs(self) -> dict[str, object]:
        """Provenance: every knob plus the units of the grey scale."""
        return {"model": "tomo", **asdict(self),
                "units": "uint16 = grey_offset + grey_scale * mu[1/cm]"}


def check_tomo(p: TomoParams) -> TomoParams:
    """``p`` if every knob is usable, else a UsageError naming the knob."""
    def bad(name: str, why: str) -> UsageError:
        flag = {"energy_kev": "energy", "sample_radius_mm": "sample-radius"}.get(
            name, name.replace("_", "-"))
        return UsageError(f"tomo: --{flag} {getattr(p, name)!r}: {why}")

    for f in fields(p):
        v = getattr(p, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f.name, "must be a finite number")
    if p.flux != 0 and not 1.0 <= p.flux <= 1e9:
        raise bad("flux", "expected 0 (noiseless) or 1–1e9 photons per pixel")
    if not 0.0 <= p.rings <= 20.0:
        raise bad("rings", "expected a strength in [0, 20] (0: off, 1: default)")
    if not 0.0 <= p.phase_distance <= 100.0:
        raise bad("phase_distance", "expected a distance in [0, 100] m")
    if not 0.0 <= p.paganin <= 1e5:
        raise bad("paganin", "expected δ/β in [0, 1e5] (0: off; ~1000 for bone)")
    if p.paganin and not p.phase_distance:
        raise UsageError("tomo: --paganin needs a --phase-distance > 0 (it inverts the "
                         "propagation)")
    if p.spectrum not in ("poly", "mono"):
        raise bad("spectrum", "choose poly or mono")
    if not 10.0 <= p.energy_kev <= 200.0:
        raise bad("energy_kev", "expected 10–200 keV")
    if int(p.angles) != p.angles or not (p.angles == 0 or 8 <= p.angles <= 20000):
        raise bad("angles", "expected 0 (automatic) or an integer 8–20000")
    if not 0.01 <= p.sample_radius_mm <= 1000:
        raise bad("sample_radius_mm", "expected 0.01–1000 mm")
    if not (0 <= p.grey_offset <= 65535 and 0 < p.grey_scale <= 1e6):
        raise UsageError(f"tomo: --grey {p.grey_offset!r} {p.grey_scale!r}: expected an "
                         "offset in [0, 65535] and a scale > 0 (uint16 per 1/cm)")
    if not 0.0 <= p.detector_blur <= 10:
        raise bad("detector_blur", "expected 0–10 pixels")
    if p.filter not in FILTERS:
        raise bad("filter", f"choose one of {', '.join(FILTERS)}")
    return p


# --------------------------------------------------------------------------- physics


def sigma_kn(e_kev: float) -> float:
    """Klein–Nishina total cross-section per electron (cm²)."""
    k = e_kev / ME_KEV
    l2 = math.log1p(2 * k)
    return 2 * math.pi * R_E_CM ** 2 * (
        (1 + k) / k ** 2 * (2 * (1 + k) / (1 + 2 * k) - l2 / k)
        + l2 / (2 * k) - (1 + 3 * k) / (1 + 2 * k) ** 2)


def spectrum(p: TomoParams) -> list[tuple[float, float]]:
    """(energy keV, weight) bins, weights summing to 1."""
    if p.spectrum == "mono":
        return [(p.energy_kev, 1.0)]
    total = sum(w for _, w in POLY_BINS)
    return [(p.energy_kev * r, w / total) for r, w in POLY_BINS]


def mu(material: str | Material, e_kev: float) -> float:
    """Linear attenuation (1/cm) of a material at one energy (the model's, not XCOM's)."""
    m = MATERIALS[material] if isinstance(material, str) else material
    return m.rho * (m.pe30 * (E_REF / e_kev) ** 3 + m.z_over_a * N_A * sigma_kn(e_kev))


def delta(material: str | Material, e_kev: float) -> float:
    """Refractive index decrement δ = r_e λ² n_e / 2π of a material."""
    m = MATERIALS[material] if isinstance(material, str) else material
    lam = HC_KEV_CM / e_kev
    return R_E_CM * lam ** 2 * m.rho * m.z_over_a * N_A / (2 * math.pi)


def basis_maps(t: Tissue, material: str) -> tuple[np.ndarray, np.ndarray]:
    """Photoelectric coefficient at 30 keV (1/cm) and electron density (mol e/cm³) per voxel."""
    a = attenuation(t, material)
    pe = np.zeros(a.shape, np.float32)
    ne = np.zeros(a.shape, np.float32)
    table = dict(LABEL_MATERIAL)
    table["screw"] = (material, SCREW_ATTENUATION[material])
    for name, (mat, nominal) in table.items():
        sel = t.labels == LABELS[name]
        if not sel.any() or mat == "air":
            continue
        m = MATERIALS[mat]
        d = a[sel] / np.float32(nominal)
        pe[sel] = d * np.float32(m.rho * m.pe30)
        ne[sel] = d * np.float32(m.rho * m.z_over_a)
    return pe, ne


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Parallel-beam geometry of an (ny, nx) slice rotating about (cy, cx)."""

    ny: int
    nx: int
    cy: float
    cx: float
    n_det: int
    theta: np.ndarray                # radians in [0, π)

    @property
    def u_c(self) -> float:
        """Detector column of the rotation axis (an integer: a ring's radius = |column − u_c|)."""
        return (self.n_det - 1) / 2.0


def make_geometry(ny: int, nx: int, cy: float | None = None, cx: float | None = None,
                  angles: int = 0) -> Geometry:
    """A detector wide enough for the slice's corners (odd width, axis on a pixel centre)."""
    cy = (ny - 1) / 2.0 if cy is None else float(cy)
    cx = (nx - 1) / 2.0 if cx is None else float(cx)
    r = math.hypot(max(cy, ny - 1 - cy), max(cx, nx - 1 - cx))
    n_det = 2 * math.ceil(r) + 3
    n = int(angles) or math.ceil(math.pi / 2 * n_det)
    return Geometry(ny, nx, cy, cx, n_det, np.arange(n) * (math.pi / n))


def _rays(g: Geometry, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detector coordinate of every pixel centre at angle ``theta[k]``: (i0, w, 1 − w)."""
    y = np.arange(g.ny, dtype=np.float64) - g.cy
    x = np.arange(g.nx, dtype=np.float64) - g.cx
    c, s = math.cos(g.theta[k]), math.sin(g.theta[k])
    u = np.add.outer((y * s).astype(np.float32), (x * c + g.u_c).astype(np.float32)).ravel()
    i0 = u.astype(np.intp)              # u >= 1 (the detector covers the corners): floor
    w = u - i0.astype(np.float32)
    return i0, w, np.float32(1) - w


def project(g: Geometry, maps: np.ndarray) -> np.ndarray:
    """Line integrals (pixel units) of ``maps`` (k, ny, nx) → sinograms (k, n_angles, n_det).

    Pixel-driven with linear interpolation onto the detector; :func:`backproject` is its
    exact transpose (a matched pair).
    """
    k = maps.shape[0]
    flat = maps.reshape(k, -1).astype(np.float32, copy=False)
    out = np.empty((k, g.theta.size, g.n_det), np.float64)
    offs = (np.arange(k, dtype=np.intp) * g.n_det)[:, None]
    size = k * g.n_det
    for a in range(g.theta.size):
        i0, w, w0 = _rays(g, a)
        idx = (i0[None, :] + offs).ravel()
        s = np.bincount(idx, (flat * w0).ravel(), size + 1)
        s[1:] += np.bincount(idx, (flat * w).ravel(), size + 1)[:-1]
        out[:, a] = s[:size].reshape(k, g.n_det)
    return out


def backproject(g: Geometry, sino: np.ndarray) -> np.ndarray:
    """Σ over angles of ``sino`` (k, n_angles, n_det) interpolated at each pixel → (k, ny, nx)."""
    k = sino.shape[0]
    out = np.zeros((k, g.ny * g.nx), np.float32)
    pad = np.zeros((k, g.n_det + 1), np.float32)
    for a in range(g.theta.size):
        i0, w, w0 = _rays(g, a)
        pad[:, :g.n_det] = sino[:, a]
        out += pad[:, i0] * w0
        out += pad[:, i0 + 1] * w
    return out.reshape(k, g.ny, g.nx)


def ramp_filter(sino: np.ndarray, window: str = "ramp") -> np.ndarray:
    """Filter along the last axis: the discrete ramp of Kak & Slaney (no DC offset) × window."""
    n = sino.shape[-1]
    size = max(64, 1 << (2 * n - 1).bit_length())
    j = np.concatenate([np.arange(1, size // 2 + 1, 2), np.arange(size // 2 - 1, 0, -2)])
    h = np.zeros(size)
    h[0] = 0.25
    h[1::2] = -1.0 / (np.pi * j) ** 2
    filt = 2 * np.real(np.fft.fft(h))
    f = np.fft.fftfreq(size)
    if window == "shepp-logan":
        filt[1:] *= np.sinc(f[1:])
    elif window == "hann":
        filt *= 0.5 * (1 + np.cos(2 * np.pi * f))
    spec = np.fft.rfft(sino, size, axis=-1) * filt[: size // 2 + 1]
    return np.fft.irfft(spec, size, axis=-1)[..., :n]


def fbp(g: Geometry, sino: np.ndarray, window: str = "ramp") -> np.ndarray:
    """Filtered back-projection of (k, n_angles, n_det) pixel-unit sinograms → (k, ny, nx)."""
    q = ramp_filter(sino, window).astype(np.float32)
    return backproject(g, q) * np.float32(math.pi / (2 * g.theta.size))


# --------------------------------------------------------------------------- detector


def detector_gains(seed: int, g: Geometry, z: int, rings: float) -> np.ndarray:
    """Residual flat-field gain of each detector column at slice ``z`` (float64 (n_det,)).

    Fixed per column (keyed by the seed only): 0.2 % spread on every column plus one
    defective column in 60 within the sample (±0.5–1.5 %), each × ``rings``; a per-pixel
    part (0.05 %) keyed by (seed, z). ``rings`` 0 gives ones.
    """
    if rings == 0:
        return np.ones(g.n_det)
    rng = np.random.default_rng([int(seed), 0x21A7])
    col = 0.002 * rng.standard_normal(g.n_det)
    r_max = min(g.cy, g.cx, g.ny - 1 - g.cy, g.nx - 1 - g.cx)
    n_bad = max(2, g.n_det // 60)
    bad = rng.integers(-int(r_max * 0.95), int(r_max * 0.95) + 1, n_bad) + int(g.u_c)
    col[bad] += rng.uniform(0.005, 0.015, n_bad) * rng.choice([-1.0, 1.0], n_bad)
    pix = 0.0005 * np.random.default_rng([int(seed), 0x21A8, int(z) + 2**20]) \
        .standard_normal(g.n_det)
    return 1.0 + rings * (col + pix)


def _tie(trans: np.ndarray, dlt: np.ndarray, z_cm: float, pix_cm: float) -> np.ndarray:
    """I_z = I₀ + z ∂ᵤ(I₀ ∂ᵤΔ) along the last axis (TIE, edge values extended)."""
    tp = np.pad(trans, [(0, 0)] * (trans.ndim - 1) + [(1, 1)], mode="edge")
    dp = np.pad(dlt, [(0, 0)] * (dlt.ndim - 1) + [(1, 1)], mode="edge")
    t_half = 0.5 * (tp[..., 1:] + tp[..., :-1])
    flux = t_half * np.diff(dp, axis=-1)
    return trans + (z_cm / pix_cm ** 2) * np.diff(flux, axis=-1)


def paganin_filter(img: np.ndarray, p: TomoParams, pix_cm: float) -> np.ndarray:
    """Paganin's single-material retrieval along the last axis: F⁻¹[F[I] / (1 + z δ/μ k²)]."""
    lam = HC_KEV_CM / p.energy_kev
    d_over_mu = p.paganin * lam / (4 * math.pi)          # δ/μ = (δ/β) / 2k
    n = img.shape[-1]
    size = 1 << (2 * n - 1).bit_length()
    padded = np.pad(img, [(0, 0)] * (img.ndim - 1) + [(0, size - n)], mode="edge")
    k = 2 * math.pi * np.fft.rfftfreq(size) / pix_cm
    filt = 1.0 / (1.0 + p.phase_distance * 100.0 * d_over_mu * k ** 2)
    return np.fft.irfft(np.fft.rfft(padded, axis=-1) * filt, size, axis=-1)[..., :n]


def measure(g: Geometry, pe: np.ndarray, ne: np.ndarray, z_indices: list[int] | np.ndarray,
            p: TomoParams, seed: int, pix_cm: float, gains: np.ndarray | None = None
            ) -> np.ndarray:
    """Projections −ln(I/I_flat) (k, n_angles, n_det) of the basis maps of k slices.

    ``gains`` (n_det,) or (k, n_det) overrides :func:`detector_gains` (tests).
    """
    both = project(g, np.concatenate([pe, ne]))
    lp = both[:len(pe)] * pix_cm                      # photoelectric line integral at 30 keV
    ln = both[len(pe):] * (pix_cm * N_A)              # electrons / cm²
    intensity = np.zeros_like(lp)
    for e, w in spectrum(p):
        t = np.exp(-(lp * (E_REF / e) ** 3 + ln * sigma_kn(e)))
        if p.phase_distance:
            dl = ln * (R_E_CM * (HC_KEV_CM / e) ** 2 / (2 * math.pi))
            t = np.maximum(_tie(t, dl, p.phase_distance * 100.0, pix_cm), 0.0)
        intensity += w * t
    if p.detector_blur:
        intensity = ndimage.gaussian_filter1d(intensity, p.detector_blur, axis=-1,
                                              mode="nearest")
    out = np.empty_like(intensity)
    for j, z in enumerate(z_indices):
        if gains is None:
            gain = detector_gains(seed, g, int(z), p.rings)
        else:
            gain = gains if gains.ndim == 1 else gains[j]
        row = intensity[j] * gain
        if p.flux:
            rng = np.random.default_rng([int(seed), 0x7C0, int(z) + 2**20])
            row = np.maximum(rng.poisson(row * p.flux), 0.5) / p.flux
        if p.paganin:
            row = paganin_filter(row, p, pix_cm)
        out[j] = -np.log(np.maximum(row, 1e-6))
    return out


def reconstruct(g: Geometry, pe: np.ndarray, ne: np.ndarray, z_indices: list[int] | np.ndarray,
                p: TomoParams, seed: int, pix_cm: float, gains: np.ndarray | None = None
                ) -> np.ndarray:
    """Reconstructed μ (1/cm, float32 (k, ny, nx)) of k slices' basis maps."""
    sino = measure(g, pe, ne, z_indices, p, seed, pix_cm, gains)
    return fbp(g, sino, p.filter) / np.float32(pix_cm)


def to_grey(mu_cm: np.ndarray, p: TomoParams, gain: float = 1.0, offset: float = 0.0
            ) -> np.ndarray:
    """uint16 = grey_offset + offset + gain · grey_scale · μ."""
    v = mu_cm * np.float32(gain * p.grey_scale) + np.float32(p.grey_offset + offset)
    return np.clip(np.rint(v), 0, 65535).astype(np.uint16)


def pixel_cm(s: Sample, p: TomoParams) -> float:
    """Physical voxel edge (cm): ``sample_radius_mm`` per ``s.rf`` voxels."""
    return p.sample_radius_mm / 10.0 / s.rf


def tomo_slab(s: Sample, z0: int, z1: int, ny: int, nx: int, p: TomoParams,
              gain: float = 1.0, offset: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT (uint16), stain (uint8 RGB) and labels (uint8) of slices ``z0 .. z1-1``, scanned.

    The stain and labels are the renderer's (``render_slab``) exactly; the CT is the
    physical chain of this module. Slabs of any cut agree with the whole volume.
    """
    h = PSF_HALO
    z = np.arange(z0 - h, z1 + h, dtype=np.float32).reshape(-1, 1, 1)
    y = np.arange(ny, dtype=np.float32).reshape(1, -1, 1)
    x = np.arange(nx, dtype=np.float32).reshape(1, 1, -1)
    tissue = tissue_at(s, (z, y, x))
    pe, ne = basis_maps(tissue, s.material)
    inner = slice(h, h + z1 - z0)
    pe = ndimage.gaussian_filter(pe, PSF_SIGMA, truncate=4.0, mode="nearest")[inner]
    ne = ndimage.gaussian_filter(ne, PSF_SIGMA, truncate=4.0, mode="nearest")[inner]
    labels = tissue.labels[inner]
    rgb = stain(Tissue(labels, tissue.maturity[inner], tissue.texture[inner],
                       tissue.hue[inner], tissue.pitting[inner]))
    g = make_geometry(ny, nx, s.centre[1], s.centre[2], p.angles)
    mu_cm = reconstruct(g, pe, ne, np.arange(z0, z1), p, s.seed, pixel_cm(s, p))
    return to_grey(mu_cm, p, gain, offset), rgb, labels


def nominal_levels(p: TomoParams) -> dict[str, float]:
    """Grey values of air and of dense cortical bone at the spectrum's mean μ (no hardening):
    a rough key for the attrs (``ct_air``, ``ct_dense_bone``); read levels off the CT."""
    bone = sum(w * mu("cortical_bone", e) for e, w in spectrum(p))
    return {"ct_air": p.grey_offset, "ct_dense_bone": p.grey_offset + p.grey_scale * bone}
