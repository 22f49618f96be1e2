"""The gallery of docs/phantom.md (*Physical CT*): renderer vs ``--physics tomo`` settings.

One PNG per material (docs/images/phantom_tomo_<material>.png): columns = the renderer and
tomo settings, rows = the central z slice and the central xz slice of a 128³ volume (seed
as in benchmarks/bench_tomo.py). Grey windows: renderer 8000–34000, tomo 2500–17000
(metal saturates, as on a beamline's bone window).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tomo_gallery.py [--size 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hpcstain.phantom import make_volume
from hpcstain.phantom.tomo import TomoParams

SETTINGS: list[tuple[str, TomoParams | None]] = [
    ("render", None),
    ("tomo 1e4", TomoParams()),
    ("rings off", TomoParams(rings=0)),
    ("flux 1e3", TomoParams(flux=1e3)),
    ("flux 1e5", TomoParams(flux=1e5)),
    ("phase 1 m", TomoParams(phase_distance=1.0)),
    ("+Paganin", TomoParams(phase_distance=1.0, paganin=1000.0)),
]
WINDOWS = {"render": (8000.0, 34000.0), "tomo": (2500.0, 17000.0)}
SEEDS = {"mg": 11, "ti": 3, "peek": 5}
HEADER = 14


def grey(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """8-bit display, quantised to 64 levels (small PNGs)."""
    v = np.clip((a.astype(np.float32) - lo) / (hi - lo), 0, 1)
    return (np.rint(v * 63) * (255 / 63)).astype(np.uint8)


def gallery(material: str, n: int) -> np.ndarray:
    cols = []
    for name, params in SETTINGS:
        v = make_volume((n, n, n), material, SEEDS[material], tomo=params)
        lo, hi = WINDOWS["render" if params is None else "tomo"]
        head = Image.new("L", (n, HEADER), 255)
        ImageDraw.Draw(head).text((3, 1), name, fill=0)
        cols.append(np.vstack([np.asarray(head), grey(v.ct[n // 2], lo, hi),
                               np.full((2, n), 255, np.uint8), grey(v.ct[:, n // 2], lo, hi)]))
        cols.append(np.full((cols[-1].shape[0], 2), 255, np.uint8))
    return np.hstack(cols[:-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", default="docs/images")
    p.add_argument("--materials", nargs="+", default=["mg", "ti"])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for m in args.materials:
        path = out / f"phantom_tomo_{m}.png"
        Image.fromarray(gallery(m, args.size)).save(path, optimize=True)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB)")


if __name__ == "__main__":
    main()
