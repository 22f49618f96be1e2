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

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

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
    # a sum is finite only if every value is (one pass, no boolean temporary); a huge but
    # finite input may overflow the sum, so only then is every value looked at
    if not np.isfinite(data.sum()) and not np.isfinite(data).all():
        raise InputError(f"tile source has NaN/Inf values in region {ctx}")
    return data if data.dtype == np.float64 else data.astype(np.float32, copy=False)


def _segments(tiles: range, size: int, lo: int, hi: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """``[lo, hi)`` cut where a tile starts or ends: ``(a, b, tiles covering it)``, with
    ``a, b`` relative to ``lo`` and the tiles as indices into ``tiles`` (their starts)."""
    cuts = sorted({lo, hi, *(t for t in tiles if lo < t < hi),
                   *(t + size for t in tiles if lo < t + size < hi)})
    out = []
    for a, b in itertools.pairwise(cuts):
        cover = tuple(i for i, t in enumerate(tiles) if t <= a and b <= t + size)
        out.append((a - lo, b - lo, cover))
    return out


def _gather(index: np.ndarray) -> slice | np.ndarray:
    """A slice when the (mirrored) indices are a plain run, else the indices."""
    if len(index) and index[-1] - index[0] == len(index) - 1 and \
            (len(index) == 1 or bool((np.diff(index) == 1).all())):
        return slice(int(index[0]), int(index[0]) + len(index))
    return index


def stain_region(source: np.ndarray | Reader, image_shape: tuple[int, int], region: Region,
                 fn: TileFn, *, tile: int | Pair = 256, step: int | Pair = 64,
                 window: str = "mean", batch_size: int = 8,
                 counter: list[int] | None = None) -> np.ndarray:
    """Blend ``fn`` over the global tile grid of an image of ``image_shape``; return ``region``.

    ``source`` is the full (C, H, W) image, an (S, C, H, W) stack of slices sharing the grid,
    or a reader ``read(input_region) -> array`` holding only the window from
    :func:`region_context`. Tiles of all slices are batched together. ``tile``/``step`` are
    one size or per-axis (rows, cols) pairs. Where tiles overlap the outputs are blended in
    float64 so that blending is exact (a constant or an identity output comes back
    unchanged; float32 sums of 4–16 weighted tiles are not); where one tile alone covers a
    pixel its output is copied (``w·t / w`` rounds back to ``t``). Memory: the result, plus 8
    bytes per overlapped output value. ``counter[0]`` (if given) grows by the generator input
    pixels spent. Returns (C_out, h, w) or (S, C_out, h, w), float32 (float64 when ``fn``
    returns it).
    """
    check_tiling(tile, step, window)
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    (th, tw), (sh, sw) = _pair(tile), _pair(step)
    region = _check_region(region, image_shape)
    ctx = region_context(image_shape, region, (th, tw), (sh, sw))
    data = _read_context(source, ctx)
    stack = data[None] if data.ndim == 3 else data
    grid = _TileGrid.of(image_shape, region, ctx, (th, tw), (sh, sw), window)

    positions = [(s, iy, ix) for s in range(stack.shape[0]) for iy in range(len(grid.ys))
                 for ix in range(len(grid.xs))]
    res: np.ndarray | None = None
    acc: dict[tuple[int, int], np.ndarray] = {}
    tmp = np.empty(0)
    buf = np.empty((min(batch_size, len(positions)), stack.shape[1], th, tw), stack.dtype)
    for batch in _tile_batches(positions, batch_size):
        inp = buf[:len(batch)]
        for i, (s, iy, ix) in enumerate(batch):
            inp[i] = grid.tile(stack[s], iy, ix)
        with torch.no_grad():
            out = fn(torch.from_numpy(inp))
        if out.ndim != 4 or out.shape[0] != len(batch) or tuple(out.shape[-2:]) != (th, tw):
            raise InputError(f"tile function returned shape {tuple(out.shape)} for a batch of "
                             f"shape {tuple(inp.shape)}; expected (N, C_out, {th}, {tw})")
        if counter is not None:
            counter[0] += len(batch) * th * tw
        tiles_out = out.detach().cpu().numpy()
        if res is None:
            res = np.empty((stack.shape[0], out.shape[1], grid.h, grid.w),
                           np.float64 if tiles_out.dtype == np.float64 else np.float32)
            tmp = np.empty((out.shape[1], min(th, grid.h), min(tw, grid.w)))
        for (s, iy, ix), t_out in zip(batch, tiles_out, strict=True):
            grid.place(res, acc, tmp, s, iy, ix, t_out)
    assert res is not None
    grid.normalise_overlaps(res, acc)
    return res[0] if data.ndim == 3 else res


@dataclass
class _TileGrid:
    """The global tile grid over one region of a plane (:func:`stain_region`): tile starts
    in padded-grid coordinates (``ys``, ``xs``), where each tile meets the region, and the
    region cut into blocks covered by the same tiles (one tile: copy; more: blend)."""

    th: int
    tw: int
    ys: range
    xs: range
    ry: tuple[int, int]
    rx: tuple[int, int]
    row_segs: list[Any]
    col_segs: list[Any]
    rows_of: list[list[Any]]
    cols_of: list[list[Any]]
    r_take: list[Any]
    c_take: list[Any]
    win: np.ndarray

    @property
    def h(self) -> int:
        return self.ry[1] - self.ry[0]

    @property
    def w(self) -> int:
        return self.rx[1] - self.rx[0]

    @classmethod
    def of(cls, image_shape: tuple[int, int], region: Region, ctx: Region, tile: Pair,
           step: Pair, window: str) -> _TileGrid:
        (th, tw), (sh, sw) = tile, step
        rows = _axis_coords(region[0].start, region[0].stop, image_shape[0], th, sh)
        cols = _axis_coords(region[1].start, region[1].stop, image_shape[1], tw, sw)
        r_idx = reflect_index(rows, image_shape[0]) - ctx[0].start
        c_idx = reflect_index(cols, image_shape[1]) - ctx[1].start
        y0, x0 = int(rows[0]), int(cols[0])
        ys = range(0, len(rows) - th + 1, sh)
        xs = range(0, len(cols) - tw + 1, sw)
        ry = (region[0].start - y0, region[0].stop - y0)
        rx = (region[1].start - x0, region[1].stop - x0)
        row_segs, col_segs = _segments(ys, th, *ry), _segments(xs, tw, *rx)
        return cls(th, tw, ys, xs, ry, rx, row_segs, col_segs,
                   [[sg for sg in row_segs if i in sg[2]] for i in range(len(ys))],
                   [[sg for sg in col_segs if i in sg[2]] for i in range(len(xs))],
                   [_gather(r_idx[y:y + th]) for y in ys],
                   [_gather(c_idx[x:x + tw]) for x in xs], window_2d(window, (th, tw)))

    def tile(self, part: np.ndarray, iy: int, ix: int) -> np.ndarray:
        """Tile (iy, ix) of one slice's context ``part`` (C, H, W): slices, or mirrored
        indices at the image border."""
        r, c = self.r_take[iy], self.c_take[ix]
        part = part[:, r] if isinstance(r, slice) else np.take(part, r, axis=1)
        return part[:, :, c] if isinstance(c, slice) else np.take(part, c, axis=2)

    def place(self, res: np.ndarray, acc: dict[tuple[int, int], np.ndarray], tmp: np.ndarray,
              s: int, iy: int, ix: int, t_out: np.ndarray) -> None:
        """Tile (iy, ix) of slice ``s``'s output into the region: copied where it alone
        covers a block, else its windowed term accumulated in float64 in grid order (the
        first tile's term stored, not added to 0: the same value) in ``acc``."""
        ty0, tx0 = self.ry[0] - self.ys[iy], self.rx[0] - self.xs[ix]
        for ra, rb, rcov in self.rows_of[iy]:
            for ca, cb, ccov in self.cols_of[ix]:
                ty, tx = slice(ty0 + ra, ty0 + rb), slice(tx0 + ca, tx0 + cb)
                if len(rcov) == 1 and len(ccov) == 1:
                    res[s, :, ra:rb, ca:cb] = t_out[:, ty, tx]
                    continue
                block = acc.get((ra, ca))
                if block is None:
                    block = acc[ra, ca] = np.empty((res.shape[0], res.shape[1],
                                                    rb - ra, cb - ca))
                if iy == rcov[0] and ix == ccov[0]:
                    np.multiply(t_out[:, ty, tx], self.win[ty, tx], out=block[s])
                else:
                    term = tmp[:, :rb - ra, :cb - ca]
                    np.multiply(t_out[:, ty, tx], self.win[ty, tx], out=term)
                    np.add(block[s], term, out=block[s])

    def normalise_overlaps(self, res: np.ndarray, acc: dict[tuple[int, int], np.ndarray]
                           ) -> None:
        """Divide each blended block by its summed window weights, into ``res``."""
        for (ra, ca), block in acc.items():
            (rb, rcov), = [(b, cov) for a, b, cov in self.row_segs if a == ra]
            (cb, ccov), = [(b, cov) for a, b, cov in self.col_segs if a == ca]
            wsum = np.zeros((rb - ra, cb - ca))
            for iy in rcov:
                for ix in ccov:
                    ty0, tx0 = self.ry[0] - self.ys[iy], self.rx[0] - self.xs[ix]
                    wsum += self.win[ty0 + ra:ty0 + rb, tx0 + ca:tx0 + cb]
            res[:, :, ra:rb, ca:cb] = np.divide(block, wsum, out=block)


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
    return _uint8_levels_inplace(np.array(rgb, np.float32)).astype(np.uint8)


def _uint8_levels_inplace(rgb: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] → rounded, clipped 0…255 (still float32), in place."""
    np.add(rgb, 1.0, out=rgb)
    np.multiply(rgb, 127.5, out=rgb)
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0, 255, out=rgb)
    return rgb


def to_uint8_into(dest: np.ndarray, rgb: np.ndarray) -> None:
    """``dest[...] = to_uint8(moveaxis(rgb, -3, -1))`` (bit-identical) without temporaries:
    a channels-first (…, C, h, w) float32 ``rgb`` (the caller's own, overwritten) is
    converted in place and cast into the channels-last ``dest`` (…, h, w, C) of any strides
    (a transposed view writes the layout the output array wants)."""
    if rgb.dtype != np.float32:
        rgb = rgb.astype(np.float32)
    # contiguous, then one channel at a time: numpy copies a strided channel faster than it
    # interleaves all three
    u8 = _uint8_levels_inplace(rgb).astype(np.uint8)
    for c in range(u8.shape[-3]):
        np.copyto(dest[..., c], u8[..., c, :, :])
