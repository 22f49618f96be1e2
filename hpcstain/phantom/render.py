"""From tissue to images: the toluidine-blue stain (truth) and the CT forward model.

CT forward model per voxel: attenuation of the tissue → 3D Gaussian blur (the imaging
PSF) → cupping and ring artefacts (reconstruction) → per-slice correlated noise →
linear calibration to uint16 (air 10000, dense cortical bone ≈ 30000, the paper's §2.5
levels). Every random term is keyed by the absolute voxel index, so a slab rendered with
its halo equals the same voxels of the whole volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from hpcstain.phantom.sample import LABELS, Sample, Tissue, tissue_at

CT_OFFSET = 10000.0       # uint16 value of air
CT_GAIN = 20000.0         # uint16 per unit attenuation (1 = dense cortical bone)
BLUR_SIGMA = 0.8          # voxels, 3D Gaussian PSF
BLUR_HALO = 3             # voxels; int(4 * sigma + 0.5) = the filter's reach
NOISE_SIGMA = 0.035       # attenuation units, after the in-slice correlation
CUPPING = 0.05            # attenuation units lost at the rotation axis
SCREW_ATTENUATION = {"mg": 0.78, "ti": 2.4, "peek": 0.26}
# uint16 range every interior screw voxel falls in, per material (tested)
CT_RANGES: dict[str, tuple[int, int]] = {"peek": (9000, 19000), "mg": (19500, 31000),
                                         "ti": (42000, 65535)}

# toluidine blue – pyronin Y palette, RGB uint8
PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (243, 241, 236),     # resin / glass
    "tube": (243, 241, 236),           # not in the histological section
    "soft_tissue": (106, 142, 212),    # blue (blends towards lilac-brown by "hue")
    "soft_tissue_alt": (148, 136, 152),
    "bone_old": (204, 170, 214),       # mature bone: light purple
    "bone_young": (118, 74, 150),      # young bone: dark purple
    "new_bone": (52, 110, 226),        # new woven bone at the degradation layer: bright blue
    "degradation": (96, 88, 60),       # Mg degradation products: dark greenish brown
    "screw": (18, 18, 22),             # opaque implant: black
    "vessel": (228, 230, 242),         # empty lumen, faint blue
    "lacuna": (62, 40, 110),           # osteocyte: dark blue-purple dot
}


def attenuation(t: Tissue, material: str) -> np.ndarray:
    """Linear attenuation (air 0, dense cortical bone ~1), float32."""
    lab = t.labels
    a = np.zeros(lab.shape, dtype=np.float32)
    tex = t.texture
    soft = np.float32(0.17) + np.float32(0.015) * t.hue + np.float32(0.015) * tex
    bone = np.float32(0.78) + np.float32(0.25) * t.maturity + np.float32(0.01) * tex
    values = {
        "tube": np.float32(0.12),
        "soft_tissue": soft,
        "cortical_bone": bone,
        "trabecular_bone": bone,
        "new_bone": np.float32(0.55) + np.float32(0.02) * tex,
        "degradation": np.float32(0.42) + np.float32(0.05) * t.pitting + np.float32(0.03) * tex,
        "screw": np.float32(SCREW_ATTENUATION[material]),
        "vessel": np.float32(0.02),
        "lacuna": np.float32(0.05),
    }
    for name, v in values.items():
        sel = lab == LABELS[name]
        a[sel] = v[sel] if isinstance(v, np.ndarray) else v
    return a


def stain(t: Tissue) -> np.ndarray:
    """Ground-truth toluidine-blue RGB (uint8, last axis) of the tissue."""
    lab = t.labels
    rgb = np.empty((*lab.shape, 3), dtype=np.float32)
    rgb[...] = PALETTE["background"]
    col = {k: np.asarray(v, dtype=np.float32) for k, v in PALETTE.items()}
    bone = (lab == LABELS["cortical_bone"]) | (lab == LABELS["trabecular_bone"])
    m = t.maturity[bone][:, None]
    rgb[bone] = col["bone_young"] + m * (col["bone_old"] - col["bone_young"])
    soft = lab == LABELS["soft_tissue"]
    h = np.clip(np.float32(0.15) + np.float32(0.25) * t.hue[soft], 0, 0.7)[:, None]
    rgb[soft] = col["soft_tissue"] + h * (col["soft_tissue_alt"] - col["soft_tissue"])
    for name in ("new_bone", "degradation", "screw", "vessel", "lacuna"):
        rgb[lab == LABELS[name]] = col[name]
    deg = lab == LABELS["degradation"]
    rgb[deg] *= (np.float32(1.0) + np.float32(0.12) * t.pitting[deg])[:, None]
    textured = (lab != LABELS["background"]) & (lab != LABELS["tube"]) \
        & (lab != LABELS["screw"])
    rgb[textured] *= (np.float32(1.0) + np.float32(0.035) * t.texture[textured])[:, None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def ring_profile(s: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Ring artefact amplitude vs radius (voxels) from the rotation axis: sparse spikes."""
    rng = np.random.default_rng([s.seed, 0x21A6])
    r_max = 1.5 * s.rf + 4
    radii = np.arange(0.0, r_max, 0.25)
    profile = np.zeros_like(radii)
    for r0 in np.arange(2.0, r_max):
        if rng.random() < 0.07:
            amp = rng.normal(0.0, 0.045)
            width = rng.uniform(0.35, 0.8)
            profile += amp * np.exp(-0.5 * ((radii - r0) / width) ** 2)
    return radii.astype(np.float32), profile.astype(np.float32)


