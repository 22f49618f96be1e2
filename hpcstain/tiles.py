"""Global 2D tile grid and window blending, shared by ``predict`` and the volume engine.

Tiles of ``tile`` pixels start at ``k * step`` in *image* coordinates (origin at the image's
(0, 0)), so the grid never depends on which part of the image is being computed. Pixels
past the bottom/right image border that the last tiles reach are filled by mirror padding
(reflect; a 1-pixel line is repeated), only at the true image border. Tile outputs are
blended with a strictly positive window and normalised by the summed weights.

Any sub-rectangle computed through :func:`stain_region` equals the same rectangle of the
whole-image result bit for bit, as long as ``fn`` gives each tile a result that does not
depend on the other tiles of its batch (any deterministic fn with ``batch_size=1``; eval-mode
conv nets in float64 or per-tile numpy functions at any batch size). Float32 conv nets may
differ in the last bits between batch compositions (~1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch

from hpcstain.errors import InputError, UsageError
from hpcstain.geometry import Region

# a (rows, cols) plane region: see hpcstain.geometry
TileFn: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
Reader: TypeAlias = Callable[[Region], np.ndarray]

WINDOWS = ("mean", "hann", "gaussian")
WINDOW_FLOOR = 1e-3
GAUSSIAN_SIGMA = 0.125  # of the tile edge


@dataclass(frozen=True)
class Tiling:
    """Tile edge, step between tile starts, blending window, and the largest tile a plane
    may be covered with (0: tiles stay ``tile``; see :func:`plane_tiles`)."""

    tile: int = 256
    step: int = 64
    window: str = "mean"
    max_tile: int = 0


PAPER_TILING = Tiling(256, 64, "mean")  # §2.9: 256 px tiles stepped by 64 px, averaged
# The default, chosen by benchmarks/bench_tiles.py and bench_engine.py: 256/192 Hann, and
# planes covered by equal tiles of up to 512 px with the same 64 px overlap.
DEFAULT_TILING = Tiling(256, 192, "hann", 512)
TILINGS = {"paper": PAPER_TILING, "default": DEFAULT_TILING}
# Generator input pixels per batch when the caller leaves the batch size to us (0): on the
# CPU small batches stay in cache (a 16 × 256² batch of a ngf-16 ResNet is ~4× slower per
# tile than 1–2 tiles, benchmarks/bench_engine.py); GPUs want large batches.
BATCH_PIXELS = {"cpu": 1 << 17, "cuda": 1 << 22}


def auto_batch(tile: int | tuple[int, int], device: str = "cpu", batch_size: int = 0) -> int:
    """``batch_size`` when given (> 0), else as many tiles as the device's pixel budget."""
    if batch_size > 0:
        return batch_size
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    budget = BATCH_PIXELS.get(str(device).split(":")[0], BATCH_PIXELS["cpu"])
    return max(1, budget // (th * tw))


# ------------------------------------------------------------------ grid geometry

Pair: TypeAlias = tuple[int, int]


def _pair(v: int | tuple[int, int]) -> Pair:
    return (int(v), int(v)) if isinstance(v, int | np.integer) else (int(v[0]), int(v[1]))


def check_tiling(tile: int | Pair, step: int | Pair, window: str = "mean") -> None:
    """Raise UsageError unless ``tile >= 1``, ``1 <= step <= tile`` and the window is known."""
    for t, s in zip(_pair(tile), _pair(step), strict=True):
        if t < 1 or not 1 <= s <= t:
            raise UsageError(f"need tile >= 1 and 1 <= step <= tile, got tile={tile} "
                             f"step={step}")
    if window not in WINDOWS:
        raise UsageError(f"unknown blending window {window!r}; choose one of {', '.join(WINDOWS)}")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plane_tiles(plane: Pair, tile: int, step: int, multiple: int = 1, minimum: int = 1,
                max_tile: int = 0) -> tuple[Pair, Pair]:
    """Per-axis (tile, step) for a plane: a tile never exceeds the plane it covers.

    Along an axis shorter than ``tile`` one tile of the plane's length (rounded up to the
    generator's size ``multiple``, at least ``minimum``) covers it, so a 37-px-deep plane
    is not padded to 256. With ``max_tile`` a longer axis is covered by the fewest equal
    tiles of at most ``max_tile`` that keep the configured overlap ``tile - step``: a 512 px
    axis is one 512 px tile, 1024 px three of 384 (instead of 5 × 256, 1280 px), so no
    generator pixel is spent on padding past the plane. Without it, ``tile``/``step``.
    """
    tiles, steps = [], []
    overlap = tile - step
    for n in plane:
        if n < tile:
            t = min(tile, max(round_up(n, multiple), minimum))
            tiles.append(t)
            steps.append(t)
        elif max_tile > tile:
            k = max(1, math.ceil((n - overlap) / (max_tile - overlap)))
            t = round_up(math.ceil((n + (k - 1) * overlap) / k), multiple)
            tiles.append(t)
            steps.append(t if k == 1 else t - overlap)
        else:
            tiles.append(tile)
            steps.append(step)
    return (tiles[0], tiles[1]), (steps[0], steps[1])


def n_tiles(length: int, tile: int, step: int) -> int:
    """Number of grid tiles along a line of ``length`` pixels (the last may reach past it)."""
    return 1 if length <= tile else math.ceil((length - tile) / step) + 1


def padded_length(length: int, tile: int, step: int) -> int:
    """Extent of the grid along a line: image plus the mirror padding past its end."""
    return (n_tiles(length, tile, step) - 1) * step + tile


def grid_pixels(plane: Pair, tile: Pair, step: Pair) -> int:
    """Generator input pixels the grid of a whole plane costs (tiles × tile area)."""
    return (n_tiles(plane[0], tile[0], step[0]) * n_tiles(plane[1], tile[1], step[1])
            * tile[0] * tile[1])


def tile_boundaries(length: int, tile: int, step: int) -> np.ndarray:
    """Positions ``b`` in (0, length) where a grid tile starts or ends (seam candidates)."""
    starts = np.arange(n_tiles(length, tile, step)) * step
    edges = np.unique(np.concatenate([starts, starts + tile]))
    return edges[(edges > 0) & (edges < length)]


def reflect_index(coords: np.ndarray, length: int) -> np.ndarray:
    """Image index that mirror padding puts at each grid coordinate (edge not repeated)."""
    coords = np.asarray(coords, dtype=np.int64)
    if length == 1:
        return np.zeros_like(coords)
    period = 2 * (length - 1)
    m = np.mod(coords, period)
    return np.where(m < length, m, period - m)


def tile_span(start: int, stop: int, length: int, tile: int, step: int) -> tuple[int, int]:
    """Range ``[k0, k1)`` of tile indices along one axis whose tiles touch ``[start, stop)``."""
    k0 = max(0, (start - tile) // step + 1)
    k1 = min(n_tiles(length, tile, step), (stop - 1) // step + 1)
    return k0, k1


def _check_region(region: Region, image_shape: tuple[int, int]) -> Region:
    if len(region) != 2 or len(image_shape) != 2:
        raise UsageError(f"need a 2D region and image shape, got {region} for {image_shape}")
    out = []
    for s, n in zip(region, image_shape, strict=True):
        start, stop, stride = s.indices(n)
        negative = any(v is not None and v < 0 for v in (s.start, s.stop))
        if stride != 1 or start >= stop or negative:
            raise UsageError(f"region {region} is empty or outside the image of shape "
                             f"{tuple(image_shape)}")
        if s.stop is not None and s.stop > n:
            raise UsageError(f"region {region} reaches past the image of shape "
                             f"{tuple(image_shape)}")
        out.append(slice(start, stop))
    return out[0], out[1]


def _axis_coords(start: int, stop: int, length: int, tile: int, step: int) -> np.ndarray:
    """Grid coordinates spanned by the tiles that touch ``[start, stop)``."""
    k0, k1 = tile_span(start, stop, length, tile, step)
    return np.arange(k0 * step, (k1 - 1) * step + tile)


def region_context(image_shape: tuple[int, int], region: Region, tile: int | Pair,
                   step: int | Pair) -> Region:
    """Input region (inside the image) that computing ``region`` on the global grid reads."""
    check_tiling(tile, step)
    region = _check_region(region, image_shape)
    ctx = []
    for s, n, t, st in zip(region, image_shape, _pair(tile), _pair(step), strict=True):
        idx = reflect_index(_axis_coords(s.start, s.stop, n, t, st), n)
        ctx.append(slice(int(idx.min()), int(idx.max()) + 1))
    return ctx[0], ctx[1]


# ------------------------------------------------------------------ windows


def window_1d(name: str, tile: int, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """1D blending weights over a tile edge, strictly positive (``>= floor`` for hann/gaussian)."""
    check_tiling(tile, tile, name)
    if name == "mean":
        return np.ones(tile)
    centre = (np.arange(tile) + 0.5) / tile  # half-sample shift: symmetric, never exactly 0
    if name == "hann":
        w = np.sin(np.pi * centre) ** 2
    else:
        w = np.exp(-0.5 * ((centre - 0.5) / GAUSSIAN_SIGMA) ** 2)
    return np.maximum(w, floor)


def window_2d(name: str, tile: int | Pair, floor: float = WINDOW_FLOOR) -> np.ndarray:
    """Separable (th, tw) float64 window."""
    th, tw = _pair(tile)
    return np.outer(window_1d(name, th, floor), window_1d(name, tw, floor))


# ------------------------------------------------------------------ staining


def _tile_batches(positions: list[tuple[int, int, int]],
                  batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    for i in range(0, len(positions), batch_size):
        yield positions[i:i + batch_size]


def _read_context(source: np.ndarray | Reader, ctx: Region) -> np.ndarray:
    data = source(ctx) if callable(source) else np.asarray(source)[..., ctx[0], ctx[1]]
    data = np.asarray(data)
    want = (ctx[0].stop - ctx[0].start, ctx[1].stop - ctx[1].start)
    if data.ndim not in (3, 4) or data.shape[-2:] != want:
        raise InputError(f"tile source gave shape {data.shape} for region {ctx}; "
                         f"expected (C, {want[0]}, {want[1]}) or (S, C, {want[0]}, {want[1]})")
    if data.size == 0:
        raise InputError(f"tile source gave an empty array of shape {data.shape} for {ctx}")
    if not np.isfinite(data).all():
        raise InputError(f"tile source has NaN/Inf values in region {ctx}")
    return data if data.dtype == np.float64 else data.astype(np.float32, copy=False)


def stain_region(source: np.ndarray | Reader, image_shape: tuple[int, int], region: Region,
                 fn: TileFn, *, tile: int | Pair = 256, step: int | Pair = 64,
                 window: str = "mean", batch_size: int = 8,
                 counter: list[int] | None = None) -> np.ndarray:
    """Blend ``fn`` over the global tile grid of an image of ``image_shape``; return ``region``.

    ``source`` is the full (C, H, W) image, an (S, C, H, W) stack of slices sharing the grid,
    or a reader ``read(input_region) -> array`` holding only the window from
    :func:`region_context`. Tiles of all slices are batched together. ``tile``/``step`` are
    one size or per-axis (rows, cols) pairs. Only the region is accumulated, in float64 so
    that blending is exact (a constant or an identity output comes back unchanged; float32
    sums of 4–16 weighted tiles are not); memory is 8 bytes per output value, not per
    context pixel. ``counter[0]`` (if given) grows by the generator input pixels spent.
    Returns (C_out, h, w) or (S, C_out, h, w), float32 (float64 when ``fn`` returns it).
    """
    check_tiling(tile, step, window)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    (th, tw), (sh, sw) = _pair(tile), _pair(step)
    region = _check_region(region, image_shape)
    ctx = region_context(image_shape, region, (th, tw), (sh, sw))
    data = _read_context(source, ctx)
    stack = data[None] if data.ndim == 3 else data

    rows = _axis_coords(region[0].start, region[0].stop, image_shape[0], th, sh)
    cols = _axis_coords(region[1].start, region[1].stop, image_shape[1], tw, sw)
    r_idx = reflect_index(rows, image_shape[0]) - ctx[0].start
    c_idx = reflect_index(cols, image_shape[1]) - ctx[1].start
    padded = np.take(np.take(stack, r_idx, axis=2), c_idx, axis=3)
    y0, x0 = int(rows[0]), int(cols[0])
    # tile starts in padded-grid coordinates, and where each tile meets the region
    ys = range(0, len(rows) - th + 1, sh)
    xs = range(0, len(cols) - tw + 1, sw)
    ry = (region[0].start - y0, region[0].stop - y0)
    rx = (region[1].start - x0, region[1].stop - x0)

    def overlap(t0: int, size: int, r: tuple[int, int]) -> tuple[slice, slice]:
        a, b = max(t0, r[0]), min(t0 + size, r[1])
        return slice(a - r[0], b - r[0]), slice(a - t0, b - t0)

    win64 = window_2d(window, (th, tw))
    h, w = ry[1] - ry[0], rx[1] - rx[0]
    wsum = np.zeros((h, w))
    for y in ys:
        for x in xs:
            (oy, ty), (ox, tx) = overlap(y, th, ry), overlap(x, tw, rx)
            wsum[oy, ox] += win64[ty, tx]

    positions = [(s, y, x) for s in range(stack.shape[0]) for y in ys for x in xs]
    single = len(ys) == 1 and len(xs) == 1  # one tile covers the region: no blending needed
    acc: np.ndarray | None = None
    out_dtype: type = np.float32
    win = win64
    for batch in _tile_batches(positions, batch_size):
        inp = torch.from_numpy(np.stack([padded[s, :, y:y + th, x:x + tw]
                                         for s, y, x in batch]))
        with torch.no_grad():
            out = fn(inp)
        if out.ndim != 4 or out.shape[0] != len(batch) or tuple(out.shape[-2:]) != (th, tw):
            raise InputError(f"tile function returned shape {tuple(out.shape)} for a batch of "
                             f"shape {tuple(inp.shape)}; expected (N, C_out, {th}, {tw})")
        if counter is not None:
            counter[0] += len(batch) * th * tw
        if acc is None:
            out_dtype = np.float64 if out.dtype == torch.float64 else np.float32
            acc = np.zeros((stack.shape[0], out.shape[1], h, w), out_dtype if single else None)
        if single:  # w·t/w == t once rounded to the output dtype: copy the crop
            s0 = batch[0][0]
            acc[s0:s0 + len(batch)] = out.detach().cpu().numpy()[:, :, ry[0]:ry[1], rx[0]:rx[1]]
            continue
        tiles_out = out.detach().cpu().double().numpy()
        for (s, y, x), t_out in zip(batch, tiles_out, strict=True):
            (oy, ty), (ox, tx) = overlap(y, th, ry), overlap(x, tw, rx)
            if oy.start < oy.stop and ox.start < ox.stop:
                acc[s, :, oy, ox] += win[ty, tx] * t_out[:, ty, tx]
    assert acc is not None
    result = acc if single else (acc / wsum).astype(out_dtype)
    return result[0] if data.ndim == 3 else result


def stain_image(image: np.ndarray, fn: TileFn, *, tile: int | Pair = 256,
                step: int | Pair = 64, window: str = "mean", batch_size: int = 8,
                counter: list[int] | None = None) -> np.ndarray:
    """Stain a whole (C, H, W) image or (S, C, H, W) stack on the global tile grid."""
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise InputError(f"need a (C, H, W) image or (S, C, H, W) stack, got shape {image.shape}")
    shape = (image.shape[-2], image.shape[-1])
    full = (slice(0, shape[0]), slice(0, shape[1]))
    return stain_region(image, shape, full, fn, tile=tile, step=step, window=window,
                        batch_size=batch_size, counter=counter)


def resolve_tiling(name: str = "default", tile: int | None = None, step: int | None = None,
                   window: str | None = None) -> Tiling:
    """A named tiling (``paper``: 256/64/mean §2.9, ``default``: 256/192/hann) with overrides."""
    if name not in TILINGS:
        raise UsageError(f"unknown tiling {name!r}; choose one of {', '.join(TILINGS)}")
    base = TILINGS[name]
    tiling = Tiling(tile or base.tile, step or base.step, window or base.window,
                    base.max_tile if not tile else 0)
    check_tiling(tiling.tile, tiling.step, tiling.window)
    return tiling


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[-1, 1] float → uint8 (round half to even, clipped)."""
    return np.clip(np.rint((np.asarray(rgb, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
