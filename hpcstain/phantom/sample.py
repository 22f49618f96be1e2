"""The phantom sample: a bone-implant block as an implicit function of 3D position.

Layout (normalised units, 1 = half the smaller in-plane edge of the field of view; z is
the tomographic rotation axis, the screw axis runs along y so every z-slice is a
longitudinal section through the screw, like the paper's histology):

* a sample tube wall (cylinder about z) and air/resin outside the block;
* a trephine block (cylinder about the screw axis) holding soft tissue;
* a long-bone shaft (cylinder along x): cortical shell with Haversian canals, marrow
  cavity with a trabecular network denser near the endosteum;
* a threaded screw (helical thread, head, conical tip); for Mg a corroded residual
  core, a degradation layer and patches of new low-mineralised bone next to it;
* few-voxel lacunae in all bone.

Macro-anatomy scales with the field of view; vessels, lacunae and texture are sized in
voxels so they stay resolvable at any volume size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcstain.errors import UsageError
from hpcstain.phantom.noise import Coords, Lattice, cell_index, cell_uniforms, fbm

LABELS: dict[str, int] = {
    "background": 0, "tube": 1, "soft_tissue": 2, "cortical_bone": 3, "trabecular_bone": 4,
    "new_bone": 5, "degradation": 6, "screw": 7, "vessel": 8, "lacuna": 9,
}
MATERIALS: tuple[str, ...] = ("mg", "ti", "peek")
BONE_LABELS: tuple[int, ...] = tuple(LABELS[k] for k in (
    "cortical_bone", "trabecular_bone", "new_bone", "vessel", "lacuna"))
RIGID_LABELS: tuple[int, ...] = (*BONE_LABELS, LABELS["degradation"], LABELS["screw"])

_LACUNA_CELL = 6.0                       # voxels; one candidate lacuna per cell
_LACUNA_SEMI = (1.0, 1.1, 2.0)           # voxels (z, y, x): flattened, long along the bone
_TEXTURE_SPACING = 2.2                   # voxels


@dataclass(frozen=True)
class Sample:
    """All parameters of one phantom sample (drawn from the seed; units noted per field)."""

    material: str
    seed: int
    centre: tuple[float, float, float]   # voxel index of the normalised origin (z, y, x)
    rf: float                            # voxels per normalised unit
    tube_r: float                        # inner radius of the tube wall
    tube_t: float                        # wall thickness
    block_r: float                       # trephine radius about the screw axis
    block_y: tuple[float, float]         # block extent along the screw axis
    screw_zx: tuple[float, float]        # screw axis position (z, x)
    r_major: float                       # thread crest radius
    r_minor: float                       # thread root radius
    pitch: float
    thread_phase: float
    y_head: float                        # top of the screw head
    head_h: float
    head_r: float
    y_tip: float
    tip_len: float
    corrosion: float                     # Mg: depth of metal lost from the surface
    swell: float                         # Mg: degradation layer beyond the original surface
    new_bone_w: float                    # Mg: width of the new-bone band
    shaft_yz: tuple[float, float]        # long-bone axis (along x) position (y, z)
    shaft_ro: float                      # periosteal radius
    shaft_ri: float                      # endosteal radius
    trab_thr: float                      # trabecular level-set half-width (unit noise)
    vessel_cell: float                   # voxels between candidate canals
    keys: tuple[int, ...]                # seeds of the noise streams
    screw_scale: float = 1.0             # screw radii (crest, thread depth, head) × this
    cupping: float | None = None         # attenuation lost at the axis; None: render.CUPPING

    def lattice(self, key: int, spacing_norm: float, minimum: float = 3.0) -> Lattice:
        """A noise lattice whose spacing is given in normalised units (>= ``minimum`` vox)."""
        return Lattice(self.keys[key], max(minimum, spacing_norm * self.rf))


def check_material(material: str) -> str:
    """Normalise a material name (``mg``, ``ti``, ``peek``) or fail with the choices."""
    m = str(material).strip().lower()
    if m not in MATERIALS:
        raise UsageError(f"unknown material {material!r}: choose one of {', '.join(MATERIALS)}")
    return m


SCREW_SCALE_RANGE = (0.25, 2.0)   # beyond 2 the head leaves the sample tube


def check_screw_scale(screw_scale: float) -> float:
    """A screw size factor in ``SCREW_SCALE_RANGE`` or a UsageError naming the range."""
    lo, hi = SCREW_SCALE_RANGE
    try:
        v = float(screw_scale)
    except (TypeError, ValueError):
        v = float("nan")
    if not lo <= v <= hi:
        raise UsageError(f"screw scale {screw_scale!r}: expected a number in [{lo:g}, {hi:g}]")
    return v


CUPPING_RANGE = (0.0, 0.5)   # attenuation units lost at the rotation axis


def check_cupping(cupping: float | None) -> float | None:
    """A cupping depth in ``CUPPING_RANGE`` (None: the renderer's default) or a UsageError."""
    if cupping is None:
        return None
    lo, hi = CUPPING_RANGE
    try:
        v = float(cupping)
    except (TypeError, ValueError):
        v = float("nan")
    if not lo <= v <= hi:
        raise UsageError(f"cupping {cupping!r}: expected a depth in [{lo:g}, {hi:g}] "
                         "attenuation units (0.05 is the default, 1 = dense bone)")
    return v


def make_sample(shape: tuple[int, int, int], material: str, seed: int,
                screw_scale: float = 1.0, cupping: float | None = None) -> Sample:
    """Draw a sample for a volume of ``shape``; the anatomy depends only on the seed.

    ``screw_scale`` multiplies the screw's radii (crest radius, thread depth, head); 1 is
    the M2-like default, and the rest of the sample does not change with it. ``cupping``
    is the CT's cupping depth (attenuation units at the rotation axis; None: the
    renderer's ``CUPPING``); it changes the CT only.
    """
    rng = np.random.default_rng([int(seed), 0x5A3])
    u = rng.uniform
    nz, ny, nx = shape
    rf = min(ny, nx) / 2.0
    scale = check_screw_scale(screw_scale)
    r_major = 0.30 * u(0.93, 1.07) * scale
    shaft_ro = u(0.55, 1.1)
    shaft_t = u(0.16, 0.26)
    y_head = -0.72 + u(-0.03, 0.03)
    head_h = 0.08
    shaft_y = (y_head + head_h + 0.02) + shaft_ro
    keys = tuple(int(k) for k in rng.integers(0, 2**62, size=16))
    return Sample(
        material=check_material(material), seed=int(seed),
        centre=((nz - 1) / 2.0, (ny - 1) / 2.0, (nx - 1) / 2.0), rf=rf,
        tube_r=0.935 + u(-0.01, 0.01), tube_t=0.035,
        block_r=u(0.62, 0.7), block_y=(y_head - 0.06, u(0.62, 0.72)),
        screw_zx=(u(-0.03, 0.03), u(-0.06, 0.06)),
        r_major=r_major, r_minor=r_major - 0.07 * scale, pitch=0.135 * u(0.95, 1.05),
        thread_phase=u(0.0, 1.0), y_head=y_head, head_h=head_h, head_r=r_major * 1.55,
        y_tip=u(0.36, 0.5), tip_len=0.12,
        corrosion=u(0.025, 0.06), swell=u(0.012, 0.025), new_bone_w=u(0.025, 0.045),
        shaft_yz=(shaft_y, u(-0.1, 0.1)), shaft_ro=shaft_ro, shaft_ri=shaft_ro - shaft_t,
        trab_thr=u(0.36, 0.46), vessel_cell=max(7.0, 0.035 * rf), keys=keys,
        screw_scale=scale, cupping=check_cupping(cupping),
    )


@dataclass
class Tissue:
    """What the sample holds at each point: label plus the fields colour and CT read."""

    labels: np.ndarray      # uint8, LABELS codes
    maturity: np.ndarray    # float32 in [0, 1]: bone age (1 = old, dense, light purple)
    texture: np.ndarray     # float32 unit noise at a few voxels: fine tissue texture
    hue: np.ndarray         # float32 unit noise, coarse: soft-tissue colour variation
    pitting: np.ndarray     # float32 unit noise: degradation-layer structure


def _screw_distance(s: Sample, zn: np.ndarray, yn: np.ndarray,
                    xn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Approximate signed distance to the original screw surface (negative inside)."""
    dz = zn - np.float32(s.screw_zx[0])
    dx = xn - np.float32(s.screw_zx[1])
    r = np.sqrt(dz * dz + dx * dx)
    theta = np.arctan2(dz, dx) * np.float32(1.0 / (2.0 * np.pi))
    phase = (yn - np.float32(s.thread_phase)) * np.float32(1.0 / s.pitch) - theta
    phase = phase - np.floor(phase)
    crest = np.clip((np.float32(1.0) - np.abs(np.float32(2.0) * phase - 1) - 0.15) * 1.6, 0, 1)
    surface = np.float32(s.r_minor) + np.float32(s.r_major - s.r_minor) * crest
    taper = np.clip((np.float32(s.y_tip) - yn) * np.float32(1.0 / s.tip_len), 0.0, 1.0)
    surface = surface * np.sqrt(taper)
    in_head = (yn < np.float32(s.y_head + s.head_h))
    surface = np.where(in_head, np.float32(s.head_r), surface)
    ends = np.maximum(np.float32(s.y_head) - yn, yn - np.float32(s.y_tip))
    return np.maximum(r - surface, ends), r


def _lacunae(s: Sample, coords: Coords) -> np.ndarray:
    """Few-voxel flattened ellipsoids, at most one per cell (clipped at the cell border).

    Centres are uniform over the whole cell so no plane of the grid is left empty.
    """
    cells = tuple(cell_index(c, _LACUNA_CELL) for c in coords)
    present, jz, jy, jx, size = cell_uniforms(s.keys[10], cells, 5)
    d2 = None
    for c, cell, j, semi in zip(coords, cells, (jz, jy, jx), _LACUNA_SEMI, strict=True):
        centre = (cell.astype(np.float32) + j) * np.float32(_LACUNA_CELL)
        term = ((c - centre) * np.float32(1.0 / semi)) ** 2
        d2 = term if d2 is None else d2 + term
    assert d2 is not None
    scale = np.float32(0.8) + np.float32(0.4) * size
    return (present < np.float32(0.7)) & (d2 < scale * scale)


def _vessels(s: Sample, coords: Coords) -> np.ndarray:
    """Canals as the curves where two noise fields both vanish: tubes ~2-4 voxels wide.

    The lattice is stretched along x, so most canals run along the bone axis (Haversian)
    and a few cross it (Volkmann); no grid, so no preferred planes.
    """
    z, y, x = coords
    stretched = (z, y, x * np.float32(0.3))
    a = Lattice(s.keys[11], s.vessel_cell)(stretched)
    b = Lattice(s.keys[12], s.vessel_cell)(stretched)
    t = np.float32(0.12)
    return (np.abs(a) < t) & (np.abs(b) < t)


def tissue_at(s: Sample, coords: Coords) -> Tissue:
    """Evaluate the sample at voxel-index coordinates ``(z, y, x)`` (broadcastable arrays)."""
    z, y, x = (np.asarray(c, dtype=np.float32) for c in coords)
    coords = (z, y, x)
    inv = np.float32(1.0 / s.rf)
    zn, yn, xn = ((c - np.float32(o)) * inv for c, o in zip(coords, s.centre, strict=True))
    shape = np.broadcast_shapes(z.shape, y.shape, x.shape)

    coarse = s.lattice(0, 0.3)(coords)
    hue = s.lattice(1, 0.25)(coords)
    maturity_noise = s.lattice(2, 0.15)(coords)
    texture = Lattice(s.keys[3], _TEXTURE_SPACING)(coords)
    trab = fbm((s.lattice(4, 0.13, 4.0), s.lattice(5, 0.065, 3.0)), coords)

    # sample tube (CT only) and the trephine block
    r_xy = np.sqrt(yn * yn + xn * xn)
    tube = (r_xy >= np.float32(s.tube_r)) & (r_xy < np.float32(s.tube_r + s.tube_t))
    sd, r_screw = _screw_distance(s, zn, yn, xn)
    edge = np.float32(0.02) * coarse
    block = ((r_screw < np.float32(s.block_r) + edge)
             & (yn > np.float32(s.block_y[0]) + edge) & (yn < np.float32(s.block_y[1]) + edge)
             & (r_xy < np.float32(s.tube_r - 0.015)))

    # long bone: cortical shell, marrow cavity with trabeculae
    d_shaft = np.sqrt((yn - np.float32(s.shaft_yz[0])) ** 2 + (zn - np.float32(s.shaft_yz[1])) ** 2)
    ro = np.float32(s.shaft_ro) + np.float32(0.015) * coarse
    ri = np.float32(s.shaft_ri) - np.float32(0.025) * coarse
    cortical = block & (d_shaft < ro) & (d_shaft >= ri)
    cavity = block & (d_shaft < ri)
    depth = np.maximum(ri - d_shaft, np.float32(0.0))
    thr = np.float32(s.trab_thr) * (np.float32(0.5) + np.float32(0.8) * np.exp(depth * -5.0))
    if s.material in ("ti", "peek"):   # osseointegration: denser bone hugging the implant
        thr = thr + np.float32(0.5 * s.trab_thr) * np.exp(np.maximum(sd, 0) * np.float32(-25.0))
    trabecular = cavity & (np.abs(trab) < thr)

    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.broadcast_to(tube, shape)] = LABELS["tube"]
    labels[np.broadcast_to(block, shape)] = LABELS["soft_tissue"]
    labels[cortical] = LABELS["cortical_bone"]
    labels[trabecular] = LABELS["trabecular_bone"]
    labels[cortical & _vessels(s, coords)] = LABELS["vessel"]

    pitting = np.zeros(shape, dtype=np.float32)
    if s.material == "mg":
        pitting = s.lattice(6, 0.05)(coords)
        swell = np.float32(s.swell) * (np.float32(1.0) + np.float32(0.4) * pitting)
        patches = s.lattice(7, 0.12)(coords)
        band = (sd >= swell) & (sd < swell + np.float32(s.new_bone_w) * (1 + 0.5 * patches))
        labels[band & cavity & (patches > np.float32(0.25))] = LABELS["new_bone"]
    bone = np.isin(labels, (LABELS["cortical_bone"], LABELS["trabecular_bone"],
                            LABELS["new_bone"]))
    labels[bone & _lacunae(s, coords)] = LABELS["lacuna"]

    if s.material == "mg":
        eroded = np.float32(s.corrosion) * np.clip(1 + 0.6 * pitting, 0.2, 2.0)
        implant = sd < swell
        labels[implant & (sd >= -eroded)] = LABELS["degradation"]
        labels[sd < -eroded] = LABELS["screw"]
    else:
        if s.material == "peek":   # thin fibrous capsule around the polymer
            labels[block & (sd >= 0) & (sd < np.float32(0.012))] = LABELS["soft_tissue"]
        labels[sd < 0] = LABELS["screw"]

    base = np.where(labels == LABELS["trabecular_bone"], np.float32(0.42), np.float32(0.72))
    maturity = np.clip(base + np.float32(0.16) * maturity_noise, 0.0, 1.0).astype(np.float32)
    return Tissue(labels=labels, maturity=maturity, texture=np.broadcast_to(texture, shape),
                  hue=np.broadcast_to(hue, shape), pitting=np.broadcast_to(pitting, shape))
