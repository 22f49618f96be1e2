"""Paired 2D whole slides: CT slice, histology, correspondence mask, exact truth.

A pair is one phantom sample seen twice. The CT image is the axis-aligned slice of the
CT forward model; the truth is the exact stain of that same slice. The histology is the
stain of a slightly oblique plane near it, rendered at ``SUPERSAMPLE``× resolution through
an affine + elastic warp (soft tissue moves most), box-downsampled, then given the
section's preparation artefacts (cracks, saw striations, stain droplets, an optional
missing region) and the microscope session's colour drift.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from hpcstain.atomic import atomic_output, check_output
from hpcstain.errors import UsageError
from hpcstain.phantom.render import PALETTE, render_slab, stain
from hpcstain.phantom.sample import LABELS, MATERIALS, RIGID_LABELS, make_sample, tissue_at
from hpcstain.phantom.volume import PHANTOM_VERSION, VOXEL_SIZE_UM

MATERIAL_RATIO = {"mg": 7, "ti": 1, "peek": 2}     # the paper's Mg:Ti:PEEK
SUPERSAMPLE = 2
MANIFEST_COLUMNS = ("id", "material", "ct", "histology", "mask", "truth")
PAIRS_PER_SESSION = 4                              # slides sharing one colour drift


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


def _warp(rng: np.random.Generator, labels_ct: np.ndarray,
          scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Source-plane (row, col) for each fine output pixel: affine + tissue-weighted elastic."""
    h, w = labels_ct.shape
    hs, ws = h * SUPERSAMPLE, w * SUPERSAMPLE
    rows = (np.arange(hs, dtype=np.float32) + 0.5) / SUPERSAMPLE - 0.5
    cols = (np.arange(ws, dtype=np.float32) + 0.5) / SUPERSAMPLE - 0.5
    r, c = np.meshgrid(rows, cols, indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ang = np.deg2rad(rng.uniform(-2.0, 2.0))
    sy, sx = 1 + rng.uniform(-0.03, 0.03, size=2)
    shear = rng.uniform(-0.02, 0.02)
    ty, tx = rng.uniform(-3.0, 3.0, size=2) * scale
    a = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) \
        @ np.array([[sy, shear], [0.0, sx]])
    dr, dc = r - cy, c - cx
    src_r = a[0, 0] * dr + a[0, 1] * dc + cy + ty
    src_c = a[1, 0] * dr + a[1, 1] * dc + cx + tx
    # elastic: soft tissue and background move up to ~6 px (at 512), rigid bone ~1 px
    soft = ~np.isin(labels_ct, RIGID_LABELS)
    weight = ndimage.gaussian_filter(np.where(soft, 1.0, 0.15).astype(np.float32), 3.0)
    sigma = max(2.0, 0.04 * min(h, w))
    amp = 5.0 * scale
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
                index: int) -> Pair:
    """Render pair ``index`` of a set (``seed``) from its own sample seed."""
    h, w = size
    depth = 64
    s = make_sample((depth, h, w), material, sample_seed)
    drift = _session_drift(seed, index // PAIRS_PER_SESSION)
    rng = np.random.default_rng([int(seed), 0x415, index])
    z_ct = depth // 2
    ct, truth, labels_ct = render_slab(s, z_ct, z_ct + 1, h, w, gain=drift["ct_gain"],
                                       offset=drift["ct_offset"])
    ct, truth, labels_ct = ct[0], truth[0], labels_ct[0]

    scale = min(h, w) / 512.0
    e_y, e_x = _plane_basis(rng)
    origin = np.array([z_ct + rng.uniform(-1.5, 1.5), (h - 1) / 2.0, (w - 1) / 2.0])
    src_r, src_c = _warp(rng, labels_ct, scale)
    dr, dc = src_r - np.float32(origin[1]), src_c - np.float32(origin[2])
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
                histology_labels=hist_labels, missing=missing)


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


def write_pairs(outdir: str | Path, n: int, seed: int, size: tuple[int, int] = (512, 512),
                overwrite: bool = False) -> Path:
    """Write ``n`` paired slides and ``manifest.csv`` into ``outdir``; return the manifest.

    Layout: ``ct/<id>.tif`` (uint16), ``histology/<id>.png``, ``mask/<id>.png`` (0/255),
    ``truth/<id>.png`` (exact stain of the CT slice), ``labels/<id>.png`` (CT labels),
    ``phantom.json`` (provenance). The directory appears only when complete.
    """
    outdir = Path(outdir)
    n, size = check_pair_args(n, size)
    check_output(outdir, overwrite)
    materials = allocate_materials(n, seed)
    sample_seeds = np.random.default_rng([int(seed), 0x5EED]).integers(0, 2**62, size=n)
    rows = []
    with atomic_output(outdir, overwrite) as tmp:
        for sub in ("ct", "histology", "mask", "truth", "labels"):
            (tmp / sub).mkdir(parents=True)
        for i, material in enumerate(materials):
            pid = f"pair_{i:03d}"
            pair = render_pair(material, int(sample_seeds[i]), size, seed, i)
            files = {"ct": f"ct/{pid}.tif", "histology": f"histology/{pid}.png",
                     "mask": f"mask/{pid}.png", "truth": f"truth/{pid}.png"}
            (tmp / files["ct"]).write_bytes(_tiff_bytes(pair.ct))
            (tmp / files["histology"]).write_bytes(_png_bytes(pair.histology))
            (tmp / files["mask"]).write_bytes(_png_bytes(pair.mask))
            (tmp / files["truth"]).write_bytes(_png_bytes(pair.truth))
            (tmp / f"labels/{pid}.png").write_bytes(_png_bytes(pair.labels))
            rows.append({"id": pid, "material": material, **files})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (tmp / "manifest.csv").write_text(buf.getvalue())
        info = {"generator": "hpcstain.phantom", "generator_version": PHANTOM_VERSION,
                "seed": int(seed), "n": n, "size_hw": list(size),
                "voxel_size_um": VOXEL_SIZE_UM, "labels": dict(LABELS),
                "palette": {k: list(v) for k, v in PALETTE.items()},
                "supersample": SUPERSAMPLE, "pairs_per_session": PAIRS_PER_SESSION}
        (tmp / "phantom.json").write_text(json.dumps(info, indent=2) + "\n")
    return outdir / "manifest.csv"
