"""Image pool of 50 fakes: CycleGAN's 0.5 swap rule, deterministic and resumable."""

from __future__ import annotations

import io

import torch

from hpcstain.models.pool import ImagePool, pool_seed

torch.set_num_threads(1)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, 4, 4, generator=g) for _ in range(n)]


def test_pool_passes_fakes_through_until_full() -> None:
    pool = ImagePool(size=4, seed=0)
    first, second, _ = _batches(3)
    assert torch.equal(pool.query(first), first)
    assert torch.equal(pool.query(second), second)
    assert len(pool) == 4


def test_full_pool_mixes_new_and_stored_fakes() -> None:
    pool = ImagePool(size=4, seed=0)
    seen: list[torch.Tensor] = []
    swapped = kept = 0
    for batch in _batches(40):
        out = pool.query(batch)
        assert out.shape == batch.shape
        for new, got in zip(batch, out, strict=True):
            if torch.equal(new, got):
                kept += 1
            else:
                swapped += 1
                assert any(torch.equal(got, old) for old in seen)  # an earlier fake
            seen.append(new)
    assert len(pool) == 4
    assert 20 < swapped < 56 and kept > 20  # about half of the 76 post-fill queries


def test_pool_is_deterministic_given_its_seed() -> None:
    a, b, c = ImagePool(4, seed=3), ImagePool(4, seed=3), ImagePool(4, seed=4)
    outs = [(a.query(x), b.query(x), c.query(x)) for x in _batches(20)]
    assert all(torch.equal(x, y) for x, y, _ in outs)
    assert not all(torch.equal(x, z) for x, _, z in outs)


def test_pool_state_round_trips_through_weights_only_load() -> None:
    batches = _batches(30)
    original = ImagePool(5, seed=7)
    for x in batches[:10]:
        original.query(x)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    buf.seek(0)
    resumed = ImagePool(5, seed=99)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for x in batches[10:]:
        assert torch.equal(original.query(x), resumed.query(x))


def test_pool_state_holds_only_tensors_and_numbers() -> None:
    pool = ImagePool(3, seed=0)
    pool.query(_batches(1)[0])
    state = pool.state_dict()
    assert state["rng"].dtype == torch.uint8
    assert isinstance(state["size"], int)
    assert all(isinstance(img, torch.Tensor) for img in state["images"])


def test_zero_size_pool_passes_through_and_stores_nothing() -> None:
    pool = ImagePool(0)
    x = _batches(1)[0]
    assert torch.equal(pool.query(x), x) and len(pool) == 0


def test_pool_returns_detached_float32() -> None:
    x = torch.rand(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = ImagePool(4).query(x * 1)
    assert out.dtype == torch.float32 and not out.requires_grad


def test_pool_seeds_differ_per_rank_and_pool() -> None:
    seeds = {pool_seed(0, r, i) for r in range(4) for i in range(2)}
    assert len(seeds) == 8
    assert pool_seed(1, 0, 0) == pool_seed(1, 0, 0)
