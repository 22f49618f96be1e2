"""LPIPS (SqueezeNet): a clear skip without weights; with weights it is a distance."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hpcstain.errors import InputError
from hpcstain.metrics.lpips import (
    LPIPS,
    TAP_CHANNELS,
    LpipsUnavailable,
    convert_state_dict,
    load_lpips,
    lpips_batch,
    try_load_lpips,
)
from hpcstain.metrics.patches import evaluate_patches

torch.set_num_threads(1)
RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Random weights with non-negative lin layers, saved as a plain state dict."""
    torch.manual_seed(0)
    model = LPIPS()
    with torch.no_grad():
        for lin in model.lins:
            lin.weight.abs_()
    path = tmp_path_factory.mktemp("lpips") / "squeeze.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_missing_weights_give_a_clear_skip_message(tmp_path):
    missing = tmp_path / "nope.pt"
    expected = re.escape(f"LPIPS skipped: weights not found at {missing}")
    with pytest.raises(LpipsUnavailable, match=expected):
        load_lpips(missing)
    model, message = try_load_lpips(None)
    assert model is None and message.startswith("LPIPS skipped: weights not found")


def test_lpips_is_zero_for_identical_positive_for_different_and_symmetric(weights):
    model = load_lpips(weights)
    a = RNG.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + RNG.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    same = lpips_batch(model, a, a)
    ab, ba = lpips_batch(model, a, b), lpips_batch(model, b, a)
    assert same.shape == (3,) and np.all(same == 0)
    assert np.all(ab > 0)
    # Same batches: the features are the same floats and (fa - fb)^2 == (fb - fa)^2 in IEEE
    # arithmetic, so symmetry is exact on any CPU.
    np.testing.assert_array_equal(ab, ba)
    # Other batch sizes may select other float32 convolution kernels (other summation
    # orders): equal up to float32 round-off, ~1e-7 relative measured across oneDNN ISAs;
    # 100 ulp of margin.
    np.testing.assert_allclose(lpips_batch(model, a, b, batch_size=2), ab,
                               rtol=100 * np.finfo(np.float32).eps)


def test_tap_channels_and_key_names_follow_torchvision_and_lpips():
    model = LPIPS()
    keys = set(model.state_dict())
    assert {"features.0.weight", "features.3.squeeze.weight", "features.12.expand3x3.bias",
            "lins.6.weight"} <= keys
    taps = model.taps(torch.zeros(1, 3, 64, 64))
    assert [t.shape[1] for t in taps] == list(TAP_CHANNELS)
    tv = {"features.0.weight": 1, "classifier.1.weight": 2}
    lp = {"lin0.model.1.weight": 3, "net.slice2.3.squeeze.weight": 4, "scaling_layer.shift": 5}
    assert convert_state_dict(tv, lp) == {"features.0.weight": 1, "lins.0.weight": 3,
                                          "features.3.squeeze.weight": 4}


def test_wrong_weight_files_are_input_errors(tmp_path, weights):
    partial = tmp_path / "partial.pt"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, partial)
    with pytest.raises(InputError, match="lack"):
        load_lpips(partial)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        load_lpips(garbage)


def test_patch_protocol_reports_lpips_when_a_model_is_given(weights):
    ref = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    [same] = evaluate_patches(ref, ref, lpips=load_lpips(weights))
    assert same.lpips == 0.0
