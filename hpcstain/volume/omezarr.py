"""OME-Zarr (NGFF 0.4) image with a 2× multiscale pyramid, updated region by region.

Layout (what napari-ome-zarr and ome-zarr-py read): a zarr v2 group whose attributes hold
``multiscales`` (version 0.4) with axes ``c`` (channel), ``z``/``y``/``x`` (space,
micrometer) and one dataset per level (``0``, ``1`` …); each level halves z, y and x
(rounding up) and carries its ``scale`` and the ``translation`` of its voxel centres.
``omero`` names the channels R, G, B, A. Arrays are uint8 ``(4, Z, Y, X)`` stored in
chunks ``(4, cz, cy, cx)`` with "/"-separated chunk keys.

Pyramid levels are mean-downsampled from the level below, voxel block by voxel block, so
any region can be refreshed after its level-0 voxels change (:func:`update_pyramid`), and
the final pyramid does not depend on the order regions were written in.
"""

from __future__ import annotations

import os
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.atomic import atomic_output

Region = tuple[slice, ...]

NGFF_VERSION = "0.4"
CHANNELS = ("R", "G", "B", "A")
_COLOURS = ("FF0000", "00FF00", "0000FF", "FFFFFF")


def level_shapes(shape: tuple[int, int, int], n_levels: int) -> list[tuple[int, int, int]]:
    """Spatial shape of each level: level k is level k-1 halved, rounding up."""
    shapes = [tuple(shape)]
    for _ in range(n_levels - 1):
        shapes.append(tuple((n + 1) // 2 for n in shapes[-1]))
    return shapes  # type: ignore[return-value]


def default_levels(shape: tuple[int, int, int], min_edge: int = 16, max_levels: int = 6) -> int:
    """Halve until the next level's smallest edge would fall below ``min_edge``."""
    n, edge = 1, min(shape)
    while n < max_levels and (edge + 1) // 2 >= min_edge:
        edge = (edge + 1) // 2
        n += 1
    return n


def multiscales_metadata(n_levels: int, voxel_size_um: tuple[float, float, float],
                         name: str = "image") -> dict[str, Any]:
    """NGFF 0.4 ``multiscales`` + ``omero`` attributes for an RGBA (c, z, y, x) image."""
    datasets = []
    for k in range(n_levels):
        f = 2 ** k
        scale = [1.0, *(v * f for v in voxel_size_um)]
        shift = [0.0, *(v * (f - 1) / 2 for v in voxel_size_um)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if k > 0:
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in ("z", "y", "x")]
    return {
        "multiscales": [{
            "version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
            "type": "mean", "metadata": {"method": "2x2x2 block mean, rounded to uint8"},
        }],
        "omero": {
            "name": name, "version": NGFF_VERSION,
            "channels": [{"label": c, "color": col, "active": c != "A",
                          "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                         for c, col in zip(CHANNELS, _COLOURS, strict=True)],
            "rdefs": {"model": "color"},
        },
    }


def create_image(path: str | os.PathLike[str], shape: tuple[int, int, int],
                 chunk: tuple[int, int, int], n_levels: int,
                 voxel_size_um: tuple[float, float, float], extra_attrs: dict[str, Any],
                 name: str = "image", overwrite: bool = False) -> Path:
    """Create an empty RGBA OME-Zarr image (metadata only) atomically at ``path``."""
    import zarr

    with atomic_output(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        for k, lshape in enumerate(level_shapes(shape, n_levels)):
            lchunk = tuple(min(c, n) for c, n in zip(chunk, lshape, strict=True))
            root.create_array(str(k), shape=(4, *lshape), chunks=(4, *lchunk), dtype="uint8",
                              fill_value=0,
                              chunk_key_encoding={"name": "v2", "separator": "/"})
        root.attrs.update({**multiscales_metadata(n_levels, voxel_size_um, name),
                           **extra_attrs})
    return Path(path)


def open_image(path: str | os.PathLike[str], mode: str = "r+") -> Any:
    import zarr

    return zarr.open_group(str(path), mode=mode, zarr_format=2)  # type: ignore[arg-type]


def n_levels_of(root: Any) -> int:
    return len(root.attrs["multiscales"][0]["datasets"])


def write_level0(root: Any, region: Region, rgba: np.ndarray) -> None:
    """Write ``rgba`` (Z, Y, X, 4) uint8 into level 0 at the spatial ``region``."""
    root["0"][(slice(None), *region)] = np.moveaxis(rgba, -1, 0)


def downsample2(block: np.ndarray) -> np.ndarray:
    """2×2×2 block mean over the last three axes (partial blocks at the end), uint8."""
    c, z, y, x = block.shape
    pad = [(0, 0)] + [(0, n % 2) for n in (z, y, x)]
    vals = np.pad(block.astype(np.float32), pad)
    ones = np.pad(np.ones((z, y, x), np.float32), pad[1:])
    zz, yy, xx = vals.shape[1] // 2, vals.shape[2] // 2, vals.shape[3] // 2
    sums = vals.reshape(c, zz, 2, yy, 2, xx, 2).sum(axis=(2, 4, 6))
    counts = ones.reshape(zz, 2, yy, 2, xx, 2).sum(axis=(1, 3, 5))
    return np.rint(sums / counts).astype(np.uint8)


def update_pyramid(root: Any, region: Region) -> None:
    """Recompute every level above 0 over the footprint of a changed level-0 ``region``."""
    shapes = level_shapes(tuple(root["0"].shape[1:]), n_levels_of(root))
    for k in range(1, len(shapes)):
        below = shapes[k - 1]
        lo = [s.start // 2 for s in region]
        hi = [(s.stop + 1) // 2 for s in region]
        src = tuple(slice(2 * a, min(n, 2 * b)) for a, b, n in zip(lo, hi, below, strict=True))
        block = np.asarray(root[str(k - 1)][(slice(None), *src)])
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        root[str(k)][(slice(None), *region)] = downsample2(block)


def build_pyramid(root: Any, regions: list[Region]) -> None:
    """Recompute levels above 0 over changed level-0 ``regions``, each storage chunk once.

    Level k is computed from level k-1 per level-k storage chunk touched by the regions
    (so a chunk shared by several changed regions is written once, by one writer).
    """
    shapes = level_shapes(tuple(root["0"].shape[1:]), n_levels_of(root))
    for k in range(1, len(shapes)):
        arr = root[str(k)]
        chunk = arr.chunks[1:]
        regions = [tuple(slice(s.start // 2, (s.stop + 1) // 2) for s in r) for r in regions]
        touched: set[tuple[int, ...]] = set()
        for r in regions:
            ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(r, chunk,
                                                                               strict=True)]
            touched.update(product(*ranges))
        below = shapes[k - 1]
        for coords in sorted(touched):
            dst = tuple(slice(i * c, min(n, (i + 1) * c))
                        for i, c, n in zip(coords, chunk, shapes[k], strict=True))
            src = tuple(slice(2 * d.start, min(n, 2 * d.stop)) for d, n in zip(dst, below,
                                                                               strict=True))
            block = np.asarray(root[str(k - 1)][(slice(None), *src)])
            arr[(slice(None), *dst)] = downsample2(block)
