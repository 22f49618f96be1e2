"""Seam and stripe indices separate tiled/slice-wise artefacts from smooth outputs."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from hpcstain.metrics.seams import seam_badness, seam_index
from hpcstain.metrics.stripes import slice_profile, stripe_index, stripe_indices
from hpcstain.tiles import stain_image

torch.set_num_threads(1)
RNG = np.random.default_rng(7)
TILE, STEP = 64, 32


def smooth_image(shape=(320, 320)) -> np.ndarray:
    return gaussian_filter(RNG.normal(size=shape), 3.0) * 10


def test_steps_on_the_tile_grid_score_higher_than_a_smooth_image():
    smooth = smooth_image()
    blocky = smooth.copy()
    for y in range(0, 320, STEP):
        for x in range(0, 320, STEP):
            blocky[y:y + STEP, x:x + STEP] += RNG.normal(0, 1.0)
    assert 0.8 < seam_index(smooth, TILE, STEP) < 1.25
    assert seam_index(blocky, TILE, STEP) > 3.0
    assert seam_index(blocky, TILE, STEP, reference=smooth) > 3.0
    assert seam_index(smooth, TILE, STEP, reference=smooth) == 1.0


def test_tiling_a_smooth_per_pixel_fn_scores_about_one_for_every_window():
    img = smooth_image()[None].astype(np.float32)
    for window in ("mean", "hann", "gaussian"):
        out = stain_image(img, torch.tanh, tile=TILE, step=STEP, window=window)[0]
        assert 0.8 < seam_index(out, TILE, STEP) < 1.25


def test_window_blending_hides_per_tile_offsets_that_the_mean_shows():
    """A tile-dependent fn (per-tile offset): uniform averaging leaves steps, Hann does not."""
    img = smooth_image()[None].astype(np.float32)

    def offset_fn(batch: torch.Tensor) -> torch.Tensor:
        shift = torch.sin(batch.sum(dim=(1, 2, 3)) * 1e3).view(-1, 1, 1, 1)
        return torch.tanh(batch) + 0.5 * shift

    mean = stain_image(img, offset_fn, tile=TILE, step=STEP, window="mean")[0]
    hann = stain_image(img, offset_fn, tile=TILE, step=STEP, window="hann")[0]
    assert seam_index(mean, TILE, STEP) > 1.5
    assert seam_badness(seam_index(hann, TILE, STEP)) < seam_badness(seam_index(mean, TILE, STEP))


def smooth_volume(shape=(40, 48, 48)) -> np.ndarray:
    return gaussian_filter(RNG.normal(size=shape), 2.0) * 10


def test_slice_wise_offsets_along_z_score_clearly_higher_than_a_smooth_volume():
    vol = smooth_volume()
    striped = vol + RNG.normal(0, 0.3, (vol.shape[0], 1, 1))  # per-slice offsets along z
    assert 0.8 < stripe_index(vol, axis=0) < 1.25
    assert stripe_index(striped, axis=0) > 2.0
    indices = stripe_indices(striped)
    assert indices["z"] > 2.0 and indices["y"] < 1.25 and indices["x"] < 1.25
    assert len(slice_profile(striped, 0)) == vol.shape[0] - 1


def test_stripe_index_of_an_rgb_volume_stained_slice_by_slice():
    vol = smooth_volume((24, 40, 40)).astype(np.float32)
    offsets = RNG.normal(0, 0.3, 24)
    rgb = np.stack([
        stain_image(np.stack([vol[z]] * 3), lambda t, o=o: torch.tanh(t) + o,
                    tile=32, step=16, window="hann").transpose(1, 2, 0)
        for z, o in enumerate(offsets)])
    assert rgb.shape == (24, 40, 40, 3)
    smooth_rgb = np.repeat(np.tanh(vol)[..., None], 3, axis=-1)
    assert stripe_index(rgb, 0) > 2.0 * stripe_index(smooth_rgb, 0)
