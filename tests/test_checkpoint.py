"""Checkpoint files: atomic writes, weights-only loading, RNG round trip."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcstain.errors import InputError
from hpcstain.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


class _Exploit:
    def __reduce__(self):  # a pickle that would run code when unpickled
        return (os.system, ("touch /tmp/hpcstain-pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"format": "hpcstain-checkpoint/1", "payload": _Exploit()}, bad)
    with pytest.raises(InputError, match="refused to load"):
        load_checkpoint(bad)
    assert not Path("/tmp/hpcstain-pwned").exists()


def test_missing_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an hpcstain checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.zeros(3)})
    save_checkpoint(path, {"x": torch.ones(3)})
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "r.pt", {"rng": rng_state()})
    before = (torch.rand(4), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    after = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
