"""Global tile grid and blending: sub-rectangles equal the whole image, borders, windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpcstain.errors import InputError, UsageError
from hpcstain.tiles import (
    DEFAULT_TILING,
    PAPER_TILING,
    WINDOWS,
    n_tiles,
    padded_length,
    reflect_index,
    region_context,
    stain_image,
    stain_region,
    tile_boundaries,
    window_1d,
    window_2d,
)

torch.set_num_threads(1)
RNG = np.random.default_rng(5)
SHAPE = (203, 157)  # neither side a multiple of the step
TILE, STEP = 64, 24
REGIONS = [
    (slice(0, 203), slice(0, 157)),
    (slice(0, 40), slice(0, 33)),        # top-left corner
    (slice(61, 118), slice(47, 101)),    # interior, off-grid edges
    (slice(170, 203), slice(120, 157)),  # bottom-right corner (mirror padding)
    (slice(100, 101), slice(156, 157)),  # one pixel on the right border
]


def tile_fn(batch: torch.Tensor) -> torch.Tensor:
    """Per-tile deterministic fn that uses the whole tile (misplaced content would show)."""
    mean = batch.mean(dim=(2, 3), keepdim=True)
    return torch.tanh(batch) + 0.5 * mean + 0.1 * batch.flip(-1)


def conv_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, 8, 3), nn.InstanceNorm2d(8),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1), nn.Tanh())
    return net.to(dtype).eval()


def image(dtype: type = np.float64, shape: tuple[int, int] = SHAPE,
          channels: int = 2) -> np.ndarray:
    return RNG.normal(size=(channels, *shape)).astype(dtype)


def reader_for(img: np.ndarray, seen: list):
    def read(region):
        seen.append(region)
        return img[..., region[0], region[1]]
    return read


@pytest.mark.parametrize("window", WINDOWS)
def test_sub_rectangles_equal_whole_image_bit_exact(window):
    img = image()
    whole = stain_image(img, tile_fn, tile=TILE, step=STEP, window=window, batch_size=7)
    for region in REGIONS:
        seen: list = []
        part = stain_region(reader_for(img, seen), SHAPE, region, tile_fn, tile=TILE,
                            step=STEP, window=window, batch_size=3)
        assert seen == [region_context(SHAPE, region, TILE, STEP)]
        np.testing.assert_array_equal(part, whole[:, region[0], region[1]])


def test_reader_holding_only_a_window_gives_the_same_pixels():
    """A caller holding a chunk + halo (not the image) computes its output region exactly."""
    img = image()
    region = (slice(61, 118), slice(47, 101))
    ctx = region_context(SHAPE, region, TILE, STEP)
    window_only = img[:, ctx[0], ctx[1]].copy()

    def read(r):
        return window_only[:, r[0].start - ctx[0].start:r[0].stop - ctx[0].start,
                           r[1].start - ctx[1].start:r[1].stop - ctx[1].start]

    whole = stain_image(img, tile_fn, tile=TILE, step=STEP, window="hann")
    part = stain_region(read, SHAPE, region, tile_fn, tile=TILE, step=STEP, window="hann")
    np.testing.assert_array_equal(part, whole[:, region[0], region[1]])


def test_float64_conv_net_is_bit_exact_across_batch_compositions():
    net = conv_net(torch.float64)
    img = image(np.float64)
    whole = stain_image(img, net, tile=TILE, step=STEP, window="gaussian", batch_size=6)
    region = (slice(61, 118), slice(120, 157))
    part = stain_region(img, SHAPE, region, net, tile=TILE, step=STEP, window="gaussian",
                        batch_size=4)
    assert part.dtype == np.float64
    np.testing.assert_array_equal(part, whole[:, region[0], region[1]])


def test_float32_conv_net_agrees_across_batch_compositions_to_float32_roundoff():
    net = conv_net(torch.float32)
    img = image(np.float32)
    whole = stain_image(img, net, tile=TILE, step=STEP, window="mean", batch_size=16)
    region = (slice(30, 140), slice(10, 90))
    part = stain_region(img, SHAPE, region, net, tile=TILE, step=STEP, window="mean",
                        batch_size=1)
    assert part.dtype == np.float32
    # Batch 16 vs 1 changes the conv/InstanceNorm summation order (and the vector kernels
    # chosen): each output may move by float32 round-off of the ~10³-term sums behind it,
    # a few hundred ulps of the tanh output scale (1) at most — never a misplaced tile.
    ulp = np.finfo(np.float32).eps
    np.testing.assert_allclose(part, whole[:, region[0], region[1]], atol=256 * ulp, rtol=0)


def test_stack_of_slices_shares_the_grid_and_matches_each_slice():
    stack = np.stack([image(np.float32, (90, 70)) for _ in range(3)])
    out = stain_image(stack, tile_fn, tile=TILE, step=STEP, window="hann", batch_size=5)
    assert out.shape == (3, 2, 90, 70)
    for s in range(3):
        single = stain_image(stack[s], tile_fn, tile=TILE, step=STEP, window="hann")
        np.testing.assert_array_equal(out[s], single)
    region = (slice(20, 50), slice(41, 70))
    part = stain_region(stack, (90, 70), region, tile_fn, tile=TILE, step=STEP, window="hann")
    np.testing.assert_array_equal(part, out[:, :, region[0], region[1]])


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (5, 3), (63, 65), (64, 64), (97, 200)])
@pytest.mark.parametrize("window", WINDOWS)
def test_odd_and_small_images_are_padded_and_cropped_back(shape, window):
    img = image(np.float32, shape, channels=3)
    out = stain_image(img, lambda t: t.clone(), tile=TILE, step=STEP, window=window)
    assert out.shape == img.shape
    np.testing.assert_array_equal(out, img)  # a per-pixel identity survives padding + blending


@pytest.mark.parametrize("window", WINDOWS)
def test_windows_normalise_a_constant_output_exactly(window):
    value = np.float32(0.3712)

    def constant(batch: torch.Tensor) -> torch.Tensor:
        return torch.full((batch.shape[0], 3, *batch.shape[2:]), float(value))

    out = stain_image(image(np.float32, (150, 131)), constant, tile=TILE, step=STEP,
                      window=window)
    assert out.shape == (3, 150, 131)
    assert (out == value).all()


def test_windows_are_strictly_positive_symmetric_and_hann_partitions_unity():
    for name in WINDOWS:
        w = window_1d(name, 256)
        assert (w > 0).all() and np.allclose(w, w[::-1])
        assert window_2d(name, 256).shape == (256, 256)
    hann = window_1d("hann", 256, floor=0.0)
    # half-overlapping Hann tiles sum to 1: the blend is a plain weighted average
    np.testing.assert_allclose(hann[128:] + hann[:128], 1.0, atol=1e-12)
    assert window_1d("mean", 8).tolist() == [1.0] * 8


def test_mirror_padding_indices():
    assert reflect_index(np.arange(10), 4).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert reflect_index(np.arange(5), 1).tolist() == [0] * 5
    np.testing.assert_array_equal(reflect_index(np.arange(7), 7), np.arange(7))


def test_grid_geometry_matches_the_paper_tiling():
    assert (PAPER_TILING.tile, PAPER_TILING.step, PAPER_TILING.window) == (256, 64, "mean")
    assert n_tiles(768, 256, 64) == 9 and n_tiles(768, 256, 192) == 4
    assert n_tiles(100, 256, 64) == 1 and n_tiles(257, 256, 64) == 2
    assert tile_boundaries(400, 256, 64).tolist() == [64, 128, 192, 256, 320, 384]
    assert DEFAULT_TILING.window in WINDOWS and DEFAULT_TILING.step <= DEFAULT_TILING.tile


def test_region_context_stays_inside_the_image_and_covers_the_tiles():
    ctx = region_context((768, 768), (slice(300, 400), slice(0, 10)), 256, 64)
    # tiles touching rows 300..399 start at 64..384 → rows 64..640; cols: tiles 0..0 → 0..256
    assert ctx == (slice(64, 640), slice(0, 256))
    assert region_context((10, 1), (slice(3, 7), slice(0, 1)), 256, 64) == \
        (slice(0, 10), slice(0, 1))


def test_bad_arguments_raise_clear_errors():
    img = image(np.float32, (40, 40))
    with pytest.raises(UsageError, match="step"):
        stain_image(img, tile_fn, tile=16, step=32)
    with pytest.raises(UsageError, match="window"):
        stain_image(img, tile_fn, tile=16, step=8, window="box")
    with pytest.raises(UsageError, match="reaches past"):
        stain_region(img, (40, 40), (slice(0, 41), slice(0, 5)), tile_fn, tile=16, step=8)
    with pytest.raises(InputError, match="tile function returned"):
        stain_image(img, lambda t: t[:, :, :8], tile=16, step=8)
    bad = img.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        stain_image(bad, tile_fn, tile=16, step=8)
    with pytest.raises(InputError, match="shape"):
        stain_image(img[0], tile_fn, tile=16, step=8)


def test_plane_tiles_cover_long_planes_with_fewer_equal_tiles():
    from hpcstain.tiles import grid_pixels, plane_tiles

    # fixed tiles: 3 × 256 with the 192 step on a 512 px axis (2.25× the plane's pixels)
    assert plane_tiles((512, 512), 256, 192) == ((256, 256), (192, 192))
    assert plane_tiles((512, 512), 256, 192, 4, max_tile=512) == ((512, 512), (512, 512))
    (t, _), (s, _) = plane_tiles((1024, 40), 256, 192, 4, max_tile=512)
    assert (t, s) == (384, 320) and t - s == 64  # the configured overlap is kept
    for n in (300, 700, 1000, 2048, 4099):
        tile, step = plane_tiles((n, n), 256, 192, 4, max_tile=512)
        assert tile[0] <= 512 + 3 and tile[0] % 4 == 0 and tile[0] - step[0] in (0, 64)
        assert grid_pixels((n, n), tile, step) <= grid_pixels((n, n), (256, 256), (192, 192))
        assert padded_length(n, tile[0], step[0]) - n < tile[0] - step[0] + 4
    img = image(np.float32, (300, 200), channels=3)
    tile, step = plane_tiles((300, 200), 64, 48, max_tile=128)
    out = stain_image(img, lambda t: t.clone(), tile=tile, step=step, window="hann")
    np.testing.assert_allclose(out, img, rtol=4e-6, atol=1e-7)
