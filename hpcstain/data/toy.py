"""Tiny synthetic pairs with known regions, for tests and benchmarks of this package.

Not the phantom (``hpcstain.phantom`` is the realistic generator): a disc of bone around a
screw, a little soft tissue, resin background, an arc of sample-tube wall seen only in CT,
and a per-slide colour cast. Every region is returned, so normalisation targets and masks
can be checked exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCREW_CT = {"mg": 17000.0, "ti": 60000.0, "peek": 9000.0}


@dataclass
class ToyPair:
    ct: np.ndarray          # (H, W) uint16
    histology: np.ndarray   # (H, W, 3) uint8
    bone: np.ndarray        # bool regions, exact
    background: np.ndarray
    screw: np.ndarray
    wall: np.ndarray


def toy_pair(size: int = 128, material: str = "ti", seed: int = 0,
             cast: tuple[float, float, float] = (1.0, 0.95, 0.88)) -> ToyPair:
    """A ``size × size`` pair; ``cast`` multiplies the histology channels (white balance)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2 + rng.uniform(-2, 2, size=2)
    r = np.hypot(y - c[0], x - c[1]) / size
    screw = r < 0.10
    bone = (r >= 0.10) & (r < 0.32) & ~((np.abs(y - c[0]) < size * 0.03) & (x > c[1]))
    soft = (r >= 0.10) & (r < 0.32) & ~bone
    wall = np.hypot(y, x) / size > 1.2  # tube wall in the corner, CT only
    background = ~(screw | bone | soft | wall)

    ct = np.full((size, size), 8000.0, dtype=np.float32)
    ct[bone] = 21000.0
    ct[soft] = 9500.0
    ct[screw] = SCREW_CT[material]
    ct[wall] = 40000.0
    ct += rng.normal(0, 400, size=ct.shape).astype(np.float32)

    rgb = np.empty((size, size, 3), dtype=np.float32)
    rgb[...] = (240, 238, 236)
    rgb[bone] = (160, 110, 180)
    rgb[soft] = (90, 125, 205)
    rgb[screw] = (20, 20, 24)
    rgb += rng.normal(0, 4, size=rgb.shape).astype(np.float32)
    rgb *= np.asarray(cast, dtype=np.float32)
    return ToyPair(np.clip(np.rint(ct), 0, 65535).astype(np.uint16),
                   np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
                   bone, background, screw, wall)


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_toy_manifest(folder: str | Path, materials: tuple[str, ...] = ("mg", "ti", "peek"),
                       size: int = 128, seed: int = 0) -> Path:
    """Write toy pairs (CT TIFF, histology PNG) and a ``manifest.csv``; return its path."""
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id,material,ct,histology,mask,truth"]
    for i, material in enumerate(materials):
        pair = toy_pair(size, material, seed + i)
        pid = f"toy_{i:02d}"
        tifffile.imwrite(folder / f"{pid}_ct.tif", pair.ct)
        (folder / f"{pid}_he.png").write_bytes(png_bytes(pair.histology))
        lines.append(f"{pid},{material},{pid}_ct.tif,{pid}_he.png,,")
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
