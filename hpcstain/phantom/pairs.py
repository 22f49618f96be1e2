"""Paired 2D whole slides: CT slice, histology, correspondence mask, exact truth.

A pair is one phantom sample seen twice. The CT image is the axis-aligned slice of the
CT forward model; the truth is the exact stain of that same slice. The histology is the
stain of a slightly oblique plane near it, rendered at ``SUPERSAMPLE``× resolution through
an affine + elastic warp (soft tissue moves most), box-downsampled, then given the
section's preparation artefacts (cracks, saw striations, stain droplets, an optional
missing region) and the microscope session's colour drift. The warp's size is one knob,
``misalignment`` (0 none, 1 the default, 3 strong), for measuring learned alignment.

Sections can lie along any plane (``orientation``): ``z`` (the default, an axial slice of
the tomographic geometry), ``y`` or ``x`` (the slice a real scan of the sample shows
across those axes, with the same CT forward model) or a random plane (the CT model
evaluated on that plane, as an oblique slice resampled from a real volume would show it).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from hpcstain.atomic import atomic_output, check_output
from hpcstain.errors import UsageError
from hpcstain.phantom.render import (
    BLUR_HALO,
    BLUR_SIGMA,
    CT_GAIN,
    CUPPING,
    NOISE_SIGMA,
    PALETTE,
    attenuation,
    ct_artefacts_2d,
    render_slab,
    ring_profile,
    slice_noise,
    stain,
    to_uint16,
)
from hpcstain.phantom.sample import (
    LABELS,
    MATERIALS,
    RIGID_LABELS,
    Sample,
    Tissue,
    make_sample,
    tissue_at,
)
from hpcstain.phantom.tomo import TomoParams, check_tomo, tomo_slab
from hpcstain.phantom.volume import PHANTOM_VERSION, VOXEL_SIZE_UM

MATERIAL_RATIO = {"mg": 7, "ti": 1, "peek": 2}     # the paper's Mg:Ti:PEEK
SUPERSAMPLE = 2
MANIFEST_COLUMNS = ("id", "material", "ct", "histology", "mask", "truth")
PAIRS_PER_SESSION = 4                              # slides sharing one colour drift
ORIENTATIONS = ("z", "y", "x", "mixed", "random", "volume")  # write_pairs(orientation=)
MIXED_CYCLE = ("z", "y", "x")                      # orientation "mixed": pair i → [i % 3]
VOLUME_SPREAD = 0.65  # orientation "volume": |offset| ≤ 0.65 r (the sample spans ~±0.67 r)
Z_DEPTH = 64                                       # slices of the volume a z-pair is cut from
MAX_MISALIGNMENT = 5.0                             # write_pairs(misalignment=...) upper bound


@dataclass
class Pair:
    """One rendered pair; images share the shape (H, W)."""

    ct: np.ndarray           # uint16 (H, W)
    histology: np.ndarray    # uint8 (H, W, 3)
    mask: np.ndarray         # uint8 (H, W), 0 or 255
    truth: np.ndarray        # uint8 (H, W, 3): exact stain of the CT slice
    labels: np.ndarray       # uint8 (H, W): labels of the CT slice
    histology_labels: np.ndarray   # uint8 (H, W): labels seen by the (warped) histology
    missing: np.ndarray      # bool (H, W): section lost in preparation
    orientation: str = "z"   # "z", "y", "x" or "random": the plane of the CT section
    section: Section | None = None   # where that plane lies in its volume


@dataclass(frozen=True)
class Section:
    """Where a pair's CT slice lies, in voxel indices (z, y, x) of the volume it is cut from.

    Image pixel ``(i, j)`` of the (H, W) slice sits at
    ``centre + (i - (H-1)/2) * row + (j - (W-1)/2) * col``; ``normal`` is perpendicular
    to the plane. Axis-aligned kinds have ``index``: the slice's index along their axis.
    """

    kind: str                                  # "z", "y", "x" or "random"
    volume_shape: tuple[int, int, int]         # (Z, Y, X) of the scan: sets the sample
    centre: tuple[float, float, float]
    normal: tuple[float, float, float]
    row: tuple[float, float, float]
    col: tuple[float, float, float]
    index: int | None = None

    def points(self, rows: np.ndarray, cols: np.ndarray,
               offsets: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """(z, y, x) float32 of image rows × cols (× ``offsets`` along the normal first)."""
        k = np.zeros(1) if offsets is None else np.asarray(offsets, np.float64)
        i = np.asarray(rows, np.float64)[None, :, None]
        j = np.asarray(cols, np.float64)[None, None, :]
        out = tuple((self.centre[d] + k[:, None, None] * self.normal[d] + i * self.row[d]
                     + j * self.col[d]).astype(np.float32) for d in range(3))
        return out if offsets is not None else tuple(a[0] for a in out)


def check_orientation(orientation: str) -> str:
    """One of ``ORIENTATIONS`` (case-insensitive) or a UsageError listing them."""
    o = str(orientation).strip().lower()
    if o not in ORIENTATIONS:
        raise UsageError(f"pairs: unknown orientation {orientation!r}: choose one of "
                         f"{', '.join(ORIENTATIONS)}")
    return o


def pair_orientation(orientation: str, index: int) -> str:
    """The section kind of pair ``index``: ``mixed`` cycles z, y, x; others are as given."""
    o = check_orientation(orientation)
    return MIXED_CYCLE[index % len(MIXED_CYCLE)] if o == "mixed" else o


def plan_section(kind: str, size: tuple[int, int], seed: int, index: int) -> Section:
    """Place pair ``index``'s CT slice (deterministic from ``seed``, ``index``).

    * ``z``: the middle slice of a ``Z_DEPTH`` × H × W volume (today's pairs).
    * ``y``: a slice perpendicular to y of an H × D × W volume (D = min(H, W), so the
      anatomy has the z-pairs' scale); rows are z, columns x (the volume engine's y-slice
      layout); its y is drawn in [-0.5, 0.3] normalised units from the centre (across the
      screw, from below the head to the shank).
    * ``x``: a slice perpendicular to x of an H × W × D volume; rows z, columns y; x within
      ±0.12 of the centre (along the screw axis, like z-slices but across the long bone).
    * ``random``: a uniformly random unit normal and in-plane rotation, through a point
      within ±0.1 (along the normal) of the centre of an S³ volume (S = min(H, W)).
    * ``volume``: a z, y or x slice (cycled by ``index``, in the volume engine's row/column
      layout) of an S³ volume, anywhere within ±``VOLUME_SPREAD`` of the centre: the
      off-centre slices a whole-volume stain meets, which sections through the implant
      never show (docs/results.md "Why 3D scores below 2D").
    """
    h, w = size
    d = min(h, w)
    rf = d / 2.0
    rng = np.random.default_rng([int(seed), 0x5EC7, int(index)])
    e = np.eye(3)
    if kind == "z":
        z0 = Z_DEPTH // 2
        return Section("z", (Z_DEPTH, h, w), (float(z0), (h - 1) / 2.0, (w - 1) / 2.0),
                       (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), z0)
    if kind == "y":
        y0 = int(np.clip(round((d - 1) / 2.0 + rng.uniform(-0.5, 0.3) * rf), 0, d - 1))
        return Section("y", (h, d, w), ((h - 1) / 2.0, float(y0), (w - 1) / 2.0),
                       (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), y0)
    if kind == "x":
        x0 = int(np.clip(round((d - 1) / 2.0 + rng.uniform(-0.12, 0.12) * rf), 0, d - 1))
        return Section("x", (h, w, d), ((h - 1) / 2.0, (w - 1) / 2.0, float(x0)),
                       (0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), x0)
    if kind == "volume":  # a z, y or x slice (by index) anywhere in an S³ volume
        axis = index % 3
        row, col = {0: (e[1], e[2]), 1: (e[0], e[2]), 2: (e[0], e[1])}[axis]
        centre = np.full(3, (d - 1) / 2.0)
        centre[axis] += rng.uniform(-VOLUME_SPREAD, VOLUME_SPREAD) * rf
        return Section("volume", (d, d, d), _vec(centre), _vec(e[axis]), _vec(row), _vec(col))
    if kind != "random":
        raise UsageError(f"pairs: unknown section kind {kind!r}")
    n = rng.standard_normal(3)
    while np.linalg.norm(n) < 1e-6:
        n = rng.standard_normal(3)
    n = n / np.linalg.norm(n)
    u = np.cross(n, e[int(np.argmin(np.abs(n)))])
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    phi = rng.uniform(0.0, 2 * np.pi)
    row = np.cos(phi) * u + np.sin(phi) * v
    col = np.cross(n, row)
    centre = np.full(3, (d - 1) / 2.0) + rng.uniform(-0.1, 0.1) * rf * n
    return Section("random", (d, d, d), _vec(centre), _vec(n), _vec(row), _vec(col))


def _vec(a: np.ndarray) -> tuple[float, float, float]:
    return float(a[0]), float(a[1]), float(a[2])


def _swing(s: Sample, z: np.ndarray | int) -> np.ndarray | np.float32:
    """Slow modulation of the ring amplitude along z (as in ``render.render_slab``)."""
    if isinstance(z, int):
        return np.float32(1.0 + 0.35 * np.sin(2 * np.pi * z / (2.1 * s.rf + 5) + s.seed % 7))
    return (1.0 + 0.35 * np.sin(2 * np.pi * z.astype(np.float64) / (2.1 * s.rf + 5)
                                + s.seed % 7)).astype(np.float32)


def _calibrate(a: np.ndarray, gain: float, offset: float) -> np.ndarray:
    if gain != 1.0 or offset != 0.0:
        a = a * np.float32(gain) + np.float32(offset / CT_GAIN)
    return to_uint16(a)


def _axis_section(s: Sample, sec: Section, gain: float, offset: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A y- or x-slice, bit-identical to that slice of ``make_volume(sec.volume_shape)``.

    Only the slab the 3D blur needs is evaluated: all of z (plus the halo beyond the
    volume, as ``render_slab`` does) × ``2 * BLUR_HALO + 1`` planes about the slice ×
    the whole other axis; planes beyond the volume repeat its edge plane, which is what
    the volume's ``mode="nearest"`` blur sees. Rings, cupping and the per-z-slice noise
    are the rows (columns) of the z-slices' 2D maps that the slice cuts.
    """
    nz, ny, nx = sec.volume_shape
    axis = 1 if sec.kind == "y" else 2
    i0 = int(sec.index)  # type: ignore[arg-type]
    hb = BLUR_HALO
    window = np.clip(np.arange(i0 - hb, i0 + hb + 1), 0, sec.volume_shape[axis] - 1)
    z = np.arange(-hb, nz + hb, dtype=np.float32).reshape(-1, 1, 1)
    y = (window if axis == 1 else np.arange(ny)).astype(np.float32).reshape(1, -1, 1)
    x = (window if axis == 2 else np.arange(nx)).astype(np.float32).reshape(1, 1, -1)
    tissue = tissue_at(s, (z, y, x))
    a = attenuation(tissue, s.material)
    a = ndimage.gaussian_filter(a, BLUR_SIGMA, truncate=4.0, mode="nearest")
    pick = (slice(hb, hb + nz), hb, slice(None)) if axis == 1 else \
        (slice(hb, hb + nz), slice(None), hb)
    a = np.ascontiguousarray(a[pick])
    labels = np.ascontiguousarray(tissue.labels[pick])
    rgb = stain(Tissue(labels, tissue.maturity[pick], tissue.texture[pick],
                       tissue.hue[pick], tissue.pitting[pick]))
    cup, rings = ct_artefacts_2d(s, ny, nx)

    def line(m: np.ndarray) -> np.ndarray:
        return m[i0, :] if axis == 1 else m[:, i0]

    a -= line(cup)
    rings_line = line(rings)
    for k in range(nz):
        a[k] += rings_line * _swing(s, k) + _noise_line(s, k, ny, nx, axis, i0)
    return _calibrate(a, gain, offset), rgb, labels


def _noise_line(s: Sample, z: int, ny: int, nx: int, axis: int, i0: int) -> np.ndarray:
    """Row ``i0`` (axis 1) or column ``i0`` (axis 2) of ``render.slice_noise(s, z, ny, nx)``,
    bit-identical (tested) but without generating or filtering the whole slice.

    Mirrors ``slice_noise``: the slice's normals are drawn row by row (a prefix of rows is
    a prefix of the draws) and filtered along y then x (σ 0.6, radius 2, wrap); only the
    ±2 rows/columns about the line go through the filter whose output is kept.
    """
    rng = np.random.default_rng([s.seed, 0x7015E, z + 2**20])
    near = np.arange(-2, 3)
    if axis == 1:
        rows = (i0 + near) % ny
        raw = rng.standard_normal((int(rows.max()) + 1, nx), dtype=np.float32)
        line = ndimage.gaussian_filter1d(raw[rows], 0.6, axis=0, mode="wrap")[2:3]
        line = ndimage.gaussian_filter1d(line, 0.6, axis=1, mode="wrap")[0]
    else:
        raw = rng.standard_normal((ny, nx), dtype=np.float32)
        block = ndimage.gaussian_filter1d(raw[:, (i0 + near) % nx], 0.6, axis=0, mode="wrap")
        line = ndimage.gaussian_filter1d(block, 0.6, axis=1, mode="wrap")[:, 2]
    return line * np.float32(NOISE_SIGMA / 0.4)


def _interp_noise(s: Sample, z: np.ndarray, y: np.ndarray, x: np.ndarray,
                  ny: int, nx: int) -> np.ndarray:
    """The volume's per-slice noise trilinearly resampled at points (as in an oblique reslice).

    Slices are generated one at a time (memory stays two (ny, nx) slices); in y and x the
    noise repeats with the slice (``grid-wrap``), so a plane reaching past the scanned
    square still sees noise.
    """
    zf = np.floor(z).astype(np.int64)
    t = (z - zf).astype(np.float32)
    out = np.zeros(z.shape, np.float32)
    nxt = None
    for zi in range(int(zf.min()), int(zf.max()) + 1):
        cur = nxt if nxt is not None else slice_noise(s, zi, ny, nx)
        nxt = slice_noise(s, zi + 1, ny, nx)
        sel = zf == zi
        if not sel.any():
            continue
        pts = [y[sel], x[sel]]
        v0 = ndimage.map_coordinates(cur, pts, order=1, mode="grid-wrap", output=np.float32)
        v1 = ndimage.map_coordinates(nxt, pts, order=1, mode="grid-wrap", output=np.float32)
        out[sel] = v0 + (v1 - v0) * t[sel]
    return out


def _oblique_section(s: Sample, sec: Section, size: tuple[int, int], gain: float,
                     offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CT model on an arbitrary plane: a rotated (2·halo+1)-layer grid about the plane
    is evaluated and blurred (the Gaussian PSF is isotropic, so blurring in the rotated
    frame is the 3D blur); cupping and rings are evaluated at each pixel's radius from
    the rotation axis, the ring swing at its z, and the per-z-slice noise is resampled
    trilinearly, as reslicing a reconstructed volume would."""
    h, w = size
    hb = BLUR_HALO
    rows = np.arange(-hb, h + hb) - (h - 1) / 2.0
    cols = np.arange(-hb, w + hb) - (w - 1) / 2.0
    pts = sec.points(rows, cols, np.arange(-hb, hb + 1))
    tissue = tissue_at(s, pts)  # type: ignore[arg-type]
    inner = (hb, slice(hb, hb + h), slice(hb, hb + w))
    a = attenuation(tissue, s.material)
    a = np.ascontiguousarray(
        ndimage.gaussian_filter(a, BLUR_SIGMA, truncate=4.0, mode="nearest")[inner])
    labels = np.ascontiguousarray(tissue.labels[inner])
    rgb = stain(Tissue(labels, tissue.maturity[inner], tissue.texture[inner],
                       tissue.hue[inner], tissue.pitting[inner]))
    z, y, x = (np.ascontiguousarray(p[inner]) for p in pts)
    _, ny, nx = sec.volume_shape
    r = np.hypot(y - np.float32(s.centre[1]), x - np.float32(s.centre[2]))
    r_out = np.float32((s.tube_r + s.tube_t) * s.rf)
    cup = np.float32(CUPPING) * np.clip(1 - (r / r_out) ** 2, 0, 1)
    radii, profile = ring_profile(s)
    rings = np.interp(r, radii, profile).astype(np.float32)
    a -= cup
    a += rings * _swing(s, z) + _interp_noise(s, z, y, x, ny, nx)
    return _calibrate(a, gain, offset), rgb, labels


def render_section(s: Sample, sec: Section, size: tuple[int, int], gain: float = 1.0,
                   offset: float = 0.0, tomo: TomoParams | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT (uint16), truth stain (uint8 RGB) and labels (uint8) of ``sec``, each (H, W).

    ``tomo``: the CT slice is scanned by the physical chain (z sections only)."""
    if tomo is not None and sec.kind != "z":
        raise UsageError(f"pairs: --physics tomo scans z sections only, not {sec.kind!r} "
                         "(use --orientation z)")
    if sec.kind == "z":
        _, ny, nx = sec.volume_shape
        i0 = int(sec.index)  # type: ignore[arg-type]
        ct, rgb, labels = (render_slab(s, i0, i0 + 1, ny, nx, gain=gain, offset=offset)
                           if tomo is None else
                           tomo_slab(s, i0, i0 + 1, ny, nx, tomo, gain=gain, offset=offset))
        return ct[0], rgb[0], labels[0]
    if sec.kind in ("y", "x"):
        return _axis_section(s, sec, gain, offset)
    return _oblique_section(s, sec, size, gain, offset)


def shifted_section(sec: Section, offset: int) -> Section:
    """``sec`` moved ``offset`` voxels along its normal (the neighbouring CT plane).

    Axis-aligned sections keep an integer index (mirrored at the volume's border, edge not
    repeated, as the stain engine mirrors its context slices), so each plane is exactly a
    slice of the volume the section is cut from; oblique ones move their centre.
    """
    if offset == 0:
        return sec
    if sec.index is None:
        centre = tuple(c + offset * n for c, n in zip(sec.centre, sec.normal, strict=True))
        return replace(sec, centre=centre)  # type: ignore[arg-type]
    axis = {"z": 0, "y": 1, "x": 2}[sec.kind]
    size = sec.volume_shape[axis]
    index = sec.index + offset
    index = -index if index < 0 else (2 * (size - 1) - index if index >= size else index)
    centre = list(sec.centre)
    centre[axis] = float(index)
    return replace(sec, centre=tuple(centre), index=index)  # type: ignore[arg-type]


def render_ct_slab(material: str, sample_seed: int, size: tuple[int, int], seed: int,
                   index: int, orientation: str = "z", planes: int = 5,
                   tomo: TomoParams | None = None) -> np.ndarray:
    """The ``planes`` CT planes (uint16 (K, H, W)) about pair ``index``'s section, one voxel
    apart along its normal; the centre plane is the pair's CT, bit for bit.

    Every plane goes through :func:`render_section` with the pair's sample and calibration
    drift, so neighbours carry the same forward model (blur, cupping, rings, per-slice
    noise) as the volume they would be cut from. The histology's random draws are not
    touched: writing slabs leaves every other file of a pair set unchanged.
    """
    if planes < 1 or planes % 2 == 0:
        raise UsageError(f"pairs: --ct-slab {planes!r} must be an odd number of planes >= 1")
    h, w = size
    kind = pair_orientation(orientation, index)
    sec = plan_section(kind, (h, w), seed, index)
    s = make_sample(sec.volume_shape, material, sample_seed)
    drift = _session_drift(seed, index // PAIRS_PER_SESSION)
    half = planes // 2
    return np.stack([render_section(s, shifted_section(sec, d), (h, w), gain=drift["ct_gain"],
                                    offset=drift["ct_offset"], tomo=tomo)[0]
                     for d in range(-half, half + 1)])


def allocate_materials(n: int, seed: int) -> list[str]:
    """``n`` materials in the 7:1:2 ratio (largest remainder), shuffled by the seed."""
    total = sum(MATERIAL_RATIO.values())
    quotas = {m: n * r / total for m, r in MATERIAL_RATIO.items()}
    counts = {m: int(q) for m, q in quotas.items()}
    by_remainder = sorted(MATERIALS, key=lambda m: (-(quotas[m] - counts[m]), MATERIALS.index(m)))
    for m in by_remainder[: n - sum(counts.values())]:
        counts[m] += 1
    materials = [m for m in MATERIALS for _ in range(counts[m])]
    order = np.random.default_rng([int(seed), 0xA110C]).permutation(n)
    return [materials[k] for k in order]


def _plane_basis(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """In-plane unit vectors (z, y, x) of a section tilted 1-3° about a random axis."""
    tilt = np.deg2rad(rng.uniform(1.0, 3.0))
    beta = rng.uniform(0, 2 * np.pi)
    axis = np.array([0.0, np.cos(beta), np.sin(beta)])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(tilt) * k + (1 - np.cos(tilt)) * (k @ k)
    return rot @ np.array([0.0, 1.0, 0.0]), rot @ np.array([0.0, 0.0, 1.0])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random 2D field (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma,
                                mode="reflect")
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def _warp(rng: np.random.Generator, labels_ct: np.ndarray, scale: float,
          strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Source-plane (row, col) for each fine output pixel: affine + tissue-weighted elastic.

    ``strength`` (the misalignment knob) multiplies every deviation from the identity:
    rotation, scale, shear, translation and the elastic amplitude. The random draws do not
    depend on it, so slides of one seed differ between strengths only in their warp; 1 is
    the default phantom (bit-identical), 0 no in-plane misalignment at all.
    """
    h, w = labels_ct.shape
    hs, ws = h * SUPERSAMPLE, w * SUPERSAMPLE
    rows = (np.arange(hs, dtype=np.float32) + 0.5) / SUPERSAMPLE - 0.5
    cols = (np.arange(ws, dtype=np.float32) + 0.5) / SUPERSAMPLE - 0.5
    r, c = np.meshgrid(rows, cols, indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    k = float(strength)
    ang = np.deg2rad(rng.uniform(-2.0, 2.0)) * k
    sy, sx = 1 + rng.uniform(-0.03, 0.03, size=2) * k
    shear = rng.uniform(-0.02, 0.02) * k
    ty, tx = rng.uniform(-3.0, 3.0, size=2) * scale * k
    a = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) \
        @ np.array([[sy, shear], [0.0, sx]])
    dr, dc = r - cy, c - cx
    src_r = a[0, 0] * dr + a[0, 1] * dc + cy + ty
    src_c = a[1, 0] * dr + a[1, 1] * dc + cx + tx
    # elastic: soft tissue and background move up to ~6 px (at 512), rigid bone ~1 px
    soft = ~np.isin(labels_ct, RIGID_LABELS)
    weight = ndimage.gaussian_filter(np.where(soft, 1.0, 0.15).astype(np.float32), 3.0)
    sigma = max(2.0, 0.04 * min(h, w))
    amp = 5.0 * scale * k
    fields = [_smooth_field(rng, (h, w), sigma) * weight * np.float32(amp) for _ in range(2)]
    up = [ndimage.map_coordinates(f, [r, c], order=1, mode="nearest") for f in fields]
    return (src_r + up[0]).astype(np.float32), (src_c + up[1]).astype(np.float32)


def _downsample(a: np.ndarray) -> np.ndarray:
    """Box-average SUPERSAMPLE² blocks of an (Hs, Ws, C) array."""
    f = SUPERSAMPLE
    hs, ws = a.shape[:2]
    return a.reshape(hs // f, f, ws // f, f, *a.shape[2:]).mean(axis=(1, 3))


def _segment_distance(shape: tuple[int, int], p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the segment p0-p1 (row, col)."""
    r, c = np.indices(shape, dtype=np.float32)
    d = p1 - p0
    t = np.clip(((r - p0[0]) * d[0] + (c - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    return np.hypot(r - (p0[0] + t * d[0]), c - (p0[1] + t * d[1]))


def _cracks(rng: np.random.Generator, rigid: np.ndarray) -> np.ndarray:
    """A few thin jagged cracks through rigid bone (bool)."""
    h, w = rigid.shape
    out = np.zeros((h, w), bool)
    starts = np.argwhere(rigid)
    if len(starts) == 0:
        return out
    for _ in range(rng.integers(1, 5)):
        p = starts[rng.integers(len(starts))].astype(np.float32)
        heading = rng.uniform(0, 2 * np.pi)
        width = rng.uniform(0.5, 1.3)
        for _ in range(rng.integers(3, 7)):
            heading += rng.normal(0, 0.5)
            step = rng.uniform(0.02, 0.06) * min(h, w)
            q = p + step * np.array([np.sin(heading), np.cos(heading)], dtype=np.float32)
            out |= _segment_distance((h, w), p, q) < width
            p = q
    return out & ndimage.binary_dilation(rigid, iterations=2)


def _missing_region(rng: np.random.Generator, rigid: np.ndarray) -> np.ndarray:
    """With probability 0.35, an elliptical piece of the section lost at its edge (bool)."""
    h, w = rigid.shape
    if rng.random() >= 0.35 or not rigid.any():
        return np.zeros((h, w), bool)
    edge = np.argwhere(rigid & ~ndimage.binary_erosion(rigid, iterations=1))
    cy, cx = edge[rng.integers(len(edge))]
    ry, rx = rng.uniform(0.06, 0.14, size=2) * min(h, w)
    r, c = np.indices((h, w), dtype=np.float32)
    return ((r - cy) / ry) ** 2 + ((c - cx) / rx) ** 2 < 1.0


def _section_artefacts(rng: np.random.Generator, rgb: np.ndarray, labels: np.ndarray,
                       missing: np.ndarray) -> np.ndarray:
    """Missing region, cracks, saw striations and stain droplets on a float RGB slide."""
    h, w = labels.shape
    background = np.asarray(PALETTE["background"], np.float32)
    rigid = np.isin(labels, RIGID_LABELS)
    rgb[missing] = background
    rgb[_cracks(rng, rigid & ~missing)] = background * np.float32(0.97)
    tissue = (labels != LABELS["background"]) & (labels != LABELS["tube"])
    r, c = np.indices((h, w), dtype=np.float32)
    phi = rng.uniform(0, np.pi)
    along = r * np.float32(np.cos(phi)) + c * np.float32(np.sin(phi))
    across = -r * np.float32(np.sin(phi)) + c * np.float32(np.cos(phi))
    period = rng.uniform(5.0, 12.0)
    wobble = np.float32(0.8) * np.sin(across * np.float32(2 * np.pi / (0.37 * max(h, w) + 1)))
    stripes = 0.5 + 0.5 * np.sin(along * np.float32(2 * np.pi / period) + wobble)
    depth = np.float32(rng.uniform(0.03, 0.07))
    rgb[tissue] *= (1 - depth * stripes[tissue])[:, None]
    drop = np.asarray((84, 58, 142), np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rad = rng.uniform(0.01, 0.04) * min(h, w) + 1
        alpha = np.float32(rng.uniform(0.3, 0.6)) * np.clip(
            1.5 - np.hypot(r - cy, c - cx) / np.float32(rad), 0, 1)[..., None]
        rgb = rgb * (1 - alpha) + drop * alpha
    return rgb


def _session_drift(seed: int, session: int) -> dict[str, np.ndarray | float]:
    """Microscope/beamline session: white balance, gamma, brightness, CT calibration."""
    rng = np.random.default_rng([int(seed), 0xC0105, session])
    return {"wb": rng.normal(1.0, 0.03, size=3).astype(np.float32),
            "gamma": float(rng.uniform(0.9, 1.1)), "brightness": float(rng.normal(0, 4)),
            "ct_gain": float(rng.uniform(0.93, 1.07)), "ct_offset": float(rng.uniform(-800, 800))}


def render_pair(material: str, sample_seed: int, size: tuple[int, int], seed: int,
                index: int, orientation: str = "z", misalignment: float = 1.0,
                tomo: TomoParams | None = None) -> Pair:
    """Render pair ``index`` of a set (``seed``) from its own sample seed.

    ``orientation`` is the plane of the section (see ``plan_section``; ``mixed`` cycles
    z, y, x by ``index``); the histology is a slightly oblique plane near it.
    ``misalignment`` scales its in-plane affine + elastic warp (see ``_warp``).
    ``tomo``: the CT slice comes from the physical CT chain (``phantom.tomo``, z only).
    """
    h, w = size
    kind = pair_orientation(orientation, index)
    sec = plan_section(kind, (h, w), seed, index)
    s = make_sample(sec.volume_shape, material, sample_seed)
    drift = _session_drift(seed, index // PAIRS_PER_SESSION)
    rng = np.random.default_rng([int(seed), 0x415, index])
    ct, truth, labels_ct = render_section(s, sec, (h, w), gain=drift["ct_gain"],
                                          offset=drift["ct_offset"], tomo=tomo)

    scale = min(h, w) / 512.0
    e_y, e_x = _plane_basis(rng)     # tilted in the frame (normal, row, col) of the section
    frame = np.column_stack([sec.normal, sec.row, sec.col])
    e_y, e_x = frame @ e_y, frame @ e_x
    origin = np.asarray(sec.centre) + rng.uniform(-1.5, 1.5) * np.asarray(sec.normal)
    src_r, src_c = _warp(rng, labels_ct, scale, misalignment)
    dr, dc = src_r - np.float32((h - 1) / 2.0), src_c - np.float32((w - 1) / 2.0)
    pts = tuple((np.float32(origin[k]) + np.float32(e_y[k]) * dr + np.float32(e_x[k]) * dc)
                for k in range(3))
    tissue = tissue_at(s, pts)  # type: ignore[arg-type]
    fine_rgb = stain(tissue).astype(np.float32)
    f = SUPERSAMPLE
    hist_labels = tissue.labels[f // 2::f, f // 2::f]
    rgb = _downsample(fine_rgb)

    missing = _missing_region(rng, np.isin(hist_labels, RIGID_LABELS))
    rgb = _section_artefacts(rng, rgb, hist_labels, missing)
    rgb = ndimage.gaussian_filter(rgb, (0.5, 0.5, 0))
    rgb = rgb * drift["wb"] + np.float32(drift["brightness"])
    rgb = 255.0 * (np.clip(rgb, 0, 255) / 255.0) ** np.float32(drift["gamma"])
    rgb += rng.normal(0, 1.5, size=rgb.shape).astype(np.float32)
    histology = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    hull_ct = _hull(np.isin(labels_ct, RIGID_LABELS))
    hull_hist = _hull(np.isin(hist_labels, RIGID_LABELS) & ~missing)
    mask = np.where(hull_ct & hull_hist & ~missing, 255, 0).astype(np.uint8)
    return Pair(ct=ct, histology=histology, mask=mask, truth=truth, labels=labels_ct,
                histology_labels=hist_labels, missing=missing, orientation=kind, section=sec)


def _hull(region: np.ndarray) -> np.ndarray:
    return convex_hull_image(region) if region.any() else np.zeros_like(region)


def _png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _tiff_bytes(a: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, a, photometric="minisblack", metadata=None)
    return buf.getvalue()


def check_pair_args(n: int, size: tuple[int, int] | list[int]) -> tuple[int, tuple[int, int]]:
    """Validate the count and slide size (UsageError naming the value)."""
    try:
        n_int = int(n)
        dims = tuple(int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pairs: bad --n {n!r} or --size {size!r}") from exc
    if n_int != n or n_int <= 0:
        raise UsageError(f"pairs: --n {n!r} must be a positive integer")
    if len(dims) != 2 or any(v < 16 for v in dims):
        raise UsageError(f"pairs: --size {tuple(size)!r} must be two integers H W, each >= 16")
    return n_int, (dims[0], dims[1])


def check_misalignment(strength: float) -> float:
    """A finite misalignment strength in [0, MAX_MISALIGNMENT] or a UsageError naming it."""
    try:
        k = float(strength)
    except (TypeError, ValueError):
        raise UsageError(f"pairs: --misalignment {strength!r} is not a number") from None
    if not (0.0 <= k <= MAX_MISALIGNMENT):
        raise UsageError(f"pairs: --misalignment {strength!r} must be between 0 and "
                         f"{MAX_MISALIGNMENT:g}")
    return k


def write_pairs(outdir: str | Path, n: int, seed: int, size: tuple[int, int] = (512, 512),
                overwrite: bool = False, orientation: str = "z",
                misalignment: float = 1.0, ct_slab: int = 0,
                tomo: TomoParams | None = None) -> Path:
    """Write ``n`` paired slides and ``manifest.csv`` into ``outdir``; return the manifest.

    Layout: ``ct/<id>.tif`` (uint16), ``histology/<id>.png``, ``mask/<id>.png`` (0/255),
    ``truth/<id>.png`` (exact stain of the CT slice), ``labels/<id>.png`` (CT labels),
    ``phantom.json`` (provenance). The directory appears only when complete.

    ``orientation`` (``z``, ``y``, ``x``, ``mixed``, ``random``) sets the plane of each
    section. Other than ``z`` (whose output is unchanged), the manifest gains an
    ``orientation`` column (the pair's kind) and ``phantom.json`` an ``orientation`` key
    and a ``sections`` list (each pair's volume shape, centre, normal, row/col axes).

    ``misalignment`` multiplies the histology's in-plane affine + elastic warp (0: none;
    1: the default phantom, unchanged output; 3: strong); other than 1 it is recorded as
    ``misalignment`` in ``phantom.json``.

    ``ct_slab`` K > 0 (odd) also writes ``ct_slab/<id>.tif``, the K CT planes about each
    section (:func:`render_ct_slab`: multi-page uint16, centre plane = the pair's CT) for
    2.5D models (``model.context_slices``), named by a ``ct_slab`` manifest column and
    recorded as ``ct_slab`` in ``phantom.json``; every other file is unchanged.

    ``tomo``: CT slices from the physical CT chain (``--physics tomo``, z sections only;
    its knobs go to ``phantom.json`` as ``physics``); histology, masks and truth unchanged.
    """
    outdir = Path(outdir)
    n, size = check_pair_args(n, size)
    orientation = check_orientation(orientation)
    misalignment = check_misalignment(misalignment)
    tomo = _check_slab_and_tomo(ct_slab, tomo, orientation)
    check_output(outdir, overwrite)
    materials = allocate_materials(n, seed)
    sample_seeds = np.random.default_rng([int(seed), 0x5EED]).integers(0, 2**62, size=n)
    rows = []
    sections = []
    with atomic_output(outdir, overwrite) as tmp:
        for sub in ("ct", "histology", "mask", "truth", "labels") + (("ct_slab",) if ct_slab
                                                                    else ()):
            (tmp / sub).mkdir(parents=True)
        for i, material in enumerate(materials):
            row, section = _write_pair(tmp, i, material, int(sample_seeds[i]), size, seed,
                                       orientation, misalignment, ct_slab, tomo)
            if section is not None:
                sections.append(section)
            rows.append(row)
        _write_manifest(tmp / "manifest.csv", rows, orientation, ct_slab)
        info = _phantom_info(n, seed, size, orientation, sections, misalignment, ct_slab, tomo)
        (tmp / "phantom.json").write_text(json.dumps(info, indent=2) + "\n")
    return outdir / "manifest.csv"


def _check_slab_and_tomo(ct_slab: int, tomo: TomoParams | None, orientation: str
                         ) -> TomoParams | None:
    """Refuse a ``ct_slab`` that is not an odd number of planes, and ``tomo`` with other than
    z sections; returns ``tomo`` checked."""
    if ct_slab and (int(ct_slab) != ct_slab or ct_slab < 1 or ct_slab % 2 == 0):
        raise UsageError(f"pairs: --ct-slab {ct_slab!r} must be an odd number of planes >= 1")
    if tomo is not None:
        tomo = check_tomo(tomo)
        if orientation != "z":
            raise UsageError(f"pairs: --physics tomo scans z sections only, not "
                             f"--orientation {orientation} (use --orientation z)")
    return tomo


def _write_pair(tmp: Path, i: int, material: str, sample_seed: int, size: tuple[int, int],
                seed: int, orientation: str, misalignment: float, ct_slab: int,
                tomo: TomoParams | None) -> tuple[dict[str, str], dict[str, object] | None]:
    """Render pair ``i`` and write its files into ``tmp``; returns its manifest row and,
    for other than z sections, its ``sections`` entry of ``phantom.json``."""
    pid = f"pair_{i:03d}"
    pair = render_pair(material, sample_seed, size, seed, i, orientation,
                       misalignment, tomo=tomo)
    files = {"ct": f"ct/{pid}.tif", "histology": f"histology/{pid}.png",
             "mask": f"mask/{pid}.png", "truth": f"truth/{pid}.png"}
    (tmp / files["ct"]).write_bytes(_tiff_bytes(pair.ct))
    (tmp / files["histology"]).write_bytes(_png_bytes(pair.histology))
    (tmp / files["mask"]).write_bytes(_png_bytes(pair.mask))
    (tmp / files["truth"]).write_bytes(_png_bytes(pair.truth))
    (tmp / f"labels/{pid}.png").write_bytes(_png_bytes(pair.labels))
    row = {"id": pid, "material": material, **files}
    if ct_slab:
        slab = render_ct_slab(material, sample_seed, size, seed, i,
                              orientation, int(ct_slab), tomo=tomo)
        (tmp / f"ct_slab/{pid}.tif").write_bytes(_tiff_bytes(slab))
        row["ct_slab"] = f"ct_slab/{pid}.tif"
    section = None
    if orientation != "z":
        row["orientation"] = pair.orientation
        section = {"id": pid, **_section_info(pair.section)}
    return row, section


def _write_manifest(path: Path, rows: list[dict[str, str]], orientation: str, ct_slab: int
                    ) -> None:
    """``manifest.csv``: the base columns, then ``orientation`` and ``ct_slab`` when used."""
    columns = MANIFEST_COLUMNS if orientation == "z" else (*MANIFEST_COLUMNS, "orientation")
    if ct_slab:
        columns = (*columns, "ct_slab")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())


def _phantom_info(n: int, seed: int, size: tuple[int, int], orientation: str,
                  sections: list[dict[str, object]], misalignment: float, ct_slab: int,
                  tomo: TomoParams | None) -> dict[str, object]:
    """``phantom.json``'s provenance: generator, seed, sizes, labels, palette, and the
    options that differ from the default phantom."""
    info: dict[str, object] = {
        "generator": "hpcstain.phantom", "generator_version": PHANTOM_VERSION,
        "seed": int(seed), "n": n, "size_hw": list(size),
        "voxel_size_um": VOXEL_SIZE_UM, "labels": dict(LABELS),
        "palette": {k: list(v) for k, v in PALETTE.items()},
        "supersample": SUPERSAMPLE, "pairs_per_session": PAIRS_PER_SESSION}
    if orientation != "z":
        info.update({"orientation": orientation, "sections": sections})
    if misalignment != 1.0:
        info["misalignment"] = misalignment
    if ct_slab:
        info["ct_slab"] = int(ct_slab)
    if tomo is not None:
        info["physics"] = tomo.attrs()
    return info


def _section_info(sec: Section | None) -> dict[str, object]:
    """JSON form of a section (vectors rounded to 1e-6)."""
    assert sec is not None
    info: dict[str, object] = {
        "orientation": sec.kind, "volume_shape_zyx": list(sec.volume_shape),
        **{k: [round(float(v), 6) for v in getattr(sec, k)]
           for k in ("centre", "normal", "row", "col")}}
    if sec.index is not None:
        info["index"] = int(sec.index)
    return info
