"""Instance-norm statistics shared along a stack (hpcstain.models.stack_norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpcstain.config import ModelConfig
from hpcstain.models.networks import build_generator
from hpcstain.models.stack_norm import (
    StackNorm,
    dependency_radius,
    gaussian_weights,
    n_instance_norms,
    share_statistics,
)


def test_weights_are_row_normalised_and_local() -> None:
    w = gaussian_weights(7, sigma=1.0, truncate=2.0).double()
    assert torch.allclose(w.sum(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-6)
    assert w[0, 3] == 0 and w[3, 0] == 0 and w[3, 1] > 0  # radius 2
    assert torch.equal(gaussian_weights(5, 0.0), torch.eye(5))


def test_sigma_zero_is_instance_norm() -> None:
    x = torch.randn(3, 4, 9, 11)
    ref = nn.InstanceNorm2d(4)(x)
    # one-pass moments vs two-pass variance: float32, values of order 1
    assert torch.allclose(StackNorm(sigma=0.0)(x), ref, atol=1e-4)


def test_shared_statistics_match_pooled_moments() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 2, 8, 8)) * rng.uniform(0.5, 2, (5, 1, 1, 1)) \
        + rng.normal(size=(5, 1, 1, 1))
    out = StackNorm(sigma=1.0, truncate=2.0)(torch.from_numpy(x).float()).double().numpy()
    w = gaussian_weights(5, 1.0, 2.0).double().numpy()
    mean = np.einsum("st,tc->sc", w, x.mean(axis=(2, 3)))
    second = np.einsum("st,tc->sc", w, (x * x).mean(axis=(2, 3)))
    expect = (x - mean[..., None, None]) / np.sqrt(second - mean**2 + 1e-5)[..., None, None]
    np.testing.assert_allclose(out, expect, atol=1e-4)
    # a slice whose neighbours differ is no longer normalised by its own statistics alone
    plain = StackNorm(sigma=0.0)(torch.from_numpy(x).float()).double().numpy()
    assert np.abs(out - plain).max() > 1e-2


def test_share_statistics_swaps_every_instance_norm_and_keeps_weights() -> None:
    net = build_generator(ModelConfig(ngf=4, n_blocks=2), 3, 3).eval()
    shared = share_statistics(net, sigma=1.0)
    n = n_instance_norms(net)
    assert n == 1 + 2 + 2 * 2 + 2
    assert sum(isinstance(m, StackNorm) for m in shared.modules()) == n
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in shared.modules())
    assert dependency_radius(net, 1.0) == n * 2
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        # sigma → 0 gives the original network; identical slices share identical statistics
        assert torch.allclose(share_statistics(net, 0.0)(x), net(x), atol=1e-4)
        same = x[:1].expand(4, -1, -1, -1)
        assert torch.allclose(shared(same), net(same), atol=1e-4)
        assert not torch.allclose(shared(x), net(x), atol=1e-3)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_output_of_a_slice_depends_only_on_its_dependency_radius(sigma: float) -> None:
    net = build_generator(ModelConfig(ngf=4, n_blocks=1), 1, 3).eval()
    shared = share_statistics(net, sigma)
    r = dependency_radius(net, sigma)
    n = 2 * r + 3
    x = torch.randn(n, 1, 16, 16)
    y = x.clone()
    y[-1] += 5.0  # change the last slice only
    with torch.inference_mode():
        a, b = shared(x), shared(y)
    assert torch.equal(a[0], b[0])  # slice 0 is > r away from slice n-1
    assert not torch.allclose(a[n - 2], b[n - 2])