def cupping_depth(s: Sample) -> float:
    """Attenuation lost to cupping at the rotation axis (the sample's, else ``CUPPING``)."""
    return float(CUPPING if s.cupping is None else s.cupping)


def cupping_truth(s: Sample) -> dict[str, object]:
    """The CT's true cupping in grey values: ``ct -= depth_ct * max(0, 1 - (r / radius)²)``,
    ``r`` the in-slice distance (voxels) from ``centre_yx`` (the rotation axis, along z)."""
    return {"model": "parabolic", "depth": cupping_depth(s),
            "depth_ct": cupping_depth(s) * CT_GAIN,
            "radius": float((s.tube_r + s.tube_t) * s.rf),
            "centre_yx": [float(s.centre[1]), float(s.centre[2])]}


def ct_artefacts_2d(s: Sample, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """In-slice cupping (float32 (ny, nx)) and ring map (float32 (ny, nx)) about the z axis."""
    y = (np.arange(ny, dtype=np.float32) - np.float32(s.centre[1]))[:, None]
    x = (np.arange(nx, dtype=np.float32) - np.float32(s.centre[2]))[None, :]
    r = np.sqrt(y * y + x * x)
    r_out = np.float32((s.tube_r + s.tube_t) * s.rf)
    cup = np.float32(cupping_depth(s)) * np.clip(1 - (r / r_out) ** 2, 0, 1)
    radii, profile = ring_profile(s)
    rings = np.interp(r, radii, profile).astype(np.float32)
    return cup, rings


def slice_noise(s: Sample, z_index: int, ny: int, nx: int) -> np.ndarray:
    """Reconstruction noise of one slice (float32), keyed by the absolute slice index."""
    rng = np.random.default_rng([s.seed, 0x7015E, z_index + 2**20])
    n = rng.standard_normal((ny, nx), dtype=np.float32)
    n = ndimage.gaussian_filter(n, 0.6, mode="wrap")
    return n * np.float32(NOISE_SIGMA / 0.4)   # 0.6-voxel smoothing leaves std ~0.4


def to_uint16(a: np.ndarray) -> np.ndarray:
    """Calibrate attenuation to the 16-bit CT scale."""
    return np.clip(np.rint(a * np.float32(CT_GAIN) + np.float32(CT_OFFSET)), 0, 65535) \
        .astype(np.uint16)


Slab = tuple[np.ndarray, np.ndarray, np.ndarray]


def render_slab(s: Sample, z0: int, z1: int, ny: int, nx: int,
                gain: float = 1.0, offset: float = 0.0) -> Slab:
    """CT (uint16), stain (uint8 RGB) and labels (uint8) of voxel slices ``z0 .. z1-1``.

    The slab is evaluated with ``BLUR_HALO`` extra slices on each side (beyond the volume
    too: the sample is infinite), blurred, then cropped, so results do not depend on how
    the volume is cut. ``gain``/``offset`` perturb the calibration (per-session drift).
    """
    h = BLUR_HALO
    z = np.arange(z0 - h, z1 + h, dtype=np.float32).reshape(-1, 1, 1)
    y = np.arange(ny, dtype=np.float32).reshape(1, -1, 1)
    x = np.arange(nx, dtype=np.float32).reshape(1, 1, -1)
    tissue = tissue_at(s, (z, y, x))
    a = attenuation(tissue, s.material)
    a = ndimage.gaussian_filter(a, BLUR_SIGMA, truncate=4.0, mode="nearest")[h:h + z1 - z0]
    inner = slice(h, h + z1 - z0)
    labels = tissue.labels[inner]
    rgb = stain(Tissue(labels, tissue.maturity[inner], tissue.texture[inner],
                       tissue.hue[inner], tissue.pitting[inner]))
    cup, rings = ct_artefacts_2d(s, ny, nx)
    a -= cup
    for k, zi in enumerate(range(z0, z1)):
        swing = np.float32(1.0 + 0.35 * np.sin(2 * np.pi * zi / (2.1 * s.rf + 5) + s.seed % 7))
        a[k] += rings * swing + slice_noise(s, zi, ny, nx)
    if gain != 1.0 or offset != 0.0:
        a = a * np.float32(gain) + np.float32(offset / CT_GAIN)
    return to_uint16(a), rgb, labels
