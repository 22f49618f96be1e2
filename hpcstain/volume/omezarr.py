"""OME-Zarr (NGFF 0.4 or 0.5) image with a 2× multiscale pyramid, updated region by region.

Layout (what napari-ome-zarr and ome-zarr-py read; validated in the tests with
ome-zarr-models): ``multiscales`` with axes ``c`` (channel), ``z``/``y``/``x`` (space,
micrometer) and one dataset per level (``0``, ``1`` …); each level halves z, y and x
(rounding up) and carries its ``scale`` (the voxel size in µm × 2^level) and the
``translation`` of its voxel centres. Without a known voxel size the scale is 1 per voxel
and the space axes carry no ``unit`` (NGFF makes it optional: viewers then show voxels,
not a made-up length).
``omero`` names the channels R, G, B, A. Arrays are uint8 ``(4, Z, Y, X)``, zstd level 1.
Scalar images (fuse's ``disagreement``) nest inside as one-channel images of their own,
``<image>/<name>``, with the same levels, chunks and transforms (``create_image(scalars=)``).

* NGFF 0.4: a zarr v2 group, the metadata at the top of its attributes, chunks
  ``(4, cz, cy, cx)`` with "/"-separated keys.
* NGFF 0.5: a zarr v3 group, the metadata under ``attributes["ome"]``; each array is
  **sharded**: one shard per storage chunk of the plan ``(4, cz, cy, cx)`` holding inner
  chunks of half its edge (fewer files for large volumes, small reads for viewers). One
  writer per shard: a fuse task owns whole shards.

Pyramid levels are mean-downsampled from the level below, voxel block by voxel block, so
any region can be refreshed after its level-0 voxels change (:func:`build_pyramid`), and
the final pyramid does not depend on the order regions were written in.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from hpcstain.atomic import atomic_output
from hpcstain.errors import UsageError
from hpcstain.geometry import Region, chunks_touched
from hpcstain.volume.voxelsize import NGFF_UNIT

NGFF_VERSION = "0.4"
NGFF_VERSIONS = ("0.4", "0.5")
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


def multiscales_metadata(n_levels: int, voxel_size_um: tuple[float, float, float] | None,
                         name: str = "image", version: str = NGFF_VERSION) -> dict[str, Any]:
    """NGFF ``multiscales`` + ``omero`` attributes for an RGBA (c, z, y, x) image.

    0.4: the two keys at the top of the attributes, each with a ``version``; 0.5: both
    under ``ome`` (with one ``version`` there). ``voxel_size_um`` None: scale 1 per voxel,
    no unit on the space axes.
    """
    size = (1.0, 1.0, 1.0) if voxel_size_um is None else tuple(float(v) for v in voxel_size_um)
    unit = {} if voxel_size_um is None else {"unit": NGFF_UNIT}
    datasets = []
    for k in range(n_levels):
        f = 2 ** k
        scale = [1.0, *(v * f for v in size)]
        shift = [0.0, *(v * (f - 1) / 2 for v in size)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if k > 0:
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", **unit} for a in ("z", "y", "x")]
    meta = {
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
    if version == "0.4":
        return meta
    meta["multiscales"][0].pop("version")
    meta["omero"].pop("version")
    return {"ome": {"version": version, **meta}}


def inner_chunk(chunk: tuple[int, ...]) -> tuple[int, ...]:
    """Inner chunk of a 0.5 shard: half the shard edge where that divides it (≥ 16)."""
    return tuple(c // 2 if c % 2 == 0 and c >= 32 else c for c in chunk)


def create_image(path: str | os.PathLike[str], shape: tuple[int, int, int],
                 chunk: tuple[int, int, int], n_levels: int,
                 voxel_size_um: tuple[float, float, float] | None, extra_attrs: dict[str, Any],
                 name: str = "image", overwrite: bool = False,
                 version: str = NGFF_VERSION, scalars: tuple[str, ...] = ()) -> Path:
    """Create an empty RGBA OME-Zarr image (metadata only) atomically at ``path``.

    ``scalars`` names one-channel uint8 images nested in it (``path/<name>``, each with its
    own NGFF metadata and the same levels, chunks, scale and translation: :func:`scalar_metadata`).
    """
    import zarr

    if version not in NGFF_VERSIONS:
        raise UsageError(f"NGFF version must be one of {', '.join(NGFF_VERSIONS)}, "
                         f"got {version!r}")
    with atomic_output(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2 if version == "0.4" else 3)
        meta = multiscales_metadata(n_levels, voxel_size_um, name, version)
        _create_levels(root, shape, chunk, n_levels, version, len(CHANNELS))
        root.attrs.update({**meta, **extra_attrs})
        for sub in scalars:
            group = root.create_group(sub)
            _create_levels(group, shape, chunk, n_levels, version, 1)
            group.attrs.update(scalar_metadata(meta, sub))
    return Path(path)


def _create_levels(root: Any, shape: tuple[int, int, int], chunk: tuple[int, int, int],
                   n_levels: int, version: str, channels: int) -> None:
    """The level arrays ``0`` … of an image: uint8, zstd level 1 (several times smaller
    than zarr v2's default Blosc-LZ4 and faster to write; benchmarks/bench_engine.py)."""
    from numcodecs import Zstd
    from zarr.codecs import ZstdCodec

    for k, lshape in enumerate(level_shapes(shape, n_levels)):
        lchunk = tuple(min(c, n) for c, n in zip(chunk, lshape, strict=True))
        if version == "0.4":
            root.create_array(str(k), shape=(channels, *lshape), chunks=(channels, *lchunk),
                              dtype="uint8", fill_value=0, compressors=Zstd(level=1),
                              chunk_key_encoding={"name": "v2", "separator": "/"})
        else:
            root.create_array(str(k), shape=(channels, *lshape), shards=(channels, *lchunk),
                              chunks=(channels, *inner_chunk(lchunk)), dtype="uint8",
                              fill_value=0, compressors=ZstdCodec(level=1),
                              dimension_names=["c", "z", "y", "x"])


def scalar_metadata(meta: dict[str, Any], name: str, window: tuple[int, int] = (0, 64)
                    ) -> dict[str, Any]:
    """NGFF attributes of a one-channel image nested in an RGBA image with attributes
    ``meta``: the same axes, levels and transforms; one grey channel ``name`` shown over
    ``window`` (viewers' default contrast)."""
    import copy

    out = copy.deepcopy(meta)
    ngff = out.get("ome", out)
    ngff["multiscales"][0]["name"] = name
    ngff["omero"].update(name=name, rdefs={"model": "greyscale"}, channels=[{
        "label": name, "color": "FFFFFF", "active": True,
        "window": {"start": window[0], "end": window[1], "min": 0, "max": 255}}])
    return out


def open_image(path: str | os.PathLike[str], mode: str = "r+") -> Any:
    """An OME-Zarr image group of either version (the zarr format is detected)."""
    import zarr

    return zarr.open_group(str(path), mode=mode)  # type: ignore[arg-type]


def ngff_attrs(root: Any) -> dict[str, Any]:
    """The NGFF metadata of an image (``multiscales``, ``omero``) whatever its version."""
    attrs = dict(root.attrs)
    return attrs.get("ome", attrs)


def n_levels_of(root: Any) -> int:
    return len(ngff_attrs(root)["multiscales"][0]["datasets"])


def write_block(arr: Any) -> tuple[int, ...]:
    """The spatial block one writer owns: the shard (0.5) or the chunk (0.4)."""
    return tuple((arr.shards or arr.chunks)[1:])


def rounded_mean(sums: np.ndarray, counts: np.ndarray | int) -> np.ndarray:
    """``rint(sums / counts)`` (half to even) of non-negative integer sums, exactly, as uint8.

    Integer arithmetic: the same values as the float division (exact here) at a fraction
    of the cost on whole volumes.
    """
    if isinstance(counts, int) and counts == 3:  # s/3 never ends in .5: round half up
        return ((sums + 1) // 3).astype(np.uint8)
    if isinstance(counts, int) and counts & (counts - 1) == 0:  # powers of two: shifts
        k = counts.bit_length() - 1
        q, r = sums >> k, sums & (counts - 1)
        half = counts >> 1
        up = (r > half) | ((r == half) & (q & 1 == 1)) if k else np.zeros_like(q, bool)
        return (q + up).astype(np.uint8)
    q, r = np.divmod(sums, counts)
    twice = 2 * r
    up = (twice > counts) | ((twice == counts) & (q % 2 == 1))
    return (q + up).astype(np.uint8)


@functools.cache
def rounded_mean_table(n: int) -> np.ndarray:
    """:func:`rounded_mean` of every possible sum of ``n`` uint8 values: indexing this
    table with the sums gives the same values at a fraction of the cost."""
    return rounded_mean(np.arange(255 * n + 1, dtype=np.int64), n)


def downsample2(block: np.ndarray) -> np.ndarray:
    """2×2×2 block mean over the last three axes (partial blocks at the end), uint8."""
    c, z, y, x = block.shape
    if z % 2 == 0 and y % 2 == 0 and x % 2 == 0:  # the common, interior case
        # pairwise sums along z, y, then x: each add reads half of the one before (2× the
        # speed of 8 strided adds, the same sums)
        sums = np.add(block[:, 0::2], block[:, 1::2], dtype=np.uint16)
        sums = np.add(sums[:, :, 0::2], sums[:, :, 1::2])
        sums = np.add(sums[..., 0::2], sums[..., 1::2])
        # rint(s / 8), half to even: (s + 3 + (s // 8 odd)) // 8 (shifts beat a lookup)
        up = np.right_shift(sums, 3)
        np.bitwise_and(up, 1, out=up)
        up += 3
        sums += up
        sums >>= 3
        return sums.astype(np.uint8)
    pad = [(0, 0)] + [(0, n % 2) for n in (z, y, x)]
    vals = np.pad(block.astype(np.uint16), pad)
    ones = np.pad(np.ones((z, y, x), np.uint16), pad[1:])
    zz, yy, xx = vals.shape[1] // 2, vals.shape[2] // 2, vals.shape[3] // 2
    sums = vals.reshape(c, zz, 2, yy, 2, xx, 2).sum(axis=(2, 4, 6), dtype=np.uint16)
    counts = ones.reshape(zz, 2, yy, 2, xx, 2).sum(axis=(1, 3, 5), dtype=np.uint16)
    return rounded_mean(sums, counts)


def build_pyramid(root: Any, regions: list[Region],
                  skip: dict[int, set[tuple[int, ...]]] | None = None) -> None:
    """Recompute levels above 0 over changed level-0 ``regions``, each storage chunk once.

    Level k is computed from level k-1 per level-k storage chunk touched by the regions
    (so a chunk shared by several changed regions is written once, by one writer).
    ``skip`` maps a level to the grid coordinates of its storage chunks already written
    (by the fuse tasks, from memory); the levels above still see them as changed.
    """
    shapes = level_shapes(tuple(root["0"].shape[1:]), n_levels_of(root))
    for k in range(1, len(shapes)):
        arr = root[str(k)]
        chunk = write_block(arr)
        regions = [tuple(slice(s.start // 2, (s.stop + 1) // 2) for s in r) for r in regions]
        touched: set[tuple[int, ...]] = set()
        for r in regions:
            touched.update(chunks_touched(r, chunk))
        touched -= (skip or {}).get(k, set())
        below = shapes[k - 1]
        for coords in sorted(touched):
            dst = tuple(slice(i * c, min(n, (i + 1) * c))
                        for i, c, n in zip(coords, chunk, shapes[k], strict=True))
            src = tuple(slice(2 * d.start, min(n, 2 * d.stop)) for d, n in zip(dst, below,
                                                                               strict=True))
            block = np.asarray(root[str(k - 1)][(slice(None), *src)])
            arr[(slice(None), *dst)] = downsample2(block)
